"""pause, unpause, shutdown, reboot, destroy: a domain's power, as xm's verbs."""

from __future__ import annotations

from typing import Any

from sanvisor.agent.verbbase import VerbBase
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

    async def reboot(self, ref: str) -> dict[str, Any]:
        """A clean reboot: the guest shuts down on the ACPI power button (running its
        shutdown scripts), and the agent powers it on again instead of stopping it
        (Xen: xl reboot does all of it)."""
        dom = self.find(ref)
        async with dom.lock:
            inst = self.admit(dom, "reboot")
            if not await inst.reboot():
                dom.reboot_pending = True
                await inst.powerdown()
        return self.view(dom)

    async def destroy(self, ref: str) -> dict[str, Any]:
        dom = self.find(ref)
        async with dom.lock:
            await self.life.teardown(dom)
        return self.view(dom)
