"""XenInstance: one domain of the Xen driver, its verbs as xl commands in dom0.

xl has no event stream: the driver's poller (:meth:`XenDriver.watch`) hands each
domain its row of `xl list`, and :meth:`XenInstance.observe` turns the changes into
the agent's events (model/lifecycle.py: paused, resumed, powered off, crashed,
restarted under a new domid, gone). xl applies on_poweroff/on_reboot/on_crash
itself, from the xl.cfg we write.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from typing import TYPE_CHECKING

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
from sanvisor.drivers.xen import xlcfg
from sanvisor.drivers.xen.console import ConsoleRelay
from sanvisor.drivers.xen.extras import XenExtras
from sanvisor.drivers.xen.xl import DomInfo
from sanvisor.errors import HypervisorError, NotFoundError
from sanvisor.model.domain import DiskSpec
from sanvisor.model.lifecycle import DomainEvent, EventKind
from sanvisor.model.migration import ConvergencePolicy, MigrationReport

if TYPE_CHECKING:
    from sanvisor.drivers.xen.driver import XenDriver

CFG_DIR = "/etc/xen/sanvisor"
SAVE_DIR = "/var/lib/xen/sanvisor-save"  # dom0's tmpfs: images pass through here
#: How long a domain that shut down to reboot may be absent from `xl list` while xl
#: builds it again.
REBOOT_GRACE = 30.0
#: Absent this long from `xl list` (no reboot seen), a domain is gone.
ABSENT_GRACE = 5.0
_XL_NEWS = {"paused": EventKind.PAUSED, "running": EventKind.RESUMED,
            "shutdown": EventKind.POWERED_OFF, "crashed": EventKind.CRASHED}
STATES = {"r": "running", "b": "running", "p": "paused", "s": "shutdown", "c": "crashed",
          "d": "dying"}



class XenInstance(XenExtras, Instance):
    def __init__(self, drv: XenDriver, plan: LaunchPlan, domid: int, events: EventSink
                 ) -> None:
        self.drv = drv
        self.xl = drv.xl
        self.plan = plan
        self.pid = domid  # the agent's "pid" of a Xen domain is its domid (-1: not yet)
        self._sink = events
        self._last = ""
        self._watching = False
        self._missing_since = 0.0
        self._cpu = 0.0
        self._running = False
        self._rebooting_until = 0.0  # until then, absence from xl list is a reboot
        self.console = (ConsoleRelay(drv.spawn, plan.spec.name, plan.rundir)
                        if drv.spawn is not None else None)

    async def attach(self, domid: int) -> None:
        """The domain exists (paused or running): console, then the state watcher."""
        self.pid = domid
        if self.console is not None:
            await self.console.start()
        self.start_watch()

    @property
    def name(self) -> str:
        return self.plan.spec.name

    async def _x(self, *args: str) -> str:
        return await asyncio.to_thread(self.xl, *args)

    def start_watch(self) -> None:
        self._watching = True
        self.drv.watch(self)

    async def observe(self, info: DomInfo | None, now: float) -> bool:
        """One look at the domain from the host's `xl list` (:meth:`XenDriver.watch`):
        the agent's events from its changes. False once it is gone for good."""
        if info is None:
            # xl may be building it again (on_reboot): the shut-down-to-reboot state
            # lasts less than a poll, so a short absence is not the end either
            self._missing_since = self._missing_since or now
            if now < self._rebooting_until or now - self._missing_since < ABSENT_GRACE:
                return True
            await self._sink(DomainEvent(EventKind.GONE, handled=True,
                                         detail=f"domid {self.pid}"))
            return False
        self._missing_since = 0.0
        if info.rebooting:
            self._rebooting_until = now + REBOOT_GRACE
            return True
        if info.domid != self.pid:  # xl restarted it (on_reboot=restart): a new domid
            self.pid = info.domid
            self._rebooting_until = 0.0
            await self._sink(DomainEvent(EventKind.RESTARTED, handled=True,
                                         domid=info.domid))
        self._cpu = info.cpu_seconds
        self._running = info.letter in "rb"
        state = STATES.get(info.letter, "running")
        if state != self._last:
            kind = _XL_NEWS.get(state)
            if kind is not None and self._last:  # xl applies the on_* actions itself
                await self._sink(DomainEvent(kind, handled=True, detail=info.state))
            self._last = state
        return True

    async def status(self) -> RunStatus:
        info = await asyncio.to_thread(self.xl.info, self.name)
        if info is None:
            return RunStatus(running=False, status="gone")
        st = STATES.get(info.letter, "running")
        return RunStatus(running=st == "running", status=st)

    async def pause(self) -> None:
        await self._x("pause", self.name)

    async def unpause(self) -> None:
        await self._x("unpause", self.name)

    async def powerdown(self) -> None:
        """`xl shutdown`; to a paused domain, the request is only left in its xenstore
        control node (what xl writes), to be seen when it runs again: xl itself would
        wait a minute for an acknowledgement that cannot come, then fail."""
        info = await asyncio.to_thread(self.xl.info, self.name)
        if info is not None and info.letter == "p":
            await self._dom0(["xenstore-write",
                              f"/local/domain/{info.domid}/control/shutdown", "poweroff"])
            return
        await self._x("shutdown", self.name)

    async def reset(self) -> None:
        await self._x("reboot", self.name)

    async def reboot(self) -> bool:
        """`xl reboot`: the guest reboots cleanly and xl starts it again (a new domid,
        seen by the watcher) as on_reboot says."""
        self._rebooting_until = time.monotonic() + REBOOT_GRACE
        await self._x("reboot", self.name)
        return True

    async def destroy(self) -> None:
        """`xl destroy`. Already gone is fine; any other failure is raised (the domain
        is still in dom0: passing over it would leave an untracked copy)."""
        with contextlib.suppress(NotFoundError):
            await self._x("destroy", self.name)

    async def settle_outgoing(self, resume: bool) -> None:
        from sanvisor.drivers.xen.migrate import settle

        await asyncio.to_thread(settle, self.drv.run, self.name, resume)

    async def save_to(self, fd: int) -> None:
        """`xl save` into dom0's tmpfs, then the image streamed out into ``fd``."""
        img = f"{SAVE_DIR}/{self.name}.{self.pid}"
        await self._dom0(["mkdir", "-p", SAVE_DIR])
        try:
            await self._x("save", self.name, img)
            await asyncio.to_thread(self.drv.read_file, img, fd)
        finally:
            with contextlib.suppress(Exception):
                await self._dom0(["rm", "-f", img])

    async def restore_from(self, fd: int) -> None:
        """The image from ``fd`` into dom0, then `xl restore -p` (left paused)."""
        img = f"{SAVE_DIR}/{self.name}.in"
        await asyncio.to_thread(self.drv.write_file, img, fd)
        try:
            cfg = f"{CFG_DIR}/{self.name}.cfg"
            await self._x("restore", "-p", cfg, img)
        finally:
            with contextlib.suppress(Exception):
                await self._dom0(["rm", "-f", img])
        info = await asyncio.to_thread(self.xl.info, self.name)
        if info is None:
            raise HypervisorError(f"xl restored {self.name} but it is gone already")
        await self.attach(info.domid)

    async def _dom0(self, argv: list[str]) -> None:
        """A program in dom0, argv only (never a shell line: names are data)."""
        rc, _out, err = await asyncio.to_thread(self.drv.run, argv, None)
        if rc != 0:
            raise HypervisorError(f"dom0: {argv[0]} failed: {err.strip()}", argv=argv)

    async def migrate_to(self, address: str, *, live: bool, policy: ConvergencePolicy,
                         progress: Progress, timeout: float,
                         switchover: Switchover | None = None,
                         tls: StreamTls | None = None) -> MigrationReport:
        """`xl migrate` (live) or `xl save -p` (not live: this copy stays paused until
        the agent tears it down) into the target's socket."""
        from sanvisor.drivers.xen.migrate import send

        assert self.drv.spawn is not None
        report = MigrationReport(live=live, status="active", policy=policy.to_dict())
        progress(report.to_dict())
        t0 = time.monotonic()
        await asyncio.to_thread(functools.partial(send, self.drv.run, self.drv.spawn,
                                                  self.name, address, timeout, live=live))
        report.status, report.total_ms = "completed", (time.monotonic() - t0) * 1000
        progress(report.to_dict())
        return report

    async def set_balloon(self, mib: int) -> None:
        await self._x("mem-set", self.name, f"{mib}m")

    async def balloon_mib(self) -> int:
        info = await asyncio.to_thread(self.xl.info, self.name)
        return (info.memory_kib >> 10) if info else 0

    async def add_memory(self, mib: int, index: int) -> None:
        # a PV guest grows by ballooning up to maxmem: raise the ceiling, no DIMM
        await self._x("mem-max", self.name, f"{self.plan.spec.maxmem}m")

    async def set_vcpus(self, count: int) -> int:
        await self._x("vcpu-set", self.name, str(count))
        return self.plan.spec.maxvcpus  # PV vCPUs stay allocated, offline in the guest

    async def attach_disk(self, disk: DiskSpec, index: int, source: str | None = None
                          ) -> None:
        await self._x("block-attach", self.name, xlcfg.disk_entry(disk))

    async def detach_disk(self, disk: DiskSpec) -> None:
        vdev = xlcfg.xen_vdev(disk.target)
        await self._x("block-detach", self.name, vdev)

    async def attach_nic(self, nic: NicPlan) -> None:
        await self._x("network-attach", self.name, *xlcfg.vif_entry(nic).split(", "))

    async def detach_nic(self, nic: NicPlan) -> None:
        await self._x("network-detach", self.name, nic.mac)

    def cpu_usage(self) -> tuple[float, int]:
        return self._cpu, 1 if self._running else 0

    async def stats(self) -> Stats:
        info = await asyncio.to_thread(self.xl.info, self.name)
        if info is None:
            return Stats(cpu_seconds=0, vcpus_busy=0, mem_kib=0, vcpus=0)
        return Stats(cpu_seconds=info.cpu_seconds, vcpus_busy=int(info.letter == "r"),
                     mem_kib=info.memory_kib, vcpus=info.vcpus)

    async def close(self) -> None:
        if self._watching:
            self._watching = False
            self.drv.unwatch(self)
        if self.console is not None:
            await self.console.close()
