"""xl, run through an injected runner; its failures become sanvisor errors.

xl's own message is kept (its last meaningful stderr line), so an xl failure
surfaces as one line: `sanvisor: error: xl create failed: <xl's reason>`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sanvisor.errors import HypervisorError, NotFoundError

Runner = Callable[[list[str], bytes | None], tuple[int, str, str]]

_NOISE = ("libxl: error: libxl_utils.c", "Parsing config from", "xl: ")


_DETAIL = ("libxl: detail:", "libxl: debug:", "domainbuilder:", "xc:", "Parsing config from")
#: libxl's follow-up errors once the first one happened: not the reason.
_AFTERMATH = ("Destruction of domain failed", "Unable to destroy guest", "Non-existant domain",
              "unable to add disk devices", "unable to add nic devices")


def _strip_libxl(line: str) -> str:
    # "libxl: error: libxl_create.c:123:foo: Domain 5:the reason" -> "Domain 5:the reason"
    return line.split(":", 5)[-1].strip() if line.startswith("libxl: error:") else line


def xl_reason(err: str, out: str, rc: int) -> str:
    """The one line that says why xl failed: libxl's first error (a hotplug script's
    own message joined to it), else xl's last line."""
    lines = [ln.strip() for ln in (err or out).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(_DETAIL)]
    if not useful:
        return f"exit status {rc}"
    errors = [i for i, ln in enumerate(useful) if ln.startswith("libxl: error:")
              and not any(a in ln for a in _AFTERMATH)]
    if not errors:
        return _strip_libxl(useful[-1])
    first = errors[0]
    reason = _strip_libxl(useful[first])
    if "exited with error status" in reason and first > 0 \
            and not useful[first - 1].startswith("libxl:"):
        reason += f" ({useful[first - 1]})"  # the script's own last word
    return reason


@dataclass
class DomInfo:
    name: str
    domid: int
    state: str  # xl's six letters, e.g. "-b----"
    memory_kib: int
    vcpus: int
    cpu_seconds: float

    @property
    def letter(self) -> str:
        return next((c for c in self.state if c != "-"), "-")

    @property
    def rebooting(self) -> bool:
        """Shut down for a reboot: xl prints the shutdown reason in the 5th column
        (``r`` reboot, ``s`` suspend, ``c`` crash, ``w`` watchdog)."""
        return len(self.state) >= 5 and self.state[3] == "s" and self.state[4] == "r"


class Xl:
    def __init__(self, run: Runner) -> None:
        self._run = run  # thread-safe: xl's commands may run side by side in dom0

    def __call__(self, *args: str, stdin: bytes | None = None, check: bool = True) -> str:
        rc, out, err = self._run(["xl", *args], stdin)
        if check and rc != 0:
            reason = xl_reason(err, out, rc)
            if "invalid domain identifier" in reason.lower() or "not found" in reason.lower():
                raise NotFoundError(f"xl {args[0]}: {reason}", command=args[0])
            raise HypervisorError(f"xl {args[0]} failed: {reason}", command=args[0], rc=rc,
                                  stderr=err)
        return out

    def list(self) -> list[DomInfo]:
        """`xl list` as records (Domain-0 included); the plain table is stable in 4.x."""
        out = self("list")
        rows = []
        for line in out.splitlines()[1:]:
            parts = line.split()  # xl domain names have no white space
            if len(parts) != 6:
                continue
            name, domid, mem, vcpus, state, cpu = parts
            rows.append(DomInfo(name=name, domid=int(domid), state=state,
                                memory_kib=int(mem) * 1024, vcpus=int(vcpus),
                                cpu_seconds=float(cpu)))
        return rows

    def info(self, name: str) -> DomInfo | None:
        return next((d for d in self.list() if d.name == name), None)

    def host(self) -> dict[str, str]:
        """`xl info` as a dict (host, release, nr_cpus, total_memory, xen_caps...)."""
        out: dict[str, str] = {}
        for line in self("info").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip():
                out[key.strip()] = value.strip()
        return out
