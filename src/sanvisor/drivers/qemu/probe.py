"""Choose the accelerator by booting what will run: the guest kit, under KVM.

Some hosts have a /dev/kvm that does not run normal guests: the PVM variant
(the ``kvm_pvm`` module) runs only PVM-enabled guest kernels; there a normal
guest hangs in the firmware, or QEMU aborts on an MSR it cannot set. Timing a
tiny boot sector told them apart by a number that moved with the machine's load
(1.3 s on one machine, 2.8 s on another), so the probe now boots the guest kit
itself (the kernel and initrd ``create`` uses, through the same argv builder)
and chooses KVM only if it reaches its ready marker at all within a generous
bound. The answer is cached per host boot (and per kit and QEMU binary).

``SANVISOR_ACCEL=tcg|kvm`` overrides the choice; any other value is refused.
Forcing kvm where the probe says it cannot run is allowed, with a warning that
names the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from sanvisor.errors import ConfigError, TimeoutError_
from sanvisor.waiting import wait_until

ENV = "SANVISOR_ACCEL"
KVM_BOOT_BOUND = 30.0  # seconds for the kit to reach its marker under KVM (~1 s when KVM
#                        works; ~2.5 s under TCG on these machines): "at all", not "fast"
READY = b"SANVISOR-READY"
CACHE_NAME = "accel-probe.json"

Kit = Callable[[], tuple[Path, Path | None]]


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator this host's QEMU guests run under, and why."""

    accel: str  # "kvm" | "tcg"
    reason: str  # one line
    forced: bool = False  # chosen by SANVISOR_ACCEL
    warning: str = ""  # forced against the probe's finding
    pvm: bool = False  # /dev/kvm is the PVM variant (kvm_pvm)
    kvm_boot_seconds: float | None = None  # the kit's boot under KVM, when it booted

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class BootResult:
    ok: bool
    seconds: float
    detail: str  # why not, when not ok


def forced_accel(environ: dict[str, str] | None = None) -> str | None:
    """The override from SANVISOR_ACCEL, checked: None when unset."""
    raw = (os.environ if environ is None else environ).get(ENV)
    if raw is None or raw.strip() == "":
        return None
    value = raw.strip().lower()
    if value not in ("tcg", "kvm"):
        raise ConfigError(f"{ENV}={raw!r}: not an accelerator (use tcg or kvm)",
                          variable=ENV)
    return value


def kvm_module() -> str:
    """Which KVM the host kernel has: 'pvm', 'intel', 'amd' or '' (none loaded)."""
    for mod, name in (("kvm_pvm", "pvm"), ("kvm_intel", "intel"), ("kvm_amd", "amd")):
        if Path("/sys/module", mod).exists():
            return name
    return ""


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _qemu_complaint(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "assert" in ln.lower()]
    line = (errors or lines or [""])[0]
    if line.startswith("qemu-system") and ": " in line:
        line = line.split(": ", 1)[1]
    return line.removeprefix("error: ")


def boot_kit(accel: str, kernel: Path, initrd: Path | None, *, qemu: str,
             timeout: float = KVM_BOOT_BOUND) -> BootResult:
    """Boot the guest kit under ``accel`` (the argv ``create`` would use) and wait for
    its ready marker on the console; the guest is killed either way."""
    from sanvisor.drivers.base import LaunchPlan
    from sanvisor.drivers.qemu.argv import build_argv
    from sanvisor.guestkit.build import KERNEL_ARGS
    from sanvisor.model.domain import DomainSpec

    with tempfile.TemporaryDirectory(prefix="sv-accel-") as tmp:
        rundir = Path(tmp)
        spec = DomainSpec(name="accel-probe", memory=128)
        plan = LaunchPlan(spec=spec, rundir=rundir, kernel=kernel, initrd=initrd,
                          cmdline=f"{KERNEL_ARGS} sv.hostname=accel-probe",
                          guest_channel=True)
        argv = build_argv(plan, qemu=qemu, accel=accel)
        log = rundir / "console.log"
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as exc:
            return BootResult(False, 0.0, f"cannot run {qemu}: {exc.strerror}")
        def outcome() -> BootResult | None:
            if log.exists() and READY in log.read_bytes():
                return BootResult(True, time.monotonic() - t0, "")
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                why = _qemu_complaint(err) or f"exit status {proc.returncode}"
                return BootResult(False, time.monotonic() - t0, f"QEMU stopped: {why}")
            return None

        try:
            try:
                return wait_until("the guest kit's ready marker", outcome, timeout, 0.02)
            except TimeoutError_:
                printed = log.exists() and log.stat().st_size > 0
                return BootResult(False, timeout, f"no ready marker within {timeout:.0f} s ("
                                  + ("it printed some output" if printed
                                     else "not a byte on its console") + ")")
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()


