"""The QEMU driver: start QEMU detached from the agent, and find it again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

from sanvisor.drivers.base import Driver, EventSink, Instance, LaunchPlan
from sanvisor.drivers.qemu import probe
from sanvisor.drivers.qemu.argv import build_argv
from sanvisor.drivers.qemu.instance import QemuInstance
from sanvisor.errors import HypervisorError

QEMU_BINARY = "qemu-system-x86_64"


def _qemu_reason(stderr: str, rc: int) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    if not lines:
        return f"exit status {rc}"
    line = lines[-1]
    prefix = QEMU_BINARY + ": "
    return line[len(prefix):] if line.startswith(prefix) else line


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_qemu(pid: int, rundir: Path) -> bool:
    """The pid is a QEMU of ours (guards against pid reuse)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(str(rundir / "qmp.sock").encode() in arg for arg in cmd)


class QemuDriver(Driver):
    name = "qemu"

    def __init__(self, *, qemu: str | None = None, accel: str | None = None,
                 cache_dir: Path | None = None) -> None:
        self.qemu = qemu or shutil.which(QEMU_BINARY) or QEMU_BINARY
        self._accel = accel
        self._cache_dir = cache_dir

    @property
    def accel(self) -> str:
        if self._accel is None:
            self._accel = "kvm" if probe.kvm_usable(self._cache_dir, self.qemu) else "tcg"
        return self._accel

    def argv(self, plan: LaunchPlan) -> list[str]:
        return build_argv(plan, qemu=self.qemu, accel=self.accel)

    async def launch(self, plan: LaunchPlan, events: EventSink) -> Instance:
        plan.rundir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in ("qmp.sock", "console.sock", "qemu.pid"):
            with contextlib.suppress(FileNotFoundError):
                (plan.rundir / stale).unlink()
        argv = self.argv(plan)
        (plan.rundir / "qemu.argv").write_text("\0".join(argv))
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            raise HypervisorError(f"cannot run {self.qemu}: {exc.strerror}") from exc
        _, err = await proc.communicate()
        if proc.returncode != 0:
            reason = _qemu_reason(err.decode(errors="replace"), proc.returncode or 0)
            raise HypervisorError(f"QEMU could not start {plan.spec.name}: {reason}",
                                  domain=plan.spec.name, stderr=err.decode(errors="replace"))
        try:
            pid = int((plan.rundir / "qemu.pid").read_text().strip())
        except (OSError, ValueError) as exc:
            raise HypervisorError(f"QEMU started {plan.spec.name} but wrote no pid file") from exc
        try:
            return await QemuInstance.connect(plan, pid, events)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            raise

    async def reattach(self, plan: LaunchPlan, pid: int, events: EventSink) -> Instance | None:
        if not _pid_alive(pid) or not _is_qemu(pid, plan.rundir):
            return None
        return await QemuInstance.connect(plan, pid, events)
