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

This module is the source's side; agent/incoming.py is the target's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from sanvisor.agent.incoming import IncomingMigrations, MigrationSettings, modes
from sanvisor.agent.service import HostService
from sanvisor.agent.table import Domain
from sanvisor.api.client import AgentClient
from sanvisor.drivers.base import Instance, StreamTls
from sanvisor.drivers.xen.diskid import check_movable
from sanvisor.errors import (
    HypervisorError,
    MigrationNotStartedError,
    NotFoundError,
    SanvisorError,
    StoreError,
)
from sanvisor.model.domain import State
from sanvisor.model.lifecycle import Busy
from sanvisor.model.migration import ConvergencePolicy

log = logging.getLogger("sanvisor.agent")


class Migrations(IncomingMigrations):
    """This host's migrations: the ones leaving it (here) and arriving (the base)."""

    def __init__(self, svc: HostService, settings: MigrationSettings | None = None
                 ) -> None:
        super().__init__(svc, settings)
        self.progress: dict[str, dict[str, Any]] = {}  # uuid -> the source's progress

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
            ids = await asyncio.to_thread(self.host.identities, modes(rec))
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
             "hypervisor_version": drv.hypervisor_version(),
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
                                           timeout=self.settings.timeout,
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
