"""XenDriver and XenInstance: the driver interface over xl.

There is no event stream from xl, so a watcher polls `xl list` and turns state
changes into the agent's events (model/lifecycle.py: paused, resumed, powered
off, crashed, restarted under a new domid, gone). xl applies on_poweroff/on_reboot/on_crash itself,
from the xl.cfg we write.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from sanvisor.drivers.base import (
    Driver,
    EventSink,
    IncomingMigration,
    Instance,
    LaunchPlan,
    MigrationCaps,
    NicPlan,
    Progress,
    RunStatus,
    Stats,
    StreamTls,
    Switchover,
)
from sanvisor.drivers.xen import xlcfg
from sanvisor.drivers.xen.console import ConsoleRelay, Spawn
from sanvisor.drivers.xen.extras import XenExtras, XenHostExtras, policy_lines
from sanvisor.drivers.xen.xl import DomInfo, Runner, Xl
from sanvisor.errors import HypervisorError, NotFoundError, SanvisorError
from sanvisor.model.domain import DiskSpec
from sanvisor.model.lifecycle import DomainEvent, EventKind
from sanvisor.model.migration import ConvergencePolicy, MigrationReport

log = logging.getLogger(__name__)
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


class XenDriver(XenHostExtras, Driver):
    name = "xen"
    memory_block_mib = 1  # PV guests balloon to any size up to maxmem
    console_device = "hvc0"  # a PV guest's console

    def __init__(self, run: Runner, put_file: Callable[[str, bytes], None], *,
                 spawn: Spawn | None = None, poll: float = 0.5) -> None:
        """``run``/``put_file`` reach dom0; ``spawn`` (a streaming dom0 process, see
        :meth:`sanvisor.xenhost.channel.Channel.spawn`) gives consoles and save files."""
        self.run = run
        self.xl = Xl(run)
        self._put = put_file
        self.spawn = spawn
        self.poll = poll
        self._watched: dict[int, XenInstance] = {}  # by id(): one poller for them all
        self._poller: asyncio.Task[None] | None = None

    def accelerator(self) -> dict[str, object]:
        return {"accel": "xen", "reason": "domains run under the Xen hypervisor (xl in dom0)"}

    # live: xl migrate (refused by this Xen for PV guests: no log-dirty, see migrate.py)
    migration = MigrationCaps(live=True, offline=True)

    async def incoming(self, plan: LaunchPlan, events: EventSink, *, live: bool,
                       policy: ConvergencePolicy,
                       tls: StreamTls | None = None) -> IncomingMigration:
        """The stream comes through the two agents of this machine (the lab's nested
        hosts; ``tls`` is not used: docs/pool.md, "Xen hosts")."""
        from sanvisor.drivers.xen.incoming import XenIncoming

        if self.spawn is None:
            raise HypervisorError("this dom0 link cannot stream a migration")
        return await XenIncoming.listen(self, plan, events, live)

    def disk_identities(self, disks: dict[str, str]) -> dict[str, str | None] | None:
        from sanvisor.drivers.xen.diskid import identities

        return identities(self.run, disks)

    def host_facts(self) -> dict[str, object]:
        """dom0's own facts from `xl info` (blocking: one xl run)."""
        info = self.xl.host()
        facts: dict[str, object] = {k: info[k] for k in (
            "host", "release", "machine", "xen_version", "xen_caps") if k in info}
        for k in ("nr_cpus", "total_memory", "free_memory"):
            if info.get(k, "").isdigit():
                facts[k] = int(info[k])
        return facts

    def watch(self, inst: XenInstance) -> None:
        self._watched[id(inst)] = inst
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll_xl(), name="xl-watch")

    def unwatch(self, inst: XenInstance) -> None:
        self._watched.pop(id(inst), None)

    async def _poll_xl(self) -> None:
        """One `xl list` per interval for every domain of the host (each run costs
        ~100 ms of dom0 CPU under TCG), dispatched to the domains' observers."""
        while self._watched:
            await asyncio.sleep(self.poll)
            try:
                rows = {d.name: d for d in await asyncio.to_thread(self.xl.list)}
            except (SanvisorError, OSError) as exc:  # a channel hiccup: look again later
                log.warning("xl list failed: %s", exc)
                continue
            now = time.monotonic()
            for key, inst in list(self._watched.items()):
                try:
                    alive = await inst.observe(rows.get(inst.name), now)
                except Exception:  # one domain's trouble must not stop the others'
                    log.exception("%s: watcher", inst.name)
                    continue
                if not alive:
                    self._watched.pop(key, None)

    def config_text(self, plan: LaunchPlan) -> str:
        text = xlcfg.render(plan.spec, kernel=str(plan.kernel),
                            ramdisk=str(plan.initrd) if plan.initrd else None,
                            cmdline=plan.cmdline, nics=plan.nics,
                            memory=plan.target_mib if plan.incoming else 0)
        extra = (policy_lines(plan, self.host_cpus())
                 if plan.vcpu_pins or plan.credit else [])
        return text + "".join(f"{line}\n" for line in extra)

    def write_config(self, plan: LaunchPlan) -> str:
        """The domain's xl.cfg into dom0 (restore and migrate-in read it there)."""
        path = f"{CFG_DIR}/{plan.spec.name}.cfg"
        self._put(path, self.config_text(plan).encode())
        return path

    async def launch(self, plan: LaunchPlan, events: EventSink) -> Instance:
        """`xl create -p`, the console attached, then unpaused (unless asked paused).
        With ``plan.incoming`` only the config is written: restore_from creates it."""
        path = await asyncio.to_thread(self.write_config, plan)
        inst = XenInstance(self, plan, -1, events)
        if plan.incoming:
            return inst
        try:
            await asyncio.to_thread(functools.partial(self.xl, "create", "-p", path))
        except HypervisorError as exc:
            raise _name_boot_file(exc, plan) from exc
        info = await asyncio.to_thread(self.xl.info, plan.spec.name)
        if info is None:
            raise HypervisorError(f"xl created {plan.spec.name} but it is gone already")
        try:
            await inst.attach(info.domid)
            if not plan.paused:
                await inst.unpause()
        except BaseException:
            await inst.close()
            with contextlib.suppress(SanvisorError):
                await asyncio.to_thread(self.xl, "destroy", plan.spec.name)
            raise
        return inst

    async def reattach(self, plan: LaunchPlan, pid: int, events: EventSink) -> Instance | None:
        info = await asyncio.to_thread(self.xl.info, plan.spec.name)
        if info is None or info.domid != pid:
            return None
        inst = XenInstance(self, plan, info.domid, events)
        await inst.attach(info.domid)
        return inst

    def read_file(self, path: str, fd: int) -> None:
        """Copy dom0's ``path`` into the local ``fd`` (streamed, not held in memory)."""
        if self.spawn is None:
            raise HypervisorError("this dom0 link cannot stream files")
        proc = self.spawn(["cat", path], on_out=lambda b: _write_all(fd, b))
        proc.close_stdin()
        if proc.wait() != 0:
            raise HypervisorError(f"dom0: cannot read {path}: "
                                  f"{bytes(proc.err).decode(errors='replace').strip()}")

    def write_file(self, path: str, fd: int) -> None:
        """Copy the rest of the local ``fd`` into dom0's ``path``."""
        if self.spawn is None:
            raise HypervisorError("this dom0 link cannot stream files")
        proc = self.spawn(["sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", path])
        while chunk := os.read(fd, 1 << 20):
            proc.write(chunk)
        proc.close_stdin()
        if proc.wait() != 0:
            raise HypervisorError(f"dom0: cannot write {path}: "
                                  f"{bytes(proc.err).decode(errors='replace').strip()}")

    def hypervisor_domains(self) -> list[dict[str, Any]]:
        """`xl list`, Domain-0 and domains made outside sanvisor included."""
        return [vars(d) for d in self.xl.list()]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _name_boot_file(exc: HypervisorError, plan: LaunchPlan) -> HypervisorError:
    """libxc's "xc_dom_kernel_file failed: No such file or directory" does not say
    which file: add it (a path in dom0)."""
    msg = str(exc)
    for marker, path in (("xc_dom_kernel_file", plan.kernel),
                         ("xc_dom_module_file", plan.initrd)):
        if marker in msg and path is not None:
            return HypervisorError(f"{msg} (dom0 path {path})", **exc.context)
    return exc
