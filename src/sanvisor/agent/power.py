"""pause, unpause, shutdown, reboot, destroy: a domain's power, as xm's verbs."""

from __future__ import annotations

import asyncio
from typing import Any

from sanvisor.agent.verbbase import VerbBase
from sanvisor.errors import SanvisorError
from sanvisor.model import lifecycle
from sanvisor.model.domain import State


class PowerVerbs(VerbBase):
    async def pause(self, ref: str) -> dict[str, Any]:
        dom = self.find(ref)
        async with dom.lock:
            await self.admit(dom, "pause").pause()
            self.table.set_state(dom, State.PAUSED)
        return self.view(dom)

    async def unpause(self, ref: str) -> dict[str, Any]:
        dom = self.find(ref)
        async with dom.lock:
            await self.admit(dom, "unpause").unpause()
            self.table.set_state(dom, State.RUNNING)
        return self.view(dom)

    async def shutdown(self, ref: str, *, wait: bool, timeout: float) -> dict[str, Any]:
        """The ACPI power button (xl shutdown); ``wait``: until the guest is down (gone,
        or kept shut down by on_poweroff=preserve)."""
        dom = self.find(ref)
        async with dom.lock:
            await self.admit(dom, "shutdown").powerdown()
        if wait:
            await self.table.wait_for(
                dom, lambda: dom not in self.table
                or dom.state in (State.SHUTDOWN, State.CRASHED, State.LOST),
                timeout, "the guest did not shut down (it may ignore the ACPI power button)")
        return self.view(dom)

    async def reboot(self, ref: str, *, wait: bool = False, timeout: float = 60.0
                     ) -> dict[str, Any]:
        """A clean reboot: the guest shuts down on the ACPI power button (running its
        shutdown scripts), and the agent powers it on again instead of stopping it
        (Xen: xl reboot does all of it). It comes back under a new domain id, as in xm;
        ``wait``: until it runs again (xl builds it paused first), or is gone if its
        on_reboot says so."""
        dom = self.find(ref)
        async with dom.lock:
            inst = self.admit(dom, "reboot")
            before = dom.record.domid
            if not await inst.reboot():
                dom.reboot_pending = True
                await inst.powerdown()
        if wait:
            await self.table.wait_for(
                dom, lambda: dom not in self.table or (dom.record.domid != before and
                                                       dom.state in lifecycle.RUNNING),
                timeout, "the guest did not reboot (it may ignore the ACPI power button)")
        return self.view(dom)

    async def all_domains(self, verb: str, *, wait: bool, timeout: float
                          ) -> list[dict[str, Any]]:
        """shutdown -a / reboot -a: every running or paused domain of this host at once;
        one row per domain, with ``error`` where it failed (the others go on)."""
        doms = sorted((d for d in self.table if d.state in lifecycle.LIVE
                       and d.busy is lifecycle.Busy.NONE),  # not one moving by migration
                      key=lambda d: d.record.domid)

        async def one(uuid: str) -> dict[str, Any]:
            if verb == "reboot":
                return await self.reboot(uuid, wait=wait, timeout=timeout)
            return await self.shutdown(uuid, wait=wait, timeout=timeout)

        got = await asyncio.gather(*(one(d.record.uuid) for d in doms),
                                   return_exceptions=True)
        rows = []
        for dom, res in zip(doms, got, strict=True):
            if isinstance(res, SanvisorError):
                rows.append({**self.view(dom), "error": str(res)})
            elif isinstance(res, BaseException):
                raise res
            else:
                rows.append(res)
        return rows

    async def destroy(self, ref: str) -> dict[str, Any]:
        """Pull the plug. A dying copy (one whose destroy failed, kept and retried by
        the agent) is destroyed again at once, and a failure is said, not passed over."""
        dom = self.find(ref)
        async with dom.lock:
            if dom.state is State.DYING and dom in self.table:
                await self.life.destroy_dying(dom)
            else:
                await self.life.teardown(dom)
        return self.view(dom)
