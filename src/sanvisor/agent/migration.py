"""`migrate [-l] DOM HOST`: move a domain to another host's agent, through the
driver's migration hooks (drivers/base.py: ``Driver.incoming`` on the target,
``Instance.migrate_to`` on the source); no hypervisor is named here.

Phases, each with a defined outcome on failure:

1. preflight (source): the domain's state admits it; every disk has an identity
   another host can prove it shares (a map's WWID, a device's WWID or dm uuid, a
   read-only file's bytes; a writable file is refused).
2. prepare (target, ``POST /v1/migrate/incoming``): the record checked as input
   from outside; the name, uuid and MACs free there; every disk present with the
   same identity (the seed's trap: the same path naming another LUN is refused,
   both WWIDs named); bridges present; memory free; the same accelerator (CPU
   model). The domain enters the target's table (busy: its news is the
   migration's) and the hypervisor listens. Failure: nothing was done.
3. transfer (source): the driver sends it with the convergence policy. Failure,
   cancel or timeout: the target is aborted (its copy destroyed), the source's
   copy runs on (a paused one resumed).
4. switch-over and confirm (target, ``POST /v1/migrate/{uuid}/finish``): the
   target takes the domain and resumes it if it was running; then the source
   tears its own stopped copy down. A finish that fails: the target is cleaned
   and the source's copy resumed. An incoming migration neither finished nor
   aborted expires, and is cleaned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sanvisor.agent.host import HostResources
from sanvisor.agent.life import Lifecycle
from sanvisor.agent.records import DomainRecord
from sanvisor.agent.service import HostService
from sanvisor.agent.table import Domain, DomainTable
from sanvisor.api.client import AgentClient
from sanvisor.drivers.base import IncomingMigration
from sanvisor.drivers.xen.diskid import check_movable, check_same
from sanvisor.errors import ConflictError, HypervisorError, RecordError
from sanvisor.model.domain import State
from sanvisor.model.lifecycle import Busy
from sanvisor.model.migration import ConvergencePolicy

log = logging.getLogger("sanvisor.agent")
MIGRATE_TIMEOUT = 600.0


def _modes(rec: DomainRecord) -> dict[str, str]:
    """path -> "r"/"w" for each of the domain's disks with a backing path."""
    return {d.path: d.mode for d in rec.spec.disks if d.path}


@dataclass
class Incoming:
    dom: Domain
    mig: IncomingMigration
    expiry: asyncio.TimerHandle | None = None


