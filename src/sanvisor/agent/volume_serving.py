"""The agent's side of the LVs it serves: after every volume command (and every
rescan) the VGs are read again and the engine is given the LVs active here
(storage/lvserve.py); an LV that grew under a guest reaches it without a reboot;
and who holds an LV open (its guests, its block device's mounts and openers,
other NBD clients) is named when a command would take it away; the same for a
multipath map (``multipath -f``), with the LVs active here on it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from sanvisor.errors import SanvisorError, VolumeInUseError
from sanvisor.storage import engineproto as E
from sanvisor.storage.lvserve import LvServer, Plan, dm_name, plan

if TYPE_CHECKING:
    from sanvisor.agent.table import DomainTable
    from sanvisor.storage.hostdevs import HostDevices
    from sanvisor.storage.lvm.manager import VolumeManager

log = logging.getLogger("sanvisor.volumes")


class Serving:
    def __init__(self, manager: VolumeManager, mpd: Any, host: str) -> None:
        self.manager, self.mpd, self.host = manager, mpd, host
        self.server: LvServer | None = getattr(mpd, "volumes", None)
        self.backend = getattr(mpd, "backend", None)
        self.table: DomainTable | None = None  # the agent's domains (daemon.py sets it)
        self.hostdevs: HostDevices | None = None  # block devices for host tools
        manager.in_use = self.holders

    # ---- what is served ------------------------------------------------------------------
    def plan(self) -> Plan:
        """The LVs active here, from the VGs as they are now (blocking: a worker thread)."""
        found = self.manager.scan()
        return plan(found, self.host, self.manager.ident, self.manager.warnings.append)

    async def refresh(self, new: Plan | None = None) -> list[str]:
        """Serve what is active here now; the warnings of what could not follow."""
        if self.server is None:
            return []
        if new is None:
            new = await asyncio.to_thread(self.plan)
        if not self.server.update(new):
            return await self.follow_devices()
        if self.backend is not None:
            await self.backend.sync()
        warnings = await self.follow_devices()
        for name, old, size in new.grown:
            log.info("LV device %s grew from %d to %d bytes", name, old, size)
            warnings += await self._grown(name, size)
        return warnings

    async def follow_devices(self) -> list[str]:
        """Block devices for the maps and the LVs served here (host tools)."""
        if self.hostdevs is None or self.server is None:
            return []
        mapper = self.mpd.mapper
        wanted = {mp.name: (mapper / f"{mp.name}.sock", [f"mapper/{mp.name}"])
                  for mp in self.mpd.maps.values() if mp.size}
        for name, lv in self.server.current.served.items():
            wanted.setdefault(name, (mapper / f"{name}.sock", [f"mapper/{name}",
                                                               f"{lv.vg}/{lv.lv}"]))
        return await asyncio.to_thread(self.hostdevs.follow, wanted)

    async def _grown(self, name: str, size: int) -> list[str]:
        """Every guest on ``name`` gets its new size (the engine reconnects them)."""
        if self.backend is None:
            return []
        users = self.users(name)
        if not users:
            return []
        try:
            await self.backend.engine.request(E.line("reopen", name=name))
        except (SanvisorError, ConnectionError) as exc:
            return [f"{name}: its guests keep the old size until they reconnect: {exc}"]
        out = []
        for dom, disk in users:
            if dom.inst is None:
                continue
            try:
                await dom.inst.grow_disk(disk, size)
                log.info("%s: disk %s is now %d bytes", dom.name, disk.target, size)
            except SanvisorError as exc:
                out.append(f"domain {dom.name} does not see the new size of {disk.target} "
                           f"yet: {exc}")
        return out

    # ---- who holds an LV -------------------------------------------------------------------
    def users(self, name: str) -> list[tuple[Any, Any]]:
        """(domain, disk) of every domain here whose disk is the device ``name`` (an LV's,
        or a map's: /dev/mapper/NAME)."""
        if self.server is None or self.table is None:
            return []
        return [(dom, disk) for dom in self.table for disk in dom.record.spec.disks
                if disk.path and (disk.path == f"/dev/mapper/{name}"
                                  or self.server.name_of(disk.path) == name)]

    def holders(self, vg: str, lv: str) -> list[str]:
        """Who has ``vg/lv`` open on this host (thread-safe: a command's worker thread)."""
        return self.device_holders(dm_name(vg, lv))

    def map_holders(self, name: str, wwid: str) -> list[str]:
        """Who holds the multipath map ``name`` here: as for an LV (its guests, its block
        device's mounts and openers, other NBD clients), and the LVs active here with
        extents on it (an origin's, or a snapshot's store)."""
        out = self.device_holders(name, own=1 if f"/dev/mapper/{name}" in
                                  self.manager.opened else 0)  # the VGs' reader
        if self.server is None:
            return out
        current = self.server.current
        for lv in current.served.values():
            names = [*lv.device.cows, *([lv.device.snap] if lv.device.snap else [])]
            stores = [current.stores[x] for x in names if x in current.stores]
            if any(s.map_id == wwid for s in lv.device.segs) or any(
                    s.map_id == wwid for st in stores for s in st.cow):
                out.append(f"LV {lv.vg}/{lv.lv} (active here)")
        return out

    def device_holders(self, name: str, own: int = 0) -> list[str]:
        """Who has the engine's device ``name`` open here; ``own``: clients of ours that
        hold nothing."""
        out = [f"domain {dom.name} ({disk.target})" for dom, disk in self.users(name)]
        own += len(out)
        if self.hostdevs is not None:
            dev = self.hostdevs.holders(name)
            out += dev
            own += self.hostdevs.clients(name)
        clients = self._clients(name)
        if clients > own:
            n = clients - own
            out.append(f"{n} other NBD client{'s' if n > 1 else ''} (a backup, a host tool)")
        return out

    async def flush(self, name: str | None) -> dict[str, Any]:
        """``multipath -f NAME``: the map removed, refused (VolumeInUseError) while
        anything holds it; ``-F`` (no name): every map nothing holds, the others named."""
        removed, held = [], {}
        for n in [name] if name else sorted(m.name for m in self.mpd.maps.values()):
            who = await asyncio.to_thread(self.map_holders, n, self.mpd.wwid_of(n))
            if who and name:
                raise VolumeInUseError(f"map {n} is in use by {', '.join(who)}: cannot "
                                       "remove it", map=n, holders=who)
            if who:
                held[n] = who
                continue
            await self.mpd.flush(n)
            removed.append(n)
        return {"removed": removed, "in_use": held}

    def _clients(self, name: str) -> int:
        if self.backend is None:
            return 0
        reply = self.backend.engine.query(E.line("stats"))
        if reply is None or reply.kind != "ok":
            return 0
        return next((int(d.get("clients", 0)) for d in reply.data.get("devices", [])
                     if d.get("name") == name), 0)

    def device_stats(self) -> dict[str, dict[str, Any]]:
        """The engine's view of the served LVs and stores (clients, kind, store fill)."""
        if self.backend is None:
            return {}
        reply = self.backend.engine.query(E.line("stats"))
        if reply is None or reply.kind != "ok":
            return {}
        out: dict[str, dict[str, Any]] = {d["name"]: d for d in reply.data.get("devices", [])}
        for st in reply.data.get("stores", []):
            out[f"store:{st['id']}"] = st
        return out
