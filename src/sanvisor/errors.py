"""The one error tree of sanvisor.

Every error carries a stable ``code`` (machine-readable, never renamed) and a
``context`` dict with what a user needs to act on it. Library errors are
translated at the boundary with ``raise SomeError(...) from exc``.

Every class is defined here, not in the module that raises it: the agent sends an
error as ``to_dict()`` and the CLI rebuilds it with :func:`from_dict` from its code,
and a CLI process imports this module, not the storage, lab or Xen packages. A class
registers itself by its code when it is defined; it must declare a code of its own,
unique in the tree (docs/architecture.md, "Errors", lists them).
"""

from __future__ import annotations

import math

TYPE_CHECKING = False  # typing costs ~4 ms to import: every CLI call would pay it
if TYPE_CHECKING:
    from typing import Any

_BY_CODE: dict[str, type[SanvisorError]] = {}


def _register(cls: type[SanvisorError]) -> None:
    code = cls.__dict__.get("code")
    if not isinstance(code, str) or not code:
        raise TypeError(f"{cls.__qualname__} must declare its own error code")
    old = _BY_CODE.get(code)
    if old is not None and (old.__module__, old.__qualname__) != (
            cls.__module__, cls.__qualname__):  # the same class again is a module reload
        raise TypeError(f"error code {code!r} of {cls.__module__}.{cls.__qualname__} "
                        f"is taken by {old.__module__}.{old.__qualname__}")
    _BY_CODE[code] = cls


class SanvisorError(Exception):
    """Base of every error sanvisor raises on purpose."""

    code = "error"
    exit_status = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register(cls)

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context: dict[str, Any] = context

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # subclasses' __init__ differ (CommandError's); rebuild as from_dict does
        return _rebuild, (type(self), self.message, self.context, self.code)

    def to_dict(self) -> dict[str, Any]:
        """What crosses the API: plain JSON (a context value JSON cannot carry, such as
        a Path, a set or a NaN, is sent as its string)."""
        return {"code": self.code, "message": self.message, "context": _jsonable(self.context)}


_register(SanvisorError)


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

    # read from the context, so that an error rebuilt by from_dict has them too
    @property
    def file(self) -> str | None:
        file = self.context.get("file")
        return None if file is None else str(file)

    @property
    def line(self) -> int | None:
        line = self.context.get("line")
        return line if isinstance(line, int) else None


class UsageError(SanvisorError):
    """The command line is wrong (an unknown option, a value of the wrong kind)."""

    code = "usage"
    exit_status = 2


class NotFoundError(SanvisorError):
    """What the request names does not exist (a domain, a LUN, a lab host, a device).

    The code says ``domain`` for history's sake; it is kept (codes are never renamed).
    """

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
    """The guest kit cannot be built (a package not downloadable, a file missing)."""

    code = "guestkit"


class HypervisorError(SanvisorError):
    """The hypervisor (QEMU, xl) refused or failed an operation."""

    code = "hypervisor"


class MigrationNotStartedError(HypervisorError):
    """A live migration failed before the guest stopped, and the guest still runs,
    untouched, on the source (Xen: the guest never suspended). The agent tries once
    more; this is the error when the second try fails too."""

    code = "migration.not_started"


class SaveFileError(SanvisorError):
    """A save file is corrupt, truncated or not a sanvisor save file."""

    code = "savefile.invalid"


class RecordError(SaveFileError):
    """A domain record from outside the agent (a save file, an incoming migration)
    that does not hold up: a field of the wrong type or form."""

    code = "record.invalid"


class TimeoutError_(SanvisorError):
    """Something did not happen in the time it was given."""

    code = "timeout"


class AgentUnavailableError(SanvisorError):
    """The CLI (or an agent, for a migration) cannot reach a host agent."""

    code = "agent.unavailable"


class AgentProtocolError(SanvisorError):
    """The agent's reply is not one the client understands (not JSON, or an HTTP error
    without an error body: a request the API refused, e.g. a CLI newer than the agent)."""

    code = "agent.protocol"


