"""The target side of a migration (agent/migration.py has the whole protocol and the
source side): ``POST /v1/migrate/incoming`` prepares the domain here (checked as
input from outside), the source's hold on it is watched until the switch-over, the
switch-over takes it over in the pool, ``finish`` waits until it runs here, and an
abort (the source's, or the expiry of a migration neither finished nor aborted)
removes every trace of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sanvisor.agent.host import HostResources
from sanvisor.agent.life import Lifecycle
from sanvisor.agent.peers import Peer, PoolNetwork
from sanvisor.agent.records import DomainRecord
from sanvisor.agent.service import HostService
from sanvisor.agent.table import Domain, DomainTable
from sanvisor.drivers.base import IncomingMigration
from sanvisor.drivers.xen.diskid import check_same
from sanvisor.errors import (
    ConfigError,
    ConflictError,
    RecordError,
    SanvisorError,
    StoreError,
    TlsForbiddenError,
)
from sanvisor.model.domain import State
from sanvisor.model.lifecycle import Busy
from sanvisor.model.migration import ConvergencePolicy

log = logging.getLogger("sanvisor.agent")
#: s: the default limit of a transfer (the source) and of an arrival (the target)
MIGRATE_TIMEOUT = 600.0


def _seconds(environ: Mapping[str, str], var: str, default: float) -> float:
    raw = environ.get(var, "")
    if not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < 86400:
        raise ConfigError(f"{var}={raw!r}: not a number of seconds (0 < N < 86400)",
                          variable=var)
    return value


@dataclass(frozen=True)
class MigrationSettings:
    """Read by the agent at start (`sanvisor agent --help`, docs/migration.md)."""

    #: SANVISOR_MIGRATE_TIMEOUT: a transfer not done within it is given up (source)
    timeout: float = MIGRATE_TIMEOUT
    #: SANVISOR_MIGRATE_EXPIRY: an incoming migration neither finished nor aborted
    #: this long after it was prepared is removed (target; default timeout + 60)
    expiry: float = MIGRATE_TIMEOUT + 60

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MigrationSettings:
        env = os.environ if environ is None else environ
        timeout = _seconds(env, "SANVISOR_MIGRATE_TIMEOUT", MIGRATE_TIMEOUT)
        return cls(timeout, _seconds(env, "SANVISOR_MIGRATE_EXPIRY", timeout + 60))


# s: how often an incoming migration checks its source still holds it (the tests make
# it tight, SANVISOR_MIGRATE_WATCH_S, so a race with the switch-over shows at once)
def _watch_every() -> float:
    try:
        value = float(os.environ.get("SANVISOR_MIGRATE_WATCH_S", "") or 2.0)
    except ValueError:
        return 2.0
    return min(max(value, 0.01), 60.0) if value == value else 2.0  # nan: the default


WATCH_EVERY = _watch_every()


def modes(rec: DomainRecord) -> dict[str, str]:
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


class IncomingMigrations:
    """The migrations arriving at this host (agent/migration.py's Migrations adds the
    ones leaving it)."""

    def __init__(self, svc: HostService, settings: MigrationSettings | None = None
                 ) -> None:
        self.svc = svc
        self.settings = settings or MigrationSettings.from_env()
        self.pending: dict[str, Incoming] = {}

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
        mine, theirs = drv.hypervisor_version(), str(body.get("hypervisor_version") or "")
        if mine and theirs and theirs != mine:  # `-M pc` is each QEMU's newest machine
            raise ConflictError(f"migrate: the target runs {drv.name} {mine}, the source "
                                f"{drv.name} {theirs} (both ends must run the same; "
                                "SANVISOR_QEMU, docs/migration.md)")
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
        disk_modes = modes(rec)
        disks = dict(body.get("disks") or {})
        if set(disks) != set(disk_modes):
            raise ConflictError("migrate: the source's disk identities do not match the "
                                "domain's disks")
        check_same(disks, await asyncio.to_thread(self.host.identities, disk_modes))
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
            self.settings.expiry, lambda: asyncio.ensure_future(self._expire(pending)))
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
                with contextlib.suppress(SanvisorError):  # a copy kept dying: logged
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
            with contextlib.suppress(SanvisorError):  # a copy kept dying: logged
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
            inst = await pending.mig.finish(self.settings.timeout)
            dom.inst = inst
            dom.record.pid = inst.pid
            running = (await inst.status()).running
            if resume and not running:
                await inst.unpause()
        except BaseException:
            with contextlib.suppress(SanvisorError):  # a copy kept dying: logged
                await self._clean(pending)  # and with it, this host's hold in the pool
            raise
        finally:
            self.pending.pop(dom.record.uuid, None)
        dom.busy = Busy.NONE
        self.table.set_state(dom, State.RUNNING if resume else State.PAUSED, "migrated in")
        return self.svc.info(dom)

    async def abort(self, uuid: str, peer: Peer | None = None) -> None:
        """The source gave up: nothing of the incoming domain is left here (a copy that
        cannot be destroyed is kept dying and retried, and that is raised). Refused once
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
            log.warning("migrate: incoming %s neither finished nor aborted within %.0fs; "
                        "cleaning up", mine.dom.name, self.settings.expiry)
            with contextlib.suppress(SanvisorError):  # a copy kept dying: logged
                await self.abort(uuid)

    def _take(self, uuid: str) -> Incoming | None:
        pending = self.pending.pop(uuid, None)
        if pending is not None and pending.expiry is not None:
            pending.expiry.cancel()
        return pending

    async def _clean(self, pending: Incoming) -> None:
        """The incoming copy removed (its migration's abort: the receiver stopped, the
        domain destroyed). An abort that fails is not passed over: the copy stays in
        the table, dying, and the abort is tried again until it is gone
        (:meth:`Lifecycle.drop_copy`); raised."""
        await self.life.drop_copy(pending.dom, "its incoming migration was given up",
                                  destroy=pending.mig.abort, what="incoming copy")
