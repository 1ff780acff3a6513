"""`migrate`: move a running domain to another host's agent (Xen: xl migrate).

The source agent asks the target agent to prepare (``POST /v1/migrate/incoming``:
the domain's record and its disks' identities), sends the domain through the
socket the target returns, then asks the target to finish
(``POST /v1/migrate/{uuid}/finish``: the target takes the domain in its table).
Preflight, before anything moves: same hypervisor, no clash of name, uuid or MAC
on the target, and every disk present there with the same identity, read in each
dom0 (the WWID or device-mapper uuid of a device; a read-only file's full hash;
a writable file is refused: see drivers/xen/diskid.py).

The target reserves the name, uuid and MACs while the domain is on its way (a
create of the same name is refused), and forgets an incoming migration that is
neither finished nor aborted within MIGRATE_TIMEOUT: its receiver is killed and
whatever xl had restored is destroyed, so no untracked copy is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sanvisor.agent.host import HostResources
from sanvisor.agent.life import Lifecycle
from sanvisor.agent.records import DomainRecord
from sanvisor.agent.service import HostService
from sanvisor.agent.table import Domain, DomainTable
from sanvisor.api.client import AgentClient
from sanvisor.errors import ConflictError, HypervisorError, RecordError
from sanvisor.model.domain import State
from sanvisor.model.lifecycle import Busy

log = logging.getLogger("sanvisor.agent")
MIGRATE_TIMEOUT = 600.0


def _modes(rec: DomainRecord) -> dict[str, str]:
    """path -> "r"/"w" for each of the domain's disks with a backing path."""
    return {d.path: d.mode for d in rec.spec.disks if d.path}


@dataclass
class Incoming:
    rec: DomainRecord
    receiver: Any
    live: bool
    expiry: asyncio.TimerHandle | None = None


