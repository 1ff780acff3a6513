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

Transport (docs/pool.md): between hosts of a pool, the source's agent calls the
target's over TCP with mutual TLS (agent/peers.py), and the hypervisor's stream is
encrypted and authenticated too (QEMU: tls-creds-x509); the target checks that the
host its certificate proves is the ``source`` the request names, and answers the rest
of that migration to that host alone. A target given as an agent's unix socket (a
standalone agent on this machine) is called, and streamed to, over unix sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sanvisor.agent.host import HostResources
from sanvisor.agent.life import Lifecycle
from sanvisor.agent.peers import Peer, PoolNetwork
from sanvisor.agent.records import DomainRecord
from sanvisor.agent.service import HostService
from sanvisor.agent.table import Domain, DomainTable
from sanvisor.api.client import AgentClient
from sanvisor.drivers.base import IncomingMigration, Instance, StreamTls
from sanvisor.drivers.xen.diskid import check_movable, check_same
from sanvisor.errors import (
    ConflictError,
    HypervisorError,
    MigrationNotStartedError,
    NotFoundError,
    RecordError,
    SanvisorError,
    StoreError,
    TlsForbiddenError,
)
from sanvisor.model.domain import State
from sanvisor.model.lifecycle import Busy
from sanvisor.model.migration import ConvergencePolicy

log = logging.getLogger("sanvisor.agent")
MIGRATE_TIMEOUT = 600.0
# s: how often an incoming migration checks its source still holds it (the tests make
# it tight, SANVISOR_MIGRATE_WATCH_S, so a race with the switch-over shows at once)
def _watch_every() -> float:
    try:
        value = float(os.environ.get("SANVISOR_MIGRATE_WATCH_S", "") or 2.0)
    except ValueError:
        return 2.0
    return min(max(value, 0.01), 60.0) if value == value else 2.0  # nan: the default


WATCH_EVERY = _watch_every()


def _modes(rec: DomainRecord) -> dict[str, str]:
    """path -> "r"/"w" for each of the domain's disks with a backing path."""
    return {d.path: d.mode for d in rec.spec.disks if d.path}


@dataclass
class Incoming:
    dom: Domain
    mig: IncomingMigration
    expiry: asyncio.TimerHandle | None = None
    done: asyncio.Task[dict[str, Any]] | None = None  # switched over: its arrival
    watch: asyncio.Task[None] | None = None  # the source's hold on it, until then
    peer: str | None = None  # the authenticated source host (None: a local caller)
    # the switch-over has begun (the store's hand-over may already be done): from then
    # on neither the source's changed hold nor the expiry may remove this copy
    switching: bool = False
    switched: asyncio.Event = field(default_factory=asyncio.Event)  # done is set (or gone)