class StoreError(SanvisorError):
    """The pool's state store refused or failed an operation (the base of store.*)."""

    code = "store"


class StoreUnavailableError(StoreError):
    """The state store cannot be reached or used (etcd down, the SQLite file unreadable
    or locked too long); for a write, whether it happened is then unknown."""

    code = "store.unavailable"


class StoreConflictError(StoreError, ConflictError):
    """A conditional write lost: a key is already taken, or changed since it was read."""

    code = "store.conflict"


class StoreLeaseExpiredError(StoreConflictError):
    """A lease is gone (expired or revoked): what was attached to it is gone too."""

    code = "store.lease_expired"


class StoreFencedError(StoreConflictError):
    """A write on behalf of an owner whose fencing token is no longer current (its lease
    lapsed, or another host took the domain): refused, nothing written."""

    code = "store.fenced"


class StoreCompactedError(StoreError):
    """A watch asked for history the store no longer keeps: read the state again."""

    code = "store.compacted"


class TlsError(SanvisorError):
    """A TLS connection between hosts of the pool failed (the base of the tls.* codes;
    docs/pool.md)."""

    code = "tls"


class TlsCredentialsError(TlsError):
    """This host's own TLS credentials (the pool CA, its certificate or key) are missing,
    unreadable or unusable."""

    code = "tls.credentials"


class TlsPeerError(TlsError):
    """The other host's certificate is refused: expired, not yet valid, signed by another
    CA, or naming another host."""

    code = "tls.peer"


class TlsRefusedError(TlsError):
    """The other host refused this one in the handshake (no certificate, or one it does
    not accept: expired, not yet valid, another CA)."""

    code = "tls.refused"


class TlsForbiddenError(TlsError):
    """An authenticated peer asked for what it may not: it is no host of the pool, the
    route is not one hosts call on each other, or it speaks for another host."""

    code = "tls.forbidden"


class InternalError(SanvisorError):
    """An exception the agent did not expect (a bug, or a case no check caught): its type
    and message, the traceback in the agent log."""

    code = "internal"

    @classmethod
    def wrap(cls, exc: BaseException, **ctx: Any) -> InternalError:
        """The error that stands for ``exc``; an OSError says what the C library says
        (``No such file or directory: '/x'``), anything else ``Type: message``."""
        kind = type(exc).__name__
        if isinstance(exc, OSError) and exc.strerror:
            message = exc.strerror
            if exc.filename is not None:
                message += f": {exc.filename!r}"
            if exc.filename2 is not None:
                message += f" -> {exc.filename2!r}"
            ctx.setdefault("errno", exc.errno)
        else:
            text = str(exc)
            message = f"{kind}: {text}" if text else kind
        return cls(message, type=kind, **ctx)


class CommandError(SanvisorError):
    """An external command failed; carries cmd, rc, out, err (VDSM style)."""

    code = "command.failed"

    def __init__(self, cmd: list[str], rc: int, out: str, err: str, *,
                 what: str | None = None) -> None:
        """``what`` names the command in the message (default: its program)."""
        last = (err.strip() or out.strip()).splitlines()
        reason = last[-1] if last else f"exit status {rc}"
        super().__init__(
            f"{what or cmd[0]} failed (rc={rc}): {reason}", cmd=cmd, rc=rc, out=out, err=err
        )

    # read from the context, so that an error rebuilt by from_dict has them too
    @property
    def cmd(self) -> list[str]:
        cmd = self.context.get("cmd")
        return [str(c) for c in cmd] if isinstance(cmd, list | tuple) else []

    @property
    def rc(self) -> int:
        rc = self.context.get("rc")
        return rc if isinstance(rc, int) else -1

    @property
    def out(self) -> str:
        return str(self.context.get("out") or "")

    @property
    def err(self) -> str:
        return str(self.context.get("err") or "")


class NbdError(SanvisorError):
    """The NBD client's exchange with a server (the array) failed or was refused."""

    code = "nbd"