class Migrations:
    def __init__(self, svc: HostService) -> None:
        self.svc = svc
        self.pending: dict[str, Incoming] = {}

    @property
    def table(self) -> DomainTable:
        return self.svc.table

    @property
    def host(self) -> HostResources:
        return self.svc.host

    @property
    def life(self) -> Lifecycle:
        return self.svc.life

    def _xen(self) -> Any:
        if self.svc.driver.name != "xen":
            raise HypervisorError("migrate: live migration is implemented for Xen hosts "
                                  f"only (this host runs {self.svc.driver.name})")
        return self.svc.driver

    # ---- source ----------------------------------------------------------------------
    async def migrate(self, ref: str, target_socket: str, live: bool) -> dict[str, Any]:
        from sanvisor.drivers.xen.diskid import check_movable, identities
        from sanvisor.drivers.xen.migrate import send

        drv = self._xen()
        dom = self.table.find(ref)
        async with dom.lock:
            inst = self.svc.admit(dom, "migrate")
            rec = dom.record
            ids = await asyncio.to_thread(identities, drv.run, _modes(rec))
            check_movable(ids)
            target = AgentClient(Path(target_socket))
            prep = await asyncio.to_thread(
                target.call, "POST", "/v1/migrate/incoming",
                {"record": rec.to_dict(), "disks": ids, "live": live})
            was_running = rec.state is State.RUNNING
            dom.busy = Busy.MIGRATING  # the watcher's view of a leaving domain is no news
            try:
                await asyncio.to_thread(functools.partial(
                    send, drv.run, drv.spawn, dom.name, prep["socket"], MIGRATE_TIMEOUT,
                    live=live))
                # not live: our copy waits paused until the target has restored its own
                info: dict[str, Any] = await asyncio.to_thread(
                    target.call, "POST", f"/v1/migrate/{rec.uuid}/finish", {})
            except BaseException:
                dom.busy = Busy.NONE
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(target.call, "POST",
                                            f"/v1/migrate/{rec.uuid}/abort", {})
                if not live and was_running:
                    with contextlib.suppress(Exception):  # ours is the copy: it goes on
                        await inst.unpause()
                raise
            await self.life.teardown(dom)  # gone here (live: xl did it; not live: now)
            if not live and was_running:
                await asyncio.to_thread(target.verb, rec.spec.name, "unpause")
                info = await asyncio.to_thread(target.info, rec.spec.name)
        return info

    # ---- target ----------------------------------------------------------------------
    async def incoming(self, record: dict[str, Any], disks: dict[str, str],
                       live: bool) -> dict[str, str]:
        from sanvisor.drivers.xen.diskid import check_same, identities
        from sanvisor.drivers.xen.migrate import Receiver, receive_argv

        drv = self._xen()
        try:
            rec = DomainRecord.from_untrusted(record)
        except RecordError as exc:
            raise RecordError(f"migrate: {exc}") from None
        if rec.uuid in self.pending:
            raise ConflictError(f"migrate: {rec.spec.name} is already on its way here")
        self.table.check_free(rec.spec.name, rec.uuid, [n.mac for n in rec.nics])
        modes = _modes(rec)
        if set(disks) != set(modes):
            raise ConflictError("migrate: the source's disk identities do not match the "
                                "domain's disks")
        check_same(disks, await asyncio.to_thread(identities, drv.run, modes))
        sock = self.table.layout.home / f"migrate-{rec.uuid[:8]}.sock"
        cfg = await asyncio.to_thread(drv.write_config, self.host.launch_plan(rec))
        recv = await asyncio.to_thread(Receiver, drv.spawn, sock, receive_argv(live, cfg))
        self.table.reserve(rec.uuid, rec.spec.name, [n.mac for n in rec.nics],
                           "arriving by migration")
        pending = Incoming(rec, recv, live)
        pending.expiry = asyncio.get_running_loop().call_later(
            MIGRATE_TIMEOUT + 60, lambda: asyncio.ensure_future(self._expire(rec.uuid)))
        self.pending[rec.uuid] = pending
        return {"socket": str(sock)}

    async def finish(self, uuid: str) -> dict[str, Any]:
        drv = self._xen()
        pending = self._take(uuid)
        if pending is None:
            raise ConflictError(f"migrate: no incoming migration {uuid}")
        rec, live = pending.rec, pending.live
        try:
            await asyncio.to_thread(pending.receiver.wait, MIGRATE_TIMEOUT)
            info = await asyncio.to_thread(drv.xl.info, rec.spec.name)
            if info is None:
                raise HypervisorError(f"migrate: {rec.spec.name} arrived but is gone already")
            rec.domid = self.table.registry.next_domid()
            rec.state, rec.reason = State.RUNNING, "migrated in"
            for nic in rec.nics:
                nic.tap = None
            dom = Domain(rec)  # its xl.cfg is in dom0 already (incoming wrote it)
            inst = await drv.reattach(self.host.launch_plan(rec), info.domid,
                                      self.life.sink(dom))
            if inst is None:
                raise HypervisorError(f"migrate: cannot take {rec.spec.name} over")
        except BaseException:
            await self._clean(pending)
            raise
        finally:
            self.table.release(uuid)
        dom.inst = inst
        if not live:  # restored paused (-p): the source unpauses it once its copy is gone
            rec.state, rec.reason = State.PAUSED, "migrated in (stopped copy)"
        rec.pid = inst.pid
        self.table.add(dom)
        self.table.save(dom)
        return self.svc.info(dom)

    async def abort(self, uuid: str) -> None:
        """The source gave up: kill the receiver, destroy whatever xl restored, forget
        the incoming domain."""
        pending = self._take(uuid)
        self.table.release(uuid)
        if pending is not None:
            await self._clean(pending)

    async def _expire(self, uuid: str) -> None:
        if uuid in self.pending:
            log.warning("migrate: incoming %s neither finished nor aborted; cleaning up",
                        self.pending[uuid].rec.spec.name)
            await self.abort(uuid)

    def _take(self, uuid: str) -> Incoming | None:
        pending = self.pending.pop(uuid, None)
        if pending is not None and pending.expiry is not None:
            pending.expiry.cancel()
        return pending

    async def _clean(self, pending: Incoming) -> None:
        """No copy of an unfinished migration survives on this host."""
        drv = self._xen()
        name = pending.rec.spec.name
        await asyncio.to_thread(pending.receiver.cancel)
        if self.table.by_name(name) is None:
            info = await asyncio.to_thread(drv.xl.info, name)
            if info is not None:
                log.warning("migrate: destroying the unfinished copy of %s", name)
                await asyncio.to_thread(drv.xl, "destroy", name, check=False)