class Migrations:
    def __init__(self, svc: HostService) -> None:
        self.svc = svc
        self.pending: dict[str, Incoming] = {}
        self.progress: dict[str, dict[str, Any]] = {}  # uuid -> the source's progress

    @property
    def table(self) -> DomainTable:
        return self.svc.table

    @property
    def host(self) -> HostResources:
        return self.svc.host

    @property
    def life(self) -> Lifecycle:
        return self.svc.life

    # ---- source ----------------------------------------------------------------------
    async def migrate(self, ref: str, target_socket: str, live: bool,
                      policy: ConvergencePolicy | None = None) -> dict[str, Any]:
        policy = policy or ConvergencePolicy()
        drv = self.svc.driver
        dom = self.table.find(ref)
        async with dom.lock:
            inst = self.svc.admit(dom, "migrate")
            caps = drv.migration
            if not (caps.live if live else caps.offline):
                raise HypervisorError(f"migrate: the {drv.name} driver cannot move a domain"
                                      f"{' live' if live else ''}")
            rec = dom.record
            ids = await asyncio.to_thread(self.host.identities, _modes(rec))
            check_movable(ids)
            target = AgentClient(Path(target_socket))
            prep = await asyncio.to_thread(
                target.call, "POST", "/v1/migrate/incoming",
                {"record": rec.to_dict(), "disks": ids, "live": live,
                 "policy": policy.to_dict(), "driver": drv.name,
                 "accelerator": drv.accelerator()["accel"]})
            was_running = rec.state is State.RUNNING
            dom.busy = Busy.MIGRATING  # the hypervisor's news of a leaving domain is ours
            progress = self.progress.setdefault(rec.uuid, {})
            try:
                report = await inst.migrate_to(str(prep["address"]), live=live,
                                               policy=policy, progress=progress.update,
                                               timeout=MIGRATE_TIMEOUT)
                info: dict[str, Any] = await asyncio.to_thread(
                    target.call, "POST", f"/v1/migrate/{rec.uuid}/finish",
                    {"resume": was_running})
            except BaseException:
                dom.busy = Busy.NONE
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(target.call, "POST",
                                            f"/v1/migrate/{rec.uuid}/abort", {})
                if was_running:  # ours is the copy that lives: running, as it was
                    with contextlib.suppress(Exception):
                        await inst.unpause()
                raise
            finally:
                self.progress.pop(rec.uuid, None)
            await self.life.teardown(dom)  # our stopped copy; the target runs it now
        return {**info, "migration": report.to_dict()}

    def status(self, ref: str) -> dict[str, Any]:
        """A migration in progress from here (for `migrate`'s progress bar)."""
        dom = self.table.find(ref)
        return {"name": dom.name, "migrating": dom.busy is Busy.MIGRATING,
                **self.progress.get(dom.record.uuid, {})}

    # ---- target ----------------------------------------------------------------------
    async def incoming(self, body: dict[str, Any]) -> dict[str, str]:
        drv = self.svc.driver
        try:
            rec = DomainRecord.from_untrusted(body.get("record"))
        except RecordError as exc:
            raise RecordError(f"migrate: {exc}") from None
        live = bool(body.get("live"))
        if body.get("driver") not in (None, drv.name):
            raise ConflictError(f"migrate: the target runs {drv.name}, the domain runs "
                                f"under {body.get('driver')}")
        accel = drv.accelerator()["accel"]
        if body.get("accelerator") not in (None, accel):
            raise ConflictError(f"migrate: the target's CPUs run under {accel}, the "
                                f"source's under {body.get('accelerator')} (not the same "
                                "CPU model)")
        try:
            policy = ConvergencePolicy.from_dict(body.get("policy"))
        except ValueError as exc:
            raise RecordError(f"migrate: {exc}") from None
        if rec.uuid in self.pending:
            raise ConflictError(f"migrate: {rec.spec.name} is already on its way here")
        self.table.check_free(rec.spec.name, rec.uuid, [n.mac for n in rec.nics])
        modes = _modes(rec)
        disks = dict(body.get("disks") or {})
        if set(disks) != set(modes):
            raise ConflictError("migrate: the source's disk identities do not match the "
                                "domain's disks")
        check_same(disks, await asyncio.to_thread(self.host.identities, modes))
        self.host.check_bridges(rec.nics)
        self.host.check_memory(rec.spec.memory + sum(rec.dimms_mib))
        rec.domid = self.table.registry.next_domid()
        rec.pid = 0  # the source's process id means nothing here (and must not be shown)
        rec.state, rec.reason = State.PAUSED, "arriving by migration"
        rec.created = time.time()
        for nic in rec.nics:
            nic.tap = None
        dom = Domain(rec, busy=Busy.MIGRATING)
        self.table.add(dom)  # its name, uuid and MACs are taken from now on
        try:
            self.host.plumb(rec.domid, rec.nics)
            mig = await drv.incoming(self.host.launch_plan(rec, incoming=True),
                                     self.life.sink(dom), live=live, policy=policy)
        except BaseException:
            await self.life.teardown(dom)
            raise
        rec.pid = mig.pid
        self.table.save(dom)
        pending = Incoming(dom, mig)
        pending.expiry = asyncio.get_running_loop().call_later(
            MIGRATE_TIMEOUT + 60, lambda: asyncio.ensure_future(self._expire(rec.uuid)))
        self.pending[rec.uuid] = pending
        return {"address": mig.address}

    async def finish(self, uuid: str, resume: bool) -> dict[str, Any]:
        pending = self._take(uuid)
        if pending is None:
            raise ConflictError(f"migrate: no incoming migration {uuid}")
        dom = pending.dom
        try:
            inst = await pending.mig.finish(MIGRATE_TIMEOUT)
            dom.inst = inst
            dom.record.pid = inst.pid
            running = (await inst.status()).running
            if resume and not running:
                await inst.unpause()
        except BaseException:
            await self._clean(pending)
            raise
        dom.busy = Busy.NONE
        self.table.set_state(dom, State.RUNNING if resume else State.PAUSED, "migrated in")
        return self.svc.info(dom)

    async def abort(self, uuid: str) -> None:
        """The source gave up: nothing of the incoming domain is left here."""
        pending = self._take(uuid)
        if pending is not None:
            await self._clean(pending)

    async def _expire(self, uuid: str) -> None:
        if uuid in self.pending:
            log.warning("migrate: incoming %s neither finished nor aborted; cleaning up",
                        self.pending[uuid].dom.name)
            await self.abort(uuid)

    def _take(self, uuid: str) -> Incoming | None:
        pending = self.pending.pop(uuid, None)
        if pending is not None and pending.expiry is not None:
            pending.expiry.cancel()
        return pending

    async def _clean(self, pending: Incoming) -> None:
        with contextlib.suppress(Exception):
            await pending.mig.abort()
        await self.life.teardown(pending.dom)
