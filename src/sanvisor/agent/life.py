"""A domain's life after its start: the driver's news turned into state by the one
transition function (:func:`sanvisor.model.lifecycle.decide`), the config's on_*
actions applied, reattachment after an agent restart, and the end (teardown).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
from collections.abc import Awaitable, Callable

from sanvisor.agent.host import HostResources
from sanvisor.agent.records import load_records
from sanvisor.agent.table import Domain, DomainTable
from sanvisor.drivers.base import Driver, EventSink
from sanvisor.errors import HypervisorError, SanvisorError
from sanvisor.model.domain import Action, State
from sanvisor.model.lifecycle import Busy, DomainEvent, EventKind, decide, restarts

log = logging.getLogger("sanvisor.agent")
#: s between two tries to destroy a stale copy whose destroy failed (drop_copy)
DROP_RETRY_S = 2.0
Destroy = Callable[[], Awaitable[None]]


class Lifecycle:
    def __init__(self, table: DomainTable, host: HostResources, driver: Driver) -> None:
        self.table = table
        self.host = host
        self.driver = driver
        self._tasks: set[asyncio.Task[None]] = set()
        #: uuid -> how to destroy a dying copy (drop_copy: its destroy failed)
        self.dying: dict[str, Destroy] = {}
        #: called when a domain leaves the table, with what it was busy with (a domain
        #: that left by migration: MIGRATING); agent/managed.py keeps its registration
        self.gone_hooks: list[Callable[[Domain, Busy], None]] = []

    # ---- agent start / stop --------------------------------------------------------------
    async def start(self) -> None:
        """Find every recorded domain's hypervisor process again."""
        for rec in load_records(self.table.layout.domains):
            dom = Domain(rec)
            self.table.add(dom)
            inst = None
            if rec.state is not State.LOST:
                try:
                    inst = await self.driver.reattach(self.host.launch_plan(rec), rec.pid,
                                                      self.sink(dom))
                except Exception as exc:  # the process is there but will not talk
                    log.warning("cannot reattach %s: %s", rec.spec.name, exc)
            if inst is None:
                if rec.state is State.DYING:  # a copy that had to go is gone: done
                    await self.teardown(dom)
                elif rec.state is not State.LOST:
                    self.table.set_state(dom, State.LOST, "its hypervisor process exited "
                                         "while the agent was away")
                continue
            dom.inst = inst
            if rec.state is State.DYING:  # its destroy was failing: retried from now on
                try:
                    await self.drop_copy(dom, "it was dying when the agent stopped")
                except SanvisorError as exc:
                    log.error("%s", exc)
                continue
            if await self._moved_away(dom):
                continue
            if dom.record.reason != "arriving by migration":
                try:  # a migration out of here its dead agent left half-way: ours again
                    await inst.settle_outgoing(resume=dom.record.state is State.RUNNING)
                except SanvisorError as exc:
                    log.warning("%s: %s", dom.name, exc)
            await self._reconcile(dom)

    async def _moved_away(self, dom: Domain) -> bool:
        """After a restart, a domain found running here is taken again in the pool (a
        new fencing token: a hand-over prepared before the restart cannot happen any
        more); one that another host owns now moved while the agent was away, and this
        stale copy is removed."""
        if self.table.pool is None:
            return False
        try:
            where = await self.table.pool.resume_ownership(dom.name, dom.record.uuid)
        except SanvisorError as exc:
            log.warning("%s: cannot take it again in the pool: %s", dom.name, exc)
            return False
        if where == "ours":
            return False
        log.warning("%s: %s runs it now (it moved while this agent was away): removing "
                    "the copy here", dom.name, where)
        try:
            await self.drop_copy(dom, f"{where} runs it now")
        except SanvisorError as exc:  # kept, dying, and destroyed again later
            log.error("%s", exc)
        return True

    async def stop(self) -> None:
        for dom in self.table:
            if dom.inst is not None:
                await dom.inst.close()

    async def _reconcile(self, dom: Domain) -> None:
        """After a reattach: catch up with what happened while nobody listened."""
        assert dom.inst is not None
        st = await dom.inst.status()
        news = {"shutdown": EventKind.POWERED_OFF, "guest-panicked": EventKind.CRASHED,
                "crashed": EventKind.CRASHED, "paused": EventKind.PAUSED}.get(st.status)
        if news is None and st.running:
            news = EventKind.RESUMED
        already = {EventKind.POWERED_OFF: State.SHUTDOWN, EventKind.CRASHED: State.CRASHED}
        if news is not None and already.get(news) is not dom.state:
            await self.on_event(dom, DomainEvent(news, handled=self.host.remote,
                                                 detail=f"found {st.status}"))

    # ---- the driver's news --------------------------------------------------------------
    def sink(self, dom: Domain) -> EventSink:
        async def on_event(event: DomainEvent) -> None:
            await self.on_event(dom, event)
        return on_event

    async def on_event(self, dom: Domain, event: DomainEvent) -> None:
        spec = dom.record.spec
        d = decide(dom.state, event, on_poweroff=spec.on_poweroff, on_reboot=spec.on_reboot,
                   on_crash=spec.on_crash, busy=dom.busy, reboot_pending=dom.reboot_pending)
        log.info("%s: %s%s -> %s", dom.name, event.kind.value,
                 f" ({event.detail})" if event.detail else "",
                 d.action.value if d.action else d.state.value if d.state else "no change")
        if d.clear_reboot:
            dom.reboot_pending = False
        if d.restarted and dom.inst is not None:
            dom.record.pid = dom.inst.pid  # xl restarted the domain under a new id
            dom.record.domid = self.table.registry.next_domid()  # and so do we, as xm
        if d.unplumb:
            self.host.unplumb(dom.record.nics)
        if d.forget:
            self._spawn(self.destroy_locked(dom))
        elif d.action is not None:
            await self.apply(dom, d.action, d.reason, crash=d.crash)
        elif d.state is not None:
            self.table.set_state(dom, d.state, d.reason)

    async def apply(self, dom: Domain, action: Action, why: str, crash: bool = False) -> None:
        """Carry out one of the config's on_* actions."""
        if not restarts(action):
            log.info("%s: %s, destroying (on_* = %s)", dom.name, why, action.value)
            self._spawn(self.destroy_locked(dom))
            return
        assert dom.inst is not None
        await dom.inst.reset()
        await dom.inst.unpause()
        # a rebooted domain is a new domain to xm (a new id); its QEMU and taps stay
        dom.record.domid = self.table.registry.next_domid()
        self.table.set_state(dom, State.RUNNING, why + ", restarted")

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- the end ---------------------------------------------------------------------------
    async def destroy_locked(self, dom: Domain) -> None:
        async with dom.lock:
            await self.teardown(dom)

    async def teardown(self, dom: Domain) -> None:
        """Stop the domain's process and remove every trace of it (its taps, its run
        directory, its place in the table). Idempotent."""
        was, dom.busy = dom.busy, Busy.STOPPING
        log.info("%s: gone from this host (id %d)", dom.name, dom.record.domid)
        if dom.inst is not None:
            try:
                await dom.inst.destroy()
            except SanvisorError as exc:  # it is going away anyway: say so, go on
                log.warning("%s: destroy: %s", dom.name, exc)
            await dom.inst.close()
        self.host.unplumb(dom.record.nics)
        self.table.remove(dom)
        self.dying.pop(dom.record.uuid, None)
        shutil.rmtree(self.table.layout.domain_dir(dom.record.uuid), ignore_errors=True)
        self.table.set_state(dom, State.DYING, "destroyed")
        for hook in self.gone_hooks:
            try:
                hook(dom, was)
            except Exception:  # the domain is gone whatever a hook thinks of it
                log.exception("%s: after its end", dom.name)
        if self.table.pool is not None:  # no longer runs here: the pool may start it
            await self.table.pool.release(dom.name, dom.record.uuid)

    async def drop_copy(self, dom: Domain, why: str, *, destroy: Destroy | None = None,
                        what: str = "stopped copy") -> None:
        """Remove this host's copy of a domain that must not run here (``why``: it
        migrated away, moved while the agent was away, or its incoming migration was
        given up; ``destroy``: how, by default the instance's destroy). Unlike
        :meth:`teardown`, a destroy that fails is not passed over (that would leave an
        untracked copy in the hypervisor): the copy stays in the table, dying (it can
        never run again: no verb but ``destroy`` is admitted, and that one tries the
        destroy again at once), its hold in the pool is let go, it is destroyed again
        every :data:`DROP_RETRY_S` until it is gone, and the failure is raised."""
        kill = destroy or functools.partial(self._destroy_strict, dom)
        try:
            await kill()
        except SanvisorError as exc:
            log.error("%s: %s, but its copy here could not be destroyed: %s; trying "
                      "again every %.0fs", dom.name, why, exc, DROP_RETRY_S)
            self.table.set_state(dom, State.DYING, f"{why}; destroy failed, retrying: {exc}")
            self.dying[dom.record.uuid] = kill
            if self.table.pool is not None:  # it never runs again: the pool may run it
                await self.table.pool.release(dom.name, dom.record.uuid)
            self._spawn(self._drop_later(dom, kill))
            raise HypervisorError(f"{dom.name}: {why}, but its {what} on this host could "
                                  f"not be destroyed ({exc}); the agent tries again every "
                                  f"{DROP_RETRY_S:.0f}s", domain=dom.name) from None
        await self.teardown(dom)

    async def destroy_dying(self, dom: Domain) -> None:
        """`destroy` of a dying copy (the caller holds its lock): the destroy
        :meth:`drop_copy` retries, tried again now; its failure is raised, and the copy
        stays dying (and retried)."""
        kill = self.dying.get(dom.record.uuid) or functools.partial(self._destroy_strict,
                                                                     dom)
        try:
            await kill()
        except SanvisorError as exc:
            raise HypervisorError(f"{dom.name} is dying (d): its copy on this host still "
                                  f"cannot be destroyed ({exc}); the agent tries again "
                                  f"every {DROP_RETRY_S:.0f}s", domain=dom.name) from None
        log.info("%s: the dying copy is destroyed (on request)", dom.name)
        await self.teardown(dom)

    async def _destroy_strict(self, dom: Domain) -> None:
        """The copy's destroy; its failure stands unless the copy is gone all the same."""
        if dom.inst is None:
            return
        try:
            await dom.inst.destroy()
        except SanvisorError:
            if (await dom.inst.status()).status != "gone":
                raise

    async def _drop_later(self, dom: Domain, kill: Destroy) -> None:
        while dom in self.table:
            await asyncio.sleep(DROP_RETRY_S)  # a period, not a wait for an event
            async with dom.lock:
                if dom not in self.table:
                    return
                try:
                    await kill()
                except SanvisorError as exc:
                    log.warning("%s: destroy of the stale copy failed again: %s",
                                dom.name, exc)
                    continue
                log.info("%s: the stale copy is destroyed at last", dom.name)
                await self.teardown(dom)
                return
