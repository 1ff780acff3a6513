"""The one error tree of sanvisor.

Every error carries a stable ``code`` (machine-readable, never renamed) and a
``context`` dict with what a user needs to act on it. Library errors are
translated at the boundary with ``raise SomeError(...) from exc``.
"""

from __future__ import annotations

from typing import Any


class SanvisorError(Exception):
    """Base of every error sanvisor raises on purpose."""

    code = "error"
    exit_status = 1

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context: dict[str, Any] = context

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "context": self.context}


class ConfigError(SanvisorError):
    """A domain config file (or a KEY=VALUE override) is malformed or invalid.

    The message starts with ``file:line:`` when the place is known.
    """

    code = "config.invalid"

    def __init__(
        self, message: str, *, file: str | None = None, line: int | None = None, **ctx: Any
    ) -> None:
        where = ""
        if file is not None:
            where = f"{file}:{line}: " if line is not None else f"{file}: "
        super().__init__(where + message, file=file, line=line, **ctx)
        self.file = file
        self.line = line


class UsageError(SanvisorError):
    code = "usage"
    exit_status = 2


class NotFoundError(SanvisorError):
    code = "domain.not_found"


class ConflictError(SanvisorError):
    """The request clashes with the current state (name in use, already running...)."""

    code = "conflict"


class ResourceError(SanvisorError):
    """The host cannot give what is asked (memory, CPUs, a free MAC...)."""

    code = "resource.unavailable"


class DeviceError(SanvisorError):
    """A disk or NIC operation failed (not attached, already attached, missing backend)."""

    code = "device"


class GuestKitError(SanvisorError):
    code = "guestkit"


class HypervisorError(SanvisorError):
    """The hypervisor (QEMU, xl) refused or failed an operation."""

    code = "hypervisor"


class SaveFileError(SanvisorError):
    """A save file is corrupt, truncated or not a sanvisor save file."""

    code = "savefile.invalid"


class TimeoutError_(SanvisorError):
    code = "timeout"


class AgentUnavailableError(SanvisorError):
    """The CLI cannot reach the host agent."""

    code = "agent.unavailable"


class CommandError(SanvisorError):
    """An external command failed; carries cmd, rc, out, err (VDSM style)."""

    code = "command.failed"

    def __init__(self, cmd: list[str], rc: int, out: str, err: str) -> None:
        last = (err.strip() or out.strip()).splitlines()
        reason = last[-1] if last else f"exit status {rc}"
        super().__init__(
            f"{cmd[0]} failed (rc={rc}): {reason}", cmd=cmd, rc=rc, out=out, err=err
        )
        self.cmd = cmd
        self.rc = rc
        self.out = out
        self.err = err


_BY_CODE: dict[str, type[SanvisorError]] = {}


def _register(cls: type[SanvisorError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(SanvisorError)


def from_dict(data: dict[str, Any]) -> SanvisorError:
    """Rebuild an error sent over the API (client side)."""
    cls = _BY_CODE.get(str(data.get("code")), SanvisorError)
    err = SanvisorError.__new__(cls)
    ctx = dict(data.get("context") or {})
    SanvisorError.__init__(err, str(data.get("message", "error")), **ctx)
    return err
