"""The target side of a Xen migration, behind the driver interface: the domain's
xl.cfg written into dom0, `xl migrate-receive` (live) or `xl restore -p` (not live)
fed from a one-shot TCP listener in dom0 on the LAN (or, when dom0 has no LAN, a
one-shot unix socket of the agent's) that the source's stream arrives on."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from sanvisor.drivers.base import EventSink, IncomingMigration, Instance, LaunchPlan
from sanvisor.drivers.xen.migrate import NetReceiver, Receiver, dom0_lan, receive_argv
from sanvisor.errors import HypervisorError, SanvisorError

if TYPE_CHECKING:
    from sanvisor.drivers.xen.driver import XenDriver

log = logging.getLogger(__name__)


class XenIncoming(IncomingMigration):
    def __init__(self, drv: XenDriver, plan: LaunchPlan, events: EventSink,
                 receiver: Receiver) -> None:
        self.drv = drv
        self.plan = plan
        self.events = events
        self.receiver = receiver
        self.address = receiver.address

    @classmethod
    async def listen(cls, drv: XenDriver, plan: LaunchPlan, events: EventSink,
                     live: bool) -> XenIncoming:
        plan.rundir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cfg = await asyncio.to_thread(drv.write_config, plan)
        assert drv.spawn is not None
        argv = receive_argv(live, cfg)
        recv: Receiver
        if await asyncio.to_thread(dom0_lan, drv.run):  # dom0 to dom0 over the LAN
            recv = await asyncio.to_thread(NetReceiver, drv.spawn, argv, live)
        else:  # through the agents and the command channels
            recv = await asyncio.to_thread(Receiver, drv.spawn,
                                           plan.rundir / "migrate-in.sock", argv)
        return cls(drv, plan, events, recv)

    async def finish(self, timeout: float) -> Instance:
        await asyncio.to_thread(self.receiver.wait, timeout)
        name = self.plan.spec.name
        info = await asyncio.to_thread(self.drv.xl.info, name)
        if info is None:
            raise HypervisorError(f"migrate: {name} arrived but is gone already")
        inst = await self.drv.reattach(self.plan, info.domid, self.events)
        if inst is None:
            raise HypervisorError(f"migrate: cannot take {name} over")
        return inst

    async def abort(self) -> None:
        """No copy of an unfinished migration survives in this dom0."""
        name = self.plan.spec.name
        await asyncio.to_thread(self.receiver.cancel)
        info = await asyncio.to_thread(self.drv.xl.info, name)
        if info is not None:
            log.warning("migrate: destroying the unfinished copy of %s", name)
            why = "xl destroy failed"
            try:
                await asyncio.to_thread(self.drv.xl, "destroy", name)
            except SanvisorError as exc:  # gone all the same, or said below
                why = str(exc)
            if await asyncio.to_thread(self.drv.xl.info, name) is not None:
                raise HypervisorError(f"migrate: the unfinished copy of {name} could not "
                                      f"be destroyed ({why})", domain=name)
