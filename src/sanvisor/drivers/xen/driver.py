"""XenDriver: the driver interface over xl, for one Xen host's dom0.

The host's side of the driver: launch and reattach (an xl.cfg written into dom0,
`xl create -p`), one `xl list` poller for all its domains (their events come from
:meth:`XenInstance.observe`, drivers/xen/instance.py), host facts and files in dom0.
How dom0 is reached is injected: ``run``/``put_file``/``spawn`` of the local dom0
(drivers/xen/local.py, the agent runs there) or of another transport.
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
    StreamTls,
)
from sanvisor.drivers.xen import xlcfg
from sanvisor.drivers.xen.console import Spawn
from sanvisor.drivers.xen.extras import XenHostExtras, policy_lines
from sanvisor.drivers.xen.instance import CFG_DIR, XenInstance
from sanvisor.drivers.xen.xl import Runner, Xl
from sanvisor.errors import HypervisorError, SanvisorError
from sanvisor.model.migration import ConvergencePolicy

__all__ = ["CFG_DIR", "XenDriver", "XenInstance"]
log = logging.getLogger(__name__)


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
