"""`migrate`: move a running domain to another host's agent (Xen: xl migrate).

The source agent asks the target agent to prepare (``POST /v1/migrate/incoming``:
the domain's record and its disks' identities), sends the domain through the
socket the target returns, then asks the target to finish
(``POST /v1/migrate/{uuid}/finish``: the target takes the domain in its table).
Preflight, before anything moves: same hypervisor, no clash of name, uuid or MAC
on the target, and every disk present there with the same identity, read in each
dom0 (the WWID or device-mapper uuid of a device; a read-only file's full hash;
a writable file is refused: see drivers/xen/diskid.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from pathlib import Path
from typing import Any

from sanvisor.agent.manager import Domain
from sanvisor.agent.records import DomainRecord
from sanvisor.agent.service import HostService
from sanvisor.api.client import AgentClient
from sanvisor.errors import ConflictError, HypervisorError
from sanvisor.model.domain import State

MIGRATE_TIMEOUT = 600.0


def _modes(rec: DomainRecord) -> dict[str, str]:
    """path -> "r"/"w" for each of the domain's disks with a backing path."""
    return {d.path: d.mode for d in rec.spec.disks if d.path}


class Migrations:
    def __init__(self, svc: HostService) -> None:
        self.svc = svc
        self.m = svc.m
        self.pending: dict[str, tuple[DomainRecord, Any, bool]] = {}

    def _xen(self) -> Any:
        if self.m.driver.name != "xen":
            raise HypervisorError("migrate: live migration is implemented for Xen hosts "
                                  f"only (this host runs {self.m.driver.name})")
        return self.m.driver

    # ---- source ----------------------------------------------------------------------
    async def migrate(self, ref: str, target_socket: str, live: bool) -> dict[str, Any]:
        from sanvisor.drivers.xen.diskid import check_movable, identities
        from sanvisor.drivers.xen.migrate import send

        m = self.m
        drv = self._xen()
        dom = m.find(ref)
        async with dom.lock:
            if dom.inst is None or dom.record.state not in (State.RUNNING, State.PAUSED):
                raise ConflictError(f"migrate: {dom.name} is {dom.record.state.value}",
                                    domain=dom.name)
            rec = dom.record
            ids = await asyncio.to_thread(identities, drv.run, _modes(rec))
            check_movable(ids)
            target = AgentClient(Path(target_socket))
            prep = await asyncio.to_thread(
                target.call, "POST", "/v1/migrate/incoming",
                {"record": rec.to_dict(), "disks": ids, "live": live})
            was_running = rec.state is State.RUNNING
            dom.busy = "migrating"  # the watcher's view of a leaving domain is no news
            try:
                await asyncio.to_thread(functools.partial(
                    send, drv.run, drv.spawn, dom.name, prep["socket"], MIGRATE_TIMEOUT,
                    live=live))
                # not live: our copy waits paused until the target has restored its own
                info: dict[str, Any] = await asyncio.to_thread(
                    target.call, "POST", f"/v1/migrate/{rec.uuid}/finish", {})
            except BaseException:
                dom.busy = ""
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(target.call, "POST",
                                            f"/v1/migrate/{rec.uuid}/abort", {})
                if not live and was_running:
                    with contextlib.suppress(Exception):  # ours is the copy: it goes on
                        await dom.inst.unpause()
                raise
            await m.teardown(dom)  # gone here (live: xl did it; not live: now)
            if not live and was_running:
                await asyncio.to_thread(target.verb, rec.spec.name, "unpause")
                info = await asyncio.to_thread(target.info, rec.spec.name)
        return info

    # ---- target ----------------------------------------------------------------------
    async def incoming(self, record: dict[str, Any], disks: dict[str, str],
                       live: bool) -> dict[str, str]:
        from sanvisor.drivers.xen.diskid import check_same, identities
        from sanvisor.drivers.xen.migrate import Receiver, receive_argv

        m = self.m
        drv = self._xen()
        rec = DomainRecord.from_dict(record)
        if (other := m.by_name(rec.spec.name)) is not None:
            raise ConflictError(f"migrate: the target already has a domain {rec.spec.name} "
                                f"(id {other.record.domid})", domain=rec.spec.name)
        if rec.uuid in m.domains or rec.uuid in self.pending:
            raise ConflictError(f"migrate: uuid {rec.uuid} is already in use on the target")
        macs = m.live_macs()
        for nic in rec.nics:
            if nic.mac in macs:
                raise ConflictError(f"migrate: MAC {nic.mac} is in use on the target by "
                                    f"{macs[nic.mac]}")
        modes = _modes(rec)
        if set(disks) != set(modes):
            raise ConflictError("migrate: the source's disk identities do not match the "
                                "domain's disks")
        check_same(disks, await asyncio.to_thread(identities, drv.run, modes))
        sock = m.layout.home / f"migrate-{rec.uuid[:8]}.sock"
        cfg = await asyncio.to_thread(drv.write_config, m._plan(rec))
        recv = await asyncio.to_thread(Receiver, drv.spawn, sock, receive_argv(live, cfg))
        self.pending[rec.uuid] = (rec, recv, live)
        return {"socket": str(sock)}

    async def finish(self, uuid: str) -> dict[str, Any]:
        m = self.m
        drv = self._xen()
        if uuid not in self.pending:
            raise ConflictError(f"migrate: no incoming migration {uuid}")
        rec, recv, live = self.pending.pop(uuid)
        await asyncio.to_thread(recv.wait, MIGRATE_TIMEOUT)
        info = await asyncio.to_thread(drv.xl.info, rec.spec.name)
        if info is None:
            raise HypervisorError(f"migrate: {rec.spec.name} arrived but is gone already")
        rec.domid = m.registry.next_domid()
        rec.state, rec.reason = State.RUNNING, "migrated in"
        for nic in rec.nics:
            nic.tap = None
        dom = Domain(rec)  # its xl.cfg is in dom0 already (incoming wrote it)
        inst = await m.driver.reattach(m._plan(rec), info.domid, m._sink(dom))
        if inst is None:
            raise HypervisorError(f"migrate: cannot take {rec.spec.name} over")
        dom.inst = inst
        if not live:  # restored paused (-p): the source unpauses it once its copy is gone
            rec.state, rec.reason = State.PAUSED, "migrated in (stopped copy)"
        rec.pid = inst.pid
        m.domains[rec.uuid] = dom
        rec.save(m.layout.domain_dir(rec.uuid))
        return self.svc.info(dom)

    async def abort(self, uuid: str) -> None:
        """The source gave up: forget the incoming domain (its receiver ends by itself:
        its socket closed, or no sender within a minute)."""
        self.pending.pop(uuid, None)