class GuestCommandError(SanvisorError):
    """A command typed into a guest's console shell failed or did not finish."""

    code = "guest.command"


class XenHostError(SanvisorError):
    """A nested Xen host cannot be built or run (its packages, its kit, its boot)."""

    code = "xenhost"


class ChannelError(XenHostError):
    """The command channel to a nested Xen host's dom0 failed (closed, refused)."""

    code = "xenhost.channel"


class VolumeError(SanvisorError):
    """A volume (LVM) operation refused or failed (the base of the volume.* codes)."""

    code = "volume.failed"


class VolumeNameError(VolumeError, UsageError):
    """A PV, VG or LV name (or a size) LVM refuses: charset, length, reserved names."""

    code = "volume.name"


class VolumeNotFoundError(VolumeError, NotFoundError):
    """A named PV, VG or LV does not exist (here, or on any device this host sees)."""

    code = "volume.not_found"


class VolumeExistsError(VolumeError, ConflictError):
    """A VG or LV name is taken, or a device is already a PV."""

    code = "volume.exists"


class VolumeSpaceError(VolumeError, ResourceError):
    """A VG has not the free extents a request needs (the message says what is free)."""

    code = "volume.space"


class VolumeInUseError(VolumeError, ConflictError):
    """A device holds something (a filesystem, a partition table, another VG) or a
    PV/LV is in use (allocated extents, active on a host): refused without --force."""

    code = "volume.in_use"


class MetadataError(VolumeError):
    """LVM metadata that cannot be read or trusted: a bad label, header or checksum,
    text that does not parse, a VG that does not hold together."""

    code = "volume.metadata"


class MissingPvError(VolumeError, ConflictError):
    """A VG has a PV this host cannot see: nothing is written until
    `vgreduce --removemissing`."""

    code = "volume.missing_pv"


class LeaseError(VolumeError, ConflictError):
    """The VG's lease on the shared storage could not be taken in time, or was lost
    (a host that cannot renew its lease stops writing metadata)."""

    code = "volume.lease"


class VolumeIOError(VolumeError):
    """A read or write on a PV's device failed."""

    code = "volume.io"


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((_jsonable(v) for v in value), key=repr)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _rebuild(cls: type[SanvisorError], message: str, context: dict[str, Any],
             code: str | None = None) -> SanvisorError:
    """An instance of ``cls`` without its own ``__init__`` (whose arguments differ)."""
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.message = message
    err.context = context
    if code is not None and code != cls.code:
        err.code = code  # an unknown code is kept, under its nearest known class
    return err


def error_class(code: str) -> type[SanvisorError]:
    """The class of ``code``; for a code this side does not know (a newer agent), the
    class of its nearest known parent code ('xenhost.foo' -> XenHostError), else
    SanvisorError."""
    while code:
        if (cls := _BY_CODE.get(code)) is not None:
            return cls
        code = code.rpartition(".")[0]
    return SanvisorError


def from_dict(data: object) -> SanvisorError:
    """Rebuild an error sent over the API (client side): the class of its code, its
    message and context. Never raises: what is not an error body gives a SanvisorError
    that says so."""
    try:
        if not isinstance(data, dict):
            return SanvisorError(f"the agent sent a malformed error: {_clip(data)}")
        code = data.get("code")
        code = code if isinstance(code, str) and code else "error"
        message = data.get("message")
        if message is None or message == "":
            message = f"{code} (no message given)"
        elif not isinstance(message, str):
            message = _clip(message)
        raw = data.get("context")
        if raw is None:
            context: dict[str, Any] = {}
        elif isinstance(raw, dict):
            context = {str(k): v for k, v in raw.items()}
        else:
            context = {"context": raw}
        return _rebuild(error_class(code), message, context, code)
    except Exception as exc:  # garbage in, one SanvisorError out
        return SanvisorError(f"the agent sent a malformed error ({type(exc).__name__})")


def _clip(value: object, limit: int = 200) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[:limit] + "..."
