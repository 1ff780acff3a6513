"""A running QEMU domain, driven over QMP with the qemu.qmp library."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError

from sanvisor.drivers.base import (
    EventSink,
    Instance,
    LaunchPlan,
    NicPlan,
    Progress,
    RunStatus,
    Stats,
    StreamTls,
    Switchover,
)
from sanvisor.drivers.qemu import argv as qargv
from sanvisor.drivers.qemu import procstat
from sanvisor.drivers.qemu.extras import QemuExtras
from sanvisor.errors import DeviceError, HypervisorError, TimeoutError_
from sanvisor.model.domain import DiskSpec
from sanvisor.model.lifecycle import DomainEvent, EventKind
from sanvisor.model.migration import ConvergencePolicy, MigrationReport
from sanvisor.waiting import wait_until_async

log = logging.getLogger(__name__)
QMP_TIMEOUT = 30.0
KILL_WAIT_S = 5.0  # s a QEMU has to exit after `quit`, then after SIGKILL
_CR0 = re.compile(r"\bCR0=([0-9a-fA-F]+)")
_CR0_PG = 1 << 31
_IP = re.compile(r"\b[RE]IP=([0-9a-fA-F]+)")
Pred = Callable[[dict[str, Any]], bool]


def _path_is(path: str) -> Pred:
    """DEVICE_DELETED for ``path`` or a child of it (QEMU 7.2 reports only the
    CPU's lapic child when a CPU is unplugged)."""
    def pred(data: dict[str, Any]) -> bool:
        got = str(data.get("path", ""))
        return got == path or got.startswith(path + "/")
    return pred


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


class QemuInstance(QemuExtras, Instance):
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

    async def set_balloon(self, mib: int) -> None:
        await self.qmp("balloon", {"value": mib << 20})

    async def balloon_mib(self) -> int:
        info = await self.qmp("query-balloon")
        return int(info["actual"]) >> 20

    async def add_memory(self, mib: int, index: int) -> None:
        mem_id, dimm_id = f"mem{index}", f"dimm{index}"
        await self.qmp("object-add", {"qom-type": "memory-backend-ram", "id": mem_id,
                                      "size": mib << 20})
        try:
            await self.qmp("device_add", {"driver": "pc-dimm", "id": dimm_id, "memdev": mem_id})
        except HypervisorError:
            with contextlib.suppress(HypervisorError):
                await self.qmp("object-del", {"id": mem_id})
            raise

    async def _slot_free(self, path: str) -> bool:
        return not any(c.get("qom-path") == path for c in await self._cpus())

    async def _cpus(self) -> list[dict[str, Any]]:
        return list(await self.qmp("query-hotpluggable-cpus"))

    async def set_vcpus(self, count: int) -> int:
        """Plug the lowest free CPU slots, unplug the highest present ones (never CPU 0).

        Under TCG, a guest with the control channel gets Xen's PV semantics instead of
        an unplug: its extra vCPUs stay plugged and go offline inside the guest (QEMU
        7.2 cannot unplug a TCG vCPU safely, see _check_tcg_budget)."""
        def topo(c: dict[str, Any]) -> tuple[int, ...]:
            p = c["props"]
            return tuple(int(p.get(k, 0)) for k in ("socket-id", "die-id", "core-id",
                                                     "thread-id"))

        slots = sorted(await self._cpus(), key=topo)
        present = [i for i, c in enumerate(slots) if c.get("qom-path")]
        free = [i for i, c in enumerate(slots) if not c.get("qom-path")]
        cooperative = "tcg" in self.plan.accel and self.plan.guest_channel
        if count > len(present):
            self._check_tcg_budget(count - len(present))
            for i in free[: count - len(present)]:
                self._note_tcg_context()
                await self.qmp("device_add", {"driver": slots[i]["type"], "id": f"cpu{i}",
                                              **slots[i]["props"]})
                present.append(i)
        elif count < len(present) and not cooperative:
            if "tcg" in self.plan.accel:
                raise HypervisorError(
                    f"cannot unplug vCPUs of {self.plan.spec.name} under TCG: QEMU 7.2 "
                    "crashes on the next save or migration after a TCG vCPU unplug, and "
                    "this guest has no sanvisor control channel to offline them itself",
                    domain=self.plan.spec.name)
            for i in list(reversed(present))[: len(present) - count]:
                if i == 0:
                    break
                path = str(slots[i]["qom-path"])  # also names CPUs from the command line
                await self._run_until_event(
                    "device_del", {"id": path}, "DEVICE_DELETED", _path_is(path), timeout=30)

                with contextlib.suppress(TimeoutError_):  # right after the lapic goes
                    await wait_until_async(f"vCPU slot {path} to free",
                                           functools.partial(self._slot_free, path), 5.0)
                present.remove(i)
        await self.apply_pins()  # vcpu-pin also holds for vCPUs plugged later
        if cooperative:
            answer = await self.guest_request(f"vcpus {count}")
            if not answer.startswith("ok"):
                raise HypervisorError(f"the guest refused vcpus {count}: {answer}")
        return len(present)

    async def guest_request(self, line: str, timeout: float = 15.0) -> str:
        """One request on the guest-kit control channel (virtio-serial), one answer."""
        path = str(self.plan.rundir / "ctl.sock")
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path)
                try:
                    writer.write(line.encode() + b"\n")
                    await writer.drain()
                    answer = await reader.readline()
                finally:
                    writer.close()
        except (TimeoutError, OSError) as exc:
            raise HypervisorError(f"{self.plan.spec.name} did not answer on its control "
                                  f"channel ({line!r}): {exc or 'timeout'}") from exc
        return answer.decode(errors="replace").strip()

    # QEMU 7.2 under multi-threaded TCG gives each vCPU thread a TCG context and never
    # frees it (at most maxcpus per process): plugging a vCPU again after an unplug
    # aborts QEMU (tcg_register_thread: n < tcg_max_ctxs). Single-threaded TCG is no
    # way out: there, unplugging a vCPU crashes QEMU (qemu_thread_join deadlock).
    # So we count contexts and refuse, clearly, the plug that would kill the guest.
    def _tcg_file(self) -> Path:
        return self.plan.rundir / "tcg-contexts"

    def _tcg_used(self) -> int:
        try:
            return int(self._tcg_file().read_text())
        except (OSError, ValueError):
            return self.plan.vcpus_now or self.plan.spec.vcpus

    def _check_tcg_budget(self, more: int) -> None:
        if "tcg" not in self.plan.accel:
            return
        left = self.plan.spec.maxvcpus - self._tcg_used()
        if more > left:
            raise HypervisorError(
                f"cannot plug {more} more vCPU(s) into {self.plan.spec.name}: under TCG, "
                "QEMU 7.2 cannot plug a vCPU again after one was unplugged "
                f"({left} plug(s) left until the domain restarts)",
                domain=self.plan.spec.name)

    def _note_tcg_context(self) -> None:
        if "tcg" in self.plan.accel:
            self._tcg_file().write_text(str(self._tcg_used() + 1))

    async def attach_disk(self, disk: DiskSpec, index: int, source: str | None = None
                          ) -> None:
        if disk.path:
            await self.qmp("blockdev-add", qargv.disk_blockdev(disk, source))
        try:
            await self.qmp("device_add", qargv.disk_device(disk))
        except HypervisorError:
            if disk.path:
                with contextlib.suppress(HypervisorError):
                    await self.qmp("blockdev-del", {"node-name": qargv.disk_node(disk)})
            raise

    async def detach_disk(self, disk: DiskSpec) -> None:
        dev = f"dev-{disk.target}"
        await self._run_until_event("device_del", {"id": dev}, "DEVICE_DELETED",
                                    lambda d: d.get("device") == dev, timeout=30)
        if disk.path:
            try:
                await self.qmp("blockdev-del", {"node-name": qargv.disk_node(disk)})
            except HypervisorError as exc:
                raise DeviceError(f"disk {disk.target} left the guest but its backend "
                                  f"could not be closed: {exc}") from exc

    async def attach_nic(self, nic: NicPlan) -> None:
        await self.qmp("netdev_add", qargv.nic_netdev(nic))
        try:
            await self.qmp("device_add", qargv.nic_device(nic))
        except HypervisorError:
            with contextlib.suppress(HypervisorError):
                await self.qmp("netdev_del", {"id": f"net{nic.index}"})
            raise

    async def detach_nic(self, nic: NicPlan) -> None:
        dev = f"nic{nic.index}"
        await self._run_until_event("device_del", {"id": dev}, "DEVICE_DELETED",
                                    lambda d: d.get("device") == dev, timeout=30)
        await self.qmp("netdev_del", {"id": f"net{nic.index}"})

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
