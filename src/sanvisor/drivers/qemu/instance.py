"""A running QEMU domain, driven over QMP with the qemu.qmp library."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Callable
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError

from sanvisor.drivers.base import (
    EventSink,
    Instance,
    LaunchPlan,
    Progress,
    RunStatus,
    Stats,
    StreamTls,
    Switchover,
)
from sanvisor.drivers.qemu import procstat
from sanvisor.drivers.qemu.extras import QemuExtras
from sanvisor.drivers.qemu.hotplug import Pred, QemuHotplug
from sanvisor.errors import HypervisorError, TimeoutError_
from sanvisor.model.lifecycle import DomainEvent, EventKind
from sanvisor.model.migration import ConvergencePolicy, MigrationReport
from sanvisor.waiting import wait_until_async

log = logging.getLogger(__name__)
QMP_TIMEOUT = 30.0
KILL_WAIT_S = 5.0  # s a QEMU has to exit after `quit`, then after SIGKILL
_CR0 = re.compile(r"\bCR0=([0-9a-fA-F]+)")
_CR0_PG = 1 << 31
_IP = re.compile(r"\b[RE]IP=([0-9a-fA-F]+)")


#: QMP SHUTDOWN reasons (qapi/run-state.json ShutdownCause) -> what the guest did;
#: host-qmp-quit is our own destroy, not news.
_SHUTDOWN = {"guest-shutdown": EventKind.POWERED_OFF, "host-qmp-system-powerdown":
             EventKind.POWERED_OFF, "host-signal": EventKind.POWERED_OFF,
             "host-ui": EventKind.POWERED_OFF, "guest-reset": EventKind.RESET_REQUESTED,
             "guest-panic": EventKind.CRASHED}


def domain_event(name: str, data: dict[str, Any]) -> DomainEvent | None:
    """A QMP event as the agent's lifecycle sees it (None: not the lifecycle's news:
    RESET after our own system_reset, MIGRATION, DEVICE_DELETED...)."""
    if name == "STOP":
        return DomainEvent(EventKind.PAUSED)
    if name == "RESUME":
        return DomainEvent(EventKind.RESUMED)
    if name == "GUEST_PANICKED":
        return DomainEvent(EventKind.CRASHED, detail=str(data.get("action", "")))
    if name == "SHUTDOWN":
        reason = str(data.get("reason", ""))
        kind = _SHUTDOWN.get(reason)
        return DomainEvent(kind, detail=reason) if kind is not None else None
    return None


def _data(ev: Any) -> dict[str, Any]:
    raw = ev.get("data", {})
    return dict(raw) if isinstance(raw, dict) else {}


class QemuInstance(QemuExtras, QemuHotplug, Instance):
    def __init__(self, plan: LaunchPlan, pid: int, qmp: QMPClient, events: EventSink) -> None:
        self.plan = plan
        self.pid = pid
        self._qmp = qmp
        self._sink = events
        self._pump: asyncio.Task[None] | None = None
        self._exit_fd: int | None = None
        self._exited = asyncio.Event()
        self._exit_task: asyncio.Future[None] | None = None
        self._reap: Callable[[int], None] | None = None

    # ---- lifecycle of the connection -------------------------------------------------
    @classmethod
    async def connect(cls, plan: LaunchPlan, pid: int, events: EventSink,
                      reap: Callable[[int], None] | None = None) -> QemuInstance:
        qmp = QMPClient(plan.spec.name)
        try:
            await asyncio.wait_for(qmp.connect(str(plan.rundir / "qmp.sock")), QMP_TIMEOUT)
        except (TimeoutError, ConnectError, OSError) as exc:
            raise HypervisorError(
                f"cannot reach QEMU's monitor for {plan.spec.name}: {exc}", domain=plan.spec.name
            ) from exc
        inst = cls(plan, pid, qmp, events)
        inst._reap = reap
        inst._start_watch()
        return inst

    def _start_watch(self) -> None:
        self._pump = asyncio.create_task(self._pump_events(), name=f"qmp-{self.plan.spec.name}")
        try:
            self._exit_fd = os.pidfd_open(self.pid)
        except OSError:
            self._exited.set()
            return
        asyncio.get_running_loop().add_reader(self._exit_fd, self._on_exit)

    def _on_exit(self) -> None:
        if self._exit_fd is not None:
            asyncio.get_running_loop().remove_reader(self._exit_fd)
            os.close(self._exit_fd)
            self._exit_fd = None
        if self._reap is not None:
            self._reap(self.pid)
        self._exited.set()
        self._exit_task = asyncio.ensure_future(self._sink(DomainEvent(
            EventKind.EXITED, detail=f"pid {self.pid}")))

    async def _pump_events(self) -> None:
        try:
            async for ev in self._qmp.events:
                event = domain_event(str(ev["event"]), _data(ev))
                if event is None:
                    continue
                try:
                    await self._sink(event)
                except Exception:
                    log.exception("event handler failed for %s", ev.get("event"))
        except asyncio.CancelledError:
            pass

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._pump
        if self._exit_fd is not None:
            asyncio.get_running_loop().remove_reader(self._exit_fd)
            os.close(self._exit_fd)
            self._exit_fd = None
        with contextlib.suppress(Exception):
            await self._qmp.disconnect()

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    async def wait_exit(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
            return True
        except TimeoutError:
            return False

    # ---- QMP helpers -------------------------------------------------------------------
    async def qmp(self, cmd: str, args: dict[str, Any] | None = None,
                  timeout: float = QMP_TIMEOUT) -> Any:
        try:
            return await asyncio.wait_for(self._qmp.execute(cmd, args), timeout)
        except ExecuteError as exc:
            raise HypervisorError(f"QEMU refused {cmd}: {exc}", command=cmd,
                                  qemu_class=exc.error_class) from exc
        except TimeoutError as exc:
            raise TimeoutError_(f"QEMU did not answer {cmd} within {timeout:.0f}s",
                                command=cmd) from exc
        except QMPError as exc:
            raise HypervisorError(f"QMP {cmd} failed: {exc}", command=cmd) from exc

    async def _run_until_event(self, cmd: str, args: dict[str, Any], name: str,
                               done: Pred, timeout: float) -> dict[str, Any]:
        listener = EventListener(name)
        with self._qmp.listen(listener):
            await self.qmp(cmd, args)
            try:
                async with asyncio.timeout(timeout):
                    while True:
                        ev = await listener.get()
                        data = _data(ev)
                        if done(data):
                            return data
            except TimeoutError as exc:
                raise TimeoutError_(f"no {name} event after {cmd} within {timeout:.0f}s",
                                    command=cmd) from exc

    # ---- verbs ----------------------------------------------------------------------
    async def status(self) -> RunStatus:
        st = await self.qmp("query-status")
        return RunStatus(running=bool(st["running"]), status=str(st["status"]))

    async def pause(self) -> None:
        await self.qmp("stop")

    async def unpause(self) -> None:
        await self.qmp("cont")

    async def powerdown(self) -> None:
        await self.qmp("system_powerdown")

    async def reset(self) -> None:
        await self.qmp("system_reset")

    async def destroy(self) -> None:
        """QEMU gone: `quit`, else SIGKILL. One that outlives SIGKILL (stuck in the
        kernel) is said, not passed over: its caller keeps the copy (agent/life.py)."""
        if not self.exited:
            with contextlib.suppress(HypervisorError, TimeoutError_):
                await self.qmp("quit", timeout=KILL_WAIT_S)
            if not await self.wait_exit(KILL_WAIT_S):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, 9)
                if not await self.wait_exit(KILL_WAIT_S):
                    raise HypervisorError(f"{self.plan.spec.name}: its QEMU (pid "
                                          f"{self.pid}) is still there {KILL_WAIT_S:.0f}s "
                                          "after SIGKILL", domain=self.plan.spec.name)
        self.drop_credit()  # its cgroup (sched-credit), once its process is gone

    def qmp_events(self, listener: EventListener) -> Any:
        """A context in which ``listener`` receives QMP's events."""
        return self._qmp.listen(listener)

    async def migrate_to(self, address: str, *, live: bool, policy: ConvergencePolicy,
                         progress: Progress, timeout: float,
                         switchover: Switchover | None = None,
                         tls: StreamTls | None = None) -> MigrationReport:
        from sanvisor.drivers.qemu import migrate

        return await migrate.send(self, address, live=live, policy=policy,
                                  progress=progress, timeout=timeout, switchover=switchover,
                                  tls=tls)

    async def settle_outgoing(self, resume: bool) -> None:
        from sanvisor.drivers.qemu import migrate

        await migrate.settle(self, resume)

    async def _migration(self, cmd: str, args: dict[str, Any], timeout: float) -> str:
        """Run a migration command; wait for its end by MIGRATION events (and polls)."""
        await self.qmp("migrate-set-capabilities",
                       {"capabilities": [{"capability": "events", "state": True}]})
        final = ("completed", "failed", "cancelled")
        listener = EventListener("MIGRATION")
        with self._qmp.listen(listener):
            await self.qmp(cmd, args)
            deadline = asyncio.get_running_loop().time() + timeout
            while asyncio.get_running_loop().time() < deadline:
                try:
                    ev = await asyncio.wait_for(listener.get(), 0.5)
                    status = str(_data(ev).get("status"))
                except TimeoutError:
                    info = await self.qmp("query-migrate")
                    status = str(info.get("status"))
                    # 'completed' with total-time 0 is seen on QEMU 7.2: ask again
                    if status == "completed" and not info.get("total-time", 1):
                        continue
                if status in final:
                    return status
        raise TimeoutError_(f"{cmd} did not finish within {timeout:.0f}s", command=cmd)

    async def save_to(self, fd: int) -> None:
        self._qmp.send_fd_scm(fd)
        await self.qmp("getfd", {"fdname": "svsave"})
        # never TLS into a file (a migration over TLS may have left its creds set)
        await self.qmp("migrate-set-parameters", {"max-bandwidth": 8 << 30,
                                                  "tls-creds": ""})
        status = await self._migration("migrate", {"uri": "fd:svsave"}, timeout=600)
        if status != "completed":
            info = await self.qmp("query-migrate")
            raise HypervisorError(f"save failed: {info.get('error-desc', status)}")

    async def restore_from(self, fd: int) -> None:
        self._qmp.send_fd_scm(fd)
        await self.qmp("getfd", {"fdname": "svrestore"})
        status = await self._migration("migrate-incoming", {"uri": "fd:svrestore"}, 600)
        if status != "completed":
            raise HypervisorError(f"restore failed: {self.log_tail() or status}")

    async def wait_alive(self, timeout: float) -> str | None:
        """A sign of life: a byte on the console, or vCPU 0 running with paging on (a
        kernel runs: firmware and option ROMs never enable paging). The PVM variant of
        KVM leaves a normal guest in SeaBIOS forever, silent; that must not pass as a
        started domain."""
        log = self.plan.rundir / "console.log"
        where = ["its vCPU never ran"]

        async def settled() -> tuple[str | None] | None:
            if self.exited:
                return (f"QEMU exited ({self.log_tail() or 'no message'})",)
            with contextlib.suppress(OSError):
                if log.stat().st_size > 0:
                    return (None,)
            regs = str(await self.qmp("human-monitor-command",
                                      {"command-line": "info registers"}))
            cr0 = _CR0.search(regs)
            if cr0 and int(cr0.group(1), 16) & _CR0_PG:
                return (None,)
            ip = _IP.search(regs)
            if ip:
                where[0] = (f"its vCPU is still in the firmware (instruction pointer "
                            f"{int(ip.group(1), 16):#x}, paging off, not a byte on its "
                            "console)")
            return None

        try:
            found = await wait_until_async(f"a sign of life from {self.plan.spec.name}",
                                           settled, timeout, 0.05)
        except TimeoutError_:
            return where[0]
        return found[0]

    def log_tail(self) -> str:
        """QEMU's last complaint, from its log (it explains failed migrations)."""
        try:
            lines = (self.plan.rundir / "qemu.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        lines = [ln.removeprefix("qemu-system-x86_64: ") for ln in lines if ln.strip()]
        return "; ".join(lines[-2:])

    def cpu_usage(self) -> tuple[float, int]:
        return procstat.cpu_usage(self.pid)

    async def stats(self) -> Stats:
        cpu, busy = procstat.cpu_usage(self.pid)
        mem_kib = (await self.balloon_mib()) << 10
        vcpus = len([c for c in await self._cpus() if c.get("qom-path")])
        st = Stats(cpu_seconds=cpu, vcpus_busy=busy, mem_kib=mem_kib, vcpus=vcpus)
        for dev in await self.qmp("query-blockstats"):
            s = dev.get("stats", {})
            st.blk_rd_bytes += int(s.get("rd_bytes", 0))
            st.blk_wr_bytes += int(s.get("wr_bytes", 0))
            st.blk_rd_ops += int(s.get("rd_operations", 0))
            st.blk_wr_ops += int(s.get("wr_operations", 0))
        for nic in self.plan.nics:
            if nic.tap:
                rx, tx = procstat.tap_bytes(nic.tap)
                # the tap's tx is what the guest received
                st.net_rx_bytes += tx
                st.net_tx_bytes += rx
        return st
