"""The QEMU driver: start QEMU detached from the agent, and find it again."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path

from sanvisor.drivers.base import (
    Driver,
    EventSink,
    IncomingMigration,
    Instance,
    LaunchPlan,
    MigrationCaps,
    StreamTls,
)
from sanvisor.drivers.qemu.argv import build_argv
from sanvisor.drivers.qemu.binary import QEMU_BINARY, qemu_binary, qemu_version
from sanvisor.drivers.qemu.instance import QemuInstance
from sanvisor.drivers.qemu.probe import AccelChoice, AccelProbe, Kit
from sanvisor.errors import HypervisorError
from sanvisor.model.migration import ConvergencePolicy
from sanvisor.waiting import wait_until_async

log = logging.getLogger(__name__)
START_TIMEOUT = 60.0


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
    needle = str(rundir / "qmp.sock").replace(",", ",,").encode()  # as argv.py writes it
    return any(needle in arg for arg in cmd)


class QemuDriver(Driver):
    name = "qemu"

    def __init__(self, *, kit: Kit | None = None, qemu: str | None = None,
                 accel: str | None = None, cache_dir: Path | None = None) -> None:
        """``kit``: the guest kit's (kernel, initrd), booted by the accelerator probe.
        ``accel``: skip the probe (tests, or a caller that decided already)."""
        self.qemu = qemu or qemu_binary()
        self._choice = AccelChoice(accel, "given by the caller") if accel else None
        self._probe = AccelProbe(kit, qemu=self.qemu, cache_dir=cache_dir) if kit else None
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def choice(self) -> AccelChoice:
        """The accelerator and why (probes once, blocking: call it off the event loop
        the first time). Raises ConfigError for a bad SANVISOR_ACCEL."""
        if self._choice is None:
            if self._probe is None:
                self._choice = AccelChoice("tcg", "no guest kit to probe KVM with")
            else:
                self._choice = self._probe.decide()
        return self._choice

    @property
    def accel(self) -> str:
        return self.choice.accel

    def accelerator(self) -> dict[str, object]:
        return self.choice.to_dict()

    def hypervisor_version(self) -> str:
        return qemu_version(self.qemu)

    def host_facts(self) -> dict[str, object]:
        """Which QEMU runs the guests (drivers/qemu/binary.py), as `xm info` names Xen's
        version."""
        return {"qemu": self.qemu, "qemu_version": self.hypervisor_version()}

    def argv(self, plan: LaunchPlan) -> list[str]:
        plan.accel = self.accel
        return build_argv(plan, qemu=self.qemu, accel=self.accel)

    async def launch(self, plan: LaunchPlan, events: EventSink) -> Instance:
        """Start QEMU in a session of its own (so the agent's death does not touch it),
        its output in rundir/qemu.log; return once its monitor answers."""
        plan.rundir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in ("qmp.sock", "console.sock"):
            with contextlib.suppress(FileNotFoundError):
                (plan.rundir / stale).unlink()
        argv = self.argv(plan)
        (plan.rundir / "qemu.argv").write_text("\0".join(argv))
        logpath = plan.rundir / "qemu.log"
        try:
            with open(logpath, "ab") as log:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=log, start_new_session=True, umask=0o077)
        except OSError as exc:
            raise HypervisorError(f"cannot run {self.qemu}: {exc.strerror}") from exc
        self._children[proc.pid] = proc

        async def monitor() -> Instance | None:
            if proc.poll() is not None:
                text = logpath.read_text(errors="replace")
                reason = _qemu_reason(text, proc.returncode or 0)
                raise HypervisorError(f"QEMU could not start {plan.spec.name}: {reason}",
                                      domain=plan.spec.name, log=text[-2000:])
            if not (plan.rundir / "qmp.sock").exists():
                return None
            try:
                return await QemuInstance.connect(plan, proc.pid, events, reap=self._reap)
            except HypervisorError:
                return None  # the socket is there but not listening yet

        inst: QemuInstance | None = None
        try:
            got = await wait_until_async(f"QEMU's monitor for {plan.spec.name}", monitor,
                                         START_TIMEOUT, 0.01)
            assert isinstance(got, QemuInstance)
            inst = got
            await inst.apply_pins()  # vcpu-pin and sched-credit outlive a save or a move
            inst.apply_credit()
            return inst
        except BaseException:
            if inst is not None:
                await inst.close()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            self._children.pop(proc.pid, None)
            raise

    migration = MigrationCaps(live=True, offline=True, postcopy=True)

    async def incoming(self, plan: LaunchPlan, events: EventSink, *, live: bool,
                       policy: ConvergencePolicy,
                       tls: StreamTls | None = None) -> IncomingMigration:
        """QEMU with the domain's devices, waiting for the stream: over TLS on the host's
        pool address when ``tls`` is given, else on a unix socket in its run directory."""
        from sanvisor.drivers.qemu.migrate import QemuIncoming

        plan.incoming, plan.paused = True, True  # -S: it runs only once switched over
        inst = await self.launch(plan, events)
        assert isinstance(inst, QemuInstance)
        try:
            return await QemuIncoming.listen(inst, live and policy.postcopy_after_s
                                             is not None, tls)
        except BaseException:
            try:  # a QEMU that outlives SIGKILL is said (the first error as its context)
                await inst.destroy()
            finally:
                await inst.close()
            raise

    def _reap(self, pid: int) -> None:
        proc = self._children.pop(pid, None)
        if proc is not None:
            rc = proc.wait()
            if rc != 0:  # a signal is negative: -9 killed, -11 crashed, -6 aborted
                log.warning("QEMU pid %d exited with status %d", pid, rc)

    async def reattach(self, plan: LaunchPlan, pid: int, events: EventSink) -> Instance | None:
        if not _pid_alive(pid) or not _is_qemu(pid, plan.rundir):
            return None
        plan.accel = self.accel
        return await QemuInstance.connect(plan, pid, events)