Booter = Callable[[str, Path, "Path | None"], BootResult]


class AccelProbe:
    """Decides once per host boot; ``booter`` and ``kvm_dev`` are injectable for tests."""

    def __init__(self, kit: Kit, *, qemu: str, cache_dir: Path | None = None,
                 booter: Booter | None = None, kvm_dev: str = "/dev/kvm",
                 module: Callable[[], str] = kvm_module) -> None:
        self.kit = kit
        self.qemu = qemu
        self.cache_dir = cache_dir
        self.booter = booter or (lambda a, k, i: boot_kit(a, k, i, qemu=qemu))
        self.kvm_dev = kvm_dev
        self.module = module

    def decide(self, environ: dict[str, str] | None = None) -> AccelChoice:
        forced = forced_accel(environ)
        if forced == "tcg":
            return AccelChoice("tcg", f"forced by {ENV}=tcg", forced=True,
                               pvm=self.module() == "pvm")
        probed = self.probe()
        if forced == "kvm":
            warning = "" if probed.accel == "kvm" else (
                f"{ENV}=kvm forces KVM, but the probe found it cannot run the guest kit "
                f"here: {probed.reason}")
            return AccelChoice("kvm", f"forced by {ENV}=kvm", forced=True, warning=warning,
                               pvm=probed.pvm, kvm_boot_seconds=probed.kvm_boot_seconds)
        return probed

    def probe(self) -> AccelChoice:
        if not os.path.exists(self.kvm_dev):
            return AccelChoice("tcg", f"{self.kvm_dev} does not exist")
        if not os.access(self.kvm_dev, os.R_OK | os.W_OK):
            return AccelChoice("tcg", f"{self.kvm_dev} is not accessible to uid {os.geteuid()}")
        kernel, initrd = self.kit()
        key = self._key(kernel, initrd)
        cached = self._load(key)
        if cached is not None:
            return cached
        pvm = self.module() == "pvm"
        result = self.booter("kvm", kernel, initrd)
        if result.ok:
            choice = AccelChoice("kvm", f"the guest kit booted to its ready marker under KVM "
                                 f"in {result.seconds:.1f} s", pvm=pvm,
                                 kvm_boot_seconds=round(result.seconds, 2))
        else:
            what = ("/dev/kvm is the PVM variant (kvm_pvm), which runs only PVM-enabled "
                    "guest kernels; " if pvm else "")
            choice = AccelChoice("tcg", f"{what}the guest kit under KVM: {result.detail}",
                                 pvm=pvm)
        self._store(key, choice)
        return choice

    # ---- the per-boot cache --------------------------------------------------------
    def _key(self, kernel: Path, initrd: Path | None) -> str:
        parts = [boot_id(), self.qemu, str(kernel), str(initrd)]
        for f in (kernel, initrd):
            with contextlib.suppress(OSError):
                if f is not None:
                    parts.append(str(f.stat().st_mtime_ns))
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]

    def _cache(self) -> Path | None:
        return self.cache_dir / CACHE_NAME if self.cache_dir is not None else None

    def _load(self, key: str) -> AccelChoice | None:
        cache = self._cache()
        if cache is None:
            return None
        try:
            data = json.loads(cache.read_text())
            if data.get("key") == key:
                return AccelChoice(**data["choice"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def _store(self, key: str, choice: AccelChoice) -> None:
        cache = self._cache()
        if cache is None:
            return
        with contextlib.suppress(OSError):
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "choice": choice.to_dict()}))
            tmp.replace(cache)