class Migrations:
    def __init__(self, svc: HostService) -> None:
        self.svc = svc
        self.pending: dict[str, Incoming] = {}
        self.progress: dict[str, dict[str, Any]] = {}  # uuid -> the source's progress

    @functools.cached_property
    def net(self) -> PoolNetwork | None:
        """This host on the pool's network (None outside a pool): read once."""
        return PoolNetwork.of_home(self.svc.m.layout.home)

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
    def _dial(self, target: str) -> tuple[AgentClient, StreamTls | None]:
        """``target``: a host of the pool (its agent over TCP with mutual TLS, the
        stream encrypted) or an agent's unix socket (an absolute path: on this
        machine, and so is the stream)."""
        if target.startswith("/"):
            return AgentClient(Path(target)), None
        if self.net is None:
            raise NotFoundError(f"migrate: this host is in no pool with a network: give "
                                f"the target agent's home, not {target!r}", host=target)
        return self.net.dial(target)

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
            try:
                return await self._send(dom, inst, target_socket, live, policy, ids)
            except MigrationNotStartedError as exc:  # the guest never stopped: again, once
                log.warning("%s: the migration did not start (%s); the guest runs on "
                            "here, trying once more", dom.name, exc)
                return await self._send(dom, inst, target_socket, live, policy, ids)

    async def _send(self, dom: Domain, inst: Instance, target_socket: str, live: bool,
                    policy: ConvergencePolicy, ids: Any) -> dict[str, Any]:
        """One try: the target prepares, the driver sends, the target finishes."""
        drv, pool, rec = self.svc.driver, self.table.pool, dom.record
        target, stream = self._dial(target_socket)
        source = pool.host if pool is not None else ""
        token = pool.token(rec.uuid) if pool is not None else None
        prep = await asyncio.to_thread(
            target.call, "POST", "/v1/migrate/incoming",
            {"record": rec.to_dict(), "disks": ids, "live": live,
             "policy": policy.to_dict(), "driver": drv.name,
             "accelerator": drv.accelerator()["accel"], "source": source,
             "token": token})
        was_running = rec.state is State.RUNNING
        hand = {"resume": was_running, "source": source, "token": token}
        switched = False

        async def switchover() -> None:  # the driver's point of no return
            nonlocal switched
            await asyncio.to_thread(target.call, "POST",
                                    f"/v1/migrate/{rec.uuid}/switchover", hand)
            switched = True

        dom.busy = Busy.MIGRATING  # the hypervisor's news of a leaving domain is ours
        progress = self.progress.setdefault(rec.uuid, {})
        try:
            report = await inst.migrate_to(str(prep["address"]), live=live,
                                           policy=policy, progress=progress.update,
                                           timeout=MIGRATE_TIMEOUT,
                                           switchover=switchover, tls=stream)
            info: dict[str, Any] = await asyncio.to_thread(
                target.call, "POST", f"/v1/migrate/{rec.uuid}/finish", hand)
        except BaseException as exc:
            dom.busy = Busy.NONE
            await self._recover(dom, target, was_running, switched, exc)
            raise
        finally:
            self.progress.pop(rec.uuid, None)
        # our stopped copy; the target runs it now. A destroy that fails is raised (the
        # copy stays, dying, and is destroyed again until it is gone: never two)
        await self.life.drop_copy(dom, f"it migrated to {target_socket}")
        return {**info, "migration": report.to_dict()}

    async def _recover(self, dom: Domain, target: AgentClient, was_running: bool,
                       switched: bool, exc: BaseException) -> None:
        """The migration failed: which copy lives. Before the switch-over, ours (the
        target's is removed); after it, the target's (it owns the domain; ours is
        stale and is removed). When the pool cannot say, ours stays paused."""
        rec, pool = dom.record, self.table.pool
        owner: str | None = "ours"
        unowned = False  # the target took it over, then gave it back (its finish failed)
        if pool is not None:
            try:
                now = await pool.own.current(rec.uuid)
                owner = "ours" if now is None or now.host == pool.host else now.host
                unowned = now is None
            except StoreError as err:
                log.warning("%s: migration failed (%s) and the pool's store cannot say who "
                            "owns it now (%s): left paused here", dom.name, exc, err)
                owner = None
        elif switched:
            owner = "target"
        if owner == "ours":
            with contextlib.suppress(Exception):
                await asyncio.to_thread(target.call, "POST",
                                        f"/v1/migrate/{rec.uuid}/abort", {})
            if pool is not None and (pool.token(rec.uuid) is None or unowned):
                with contextlib.suppress(Exception):
                    await pool.claim(dom.name, rec.uuid)  # the target gave it back
            if was_running and dom.inst is not None:  # ours lives: running, as it was
                with contextlib.suppress(Exception):
                    await dom.inst.unpause()
        elif owner is not None:
            log.warning("%s: migration failed after the switch-over (%s): %s runs it; "
                        "removing the copy here", dom.name, exc, owner)
            try:
                await self.life.drop_copy(dom, f"{owner} runs it now")
            except SanvisorError as err:  # kept, dying, destroyed again later
                log.error("%s", err)

    def status(self, ref: str) -> dict[str, Any]:
        """A migration in progress from here (for `migrate`'s progress bar)."""
        dom = self.table.find(ref)
        return {"name": dom.name, "migrating": dom.busy is Busy.MIGRATING,
                **self.progress.get(dom.record.uuid, {})}

    # ---- target ----------------------------------------------------------------------
    async def incoming(self, body: dict[str, Any], peer: Peer | None = None
                       ) -> dict[str, str]:
        """``peer``: the host the pool's network authenticated (None: the local unix
        socket); it must be the ``source`` the body names."""
        drv = self.svc.driver
        if peer is not None and str(body.get("source") or "") != peer.name:
            raise TlsForbiddenError(f"migrate: {peer.name} may not send a domain on behalf "
                                    f"of {body.get('source') or 'no host'!r}",
                                    peer=peer.name)
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
        self.table.reserve(rec.uuid, rec.spec.name, [n.mac for n in rec.nics],
                           "arriving by migration")
        try:
            return await self._prepare(rec, body, live, policy, peer)
        finally:
            self.table.release(rec.uuid)  # in the table by now, or refused

    async def _prepare(self, rec: DomainRecord, body: dict[str, Any], live: bool,
                       policy: ConvergencePolicy, peer: Peer | None) -> dict[str, str]:
        drv = self.svc.driver
        if self.table.pool is not None:
            await self.table.pool.expect(rec.spec.name, rec.uuid, str(body.get("source")))
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
            tls = self.net.stream(peer) if self.net and peer else None
            mig = await drv.incoming(self.host.launch_plan(rec, incoming=True),
                                     self.life.sink(dom), live=live, policy=policy,
                                     tls=tls)
        except BaseException:
            await self.life.teardown(dom)
            raise
        rec.pid = mig.pid
        self.table.save(dom)
        pending = Incoming(dom, mig, peer=peer.name if peer else None)
        pending.expiry = asyncio.get_running_loop().call_later(
            MIGRATE_TIMEOUT + 60, lambda: asyncio.ensure_future(self._expire(pending)))
        self.pending[rec.uuid] = pending
        if self.table.pool is not None and body.get("token") is not None:
            pending.watch = asyncio.get_running_loop().create_task(
                self._watch_source(pending, int(body["token"])))
        return {"address": mig.address}

    async def _watch_source(self, mine: Incoming, token: int) -> None:
        """Until the switch-over: if the source's hold on the domain changes (its agent
        restarted and took the domain again, or gave it up), the migration is over and
        this incoming copy is removed, without waiting for the expiry. Bound to its own
        migration: a later one of the same domain (it came, left, and is coming back
        within one period) is not this watcher's business."""
        pool, uuid = self.table.pool, mine.dom.record.uuid
        assert pool is not None

        def watching() -> bool:
            return (self.pending.get(uuid) is mine and mine.done is None
                    and not mine.switching)

        while watching():
            await asyncio.sleep(WATCH_EVERY)
            try:
                now = await pool.own.current(uuid)
            except StoreError:
                continue
            if not watching():
                return  # over, or the hold changed because it is becoming ours
            if now is None or now.token != token:
                log.warning("migrate: %s's source let go of it (%s); removing the "
                            "incoming copy", mine.dom.name,
                            "no owner" if now is None else f"{now.host} took it again")
                with contextlib.suppress(ConflictError):
                    await self.abort(uuid)
                return

    def _check_peer(self, uuid: str, peer: Peer | None) -> None:
        """The rest of a migration is its source's (the host that prepared it)."""
        pending = self.pending.get(uuid)
        if peer is not None and pending is not None and pending.peer != peer.name:
            raise TlsForbiddenError(f"migrate: {pending.dom.name} comes from "
                                    f"{pending.peer or 'this host'}, not {peer.name}",
                                    peer=peer.name)

    async def switchover(self, uuid: str, body: dict[str, Any],
                         peer: Peer | None = None) -> None:
        """The source's point of no return: the domain becomes this host's (its
        ownership moves in the pool's store, only if the source still holds it with
        the token it sends), then the hypervisor may run it once it has arrived.
        Idempotent; refused (and nothing changes) if the hand-over is refused."""
        self._check_peer(uuid, peer)
        pending = self.pending.get(uuid)
        if pending is None:
            raise ConflictError(f"migrate: no incoming migration {uuid}")
        if pending.done is not None:
            return
        if pending.switching:  # a second caller (finish) waits for the first's outcome
            await pending.switched.wait()
            return
        pool, dom = self.table.pool, pending.dom
        pending.switching = True  # before the first await: the watcher must not act now
        try:
            if pool is not None:
                await pool.take_over(dom.name, uuid, str(body.get("source") or ""),
                                     body.get("token"))
        except BaseException:
            pending.switching = False  # refused: nothing changed, the source may abort
            pending.switched.set()
            raise
        if pending.expiry is not None:  # ours now: it arrives, or is lost, here
            pending.expiry.cancel()
        resume = bool(body.get("resume", True))
        try:
            if resume:
                await pending.mig.switchover()
        except BaseException:
            self.pending.pop(uuid, None)
            pending.switched.set()
            await self._clean(pending)
            raise
        pending.done = asyncio.get_running_loop().create_task(self._arrive(pending, resume))
        pending.switched.set()

    async def finish(self, uuid: str, body: dict[str, Any],
                     peer: Peer | None = None) -> dict[str, Any]:
        """The stream is in (the source says so): switch over if not yet, and answer
        once the domain runs here."""
        await self.switchover(uuid, body, peer)
        pending = self.pending.get(uuid)
        if pending is None or pending.done is None:
            raise ConflictError(f"migrate: no incoming migration {uuid}")
        return await asyncio.shield(pending.done)

    async def _arrive(self, pending: Incoming, resume: bool) -> dict[str, Any]:
        dom = pending.dom
        try:
            inst = await pending.mig.finish(MIGRATE_TIMEOUT)
            dom.inst = inst
            dom.record.pid = inst.pid
            running = (await inst.status()).running
            if resume and not running:
                await inst.unpause()
        except BaseException:
            await self._clean(pending)  # and with it, this host's ownership is released
            raise
        finally:
            self.pending.pop(dom.record.uuid, None)
        dom.busy = Busy.NONE
        self.table.set_state(dom, State.RUNNING if resume else State.PAUSED, "migrated in")
        return self.svc.info(dom)

    async def abort(self, uuid: str, peer: Peer | None = None) -> None:
        """The source gave up: nothing of the incoming domain is left here. Refused once
        switched over (the domain is this host's then)."""
        self._check_peer(uuid, peer)
        pending = self.pending.get(uuid)
        if pending is not None and pending.done is not None:
            raise ConflictError(f"migrate: {pending.dom.name} was switched over to this "
                                "host; it is not the source's to abort any more")
        pending = self._take(uuid)
        if pending is not None:
            await self._clean(pending)

    async def _expire(self, mine: Incoming) -> None:
        uuid = mine.dom.record.uuid
        if self.pending.get(uuid) is mine and not mine.switching:
            log.warning("migrate: incoming %s neither finished nor aborted; cleaning up",
                        mine.dom.name)
            await self.abort(uuid)

    def _take(self, uuid: str) -> Incoming | None:
        pending = self.pending.pop(uuid, None)
        if pending is not None and pending.expiry is not None:
            pending.expiry.cancel()
        return pending

    async def _clean(self, pending: Incoming) -> None:
        try:
            await pending.mig.abort()
        except Exception as exc:  # said, not passed over (docs/migration.md)
            log.error("migrate: %s: the incoming copy's abort failed: %s",
                      pending.dom.name, exc)
        await self.life.teardown(pending.dom)
