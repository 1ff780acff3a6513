"""The host's multipath daemon (inside the agent): maps, path checker, data path.

Paths come from the SCSI table (after a rescan) and are grouped into one map
per WWID. A map's name is its alias in multipath.conf; without one, `mpathN`
from this host's bindings when user_friendly_names is on (assigned in the order
this host first saw each WWID: another host may number them differently, the
seed's trap), else the WWID. Each map serves /dev/mapper/NAME to QEMU as an
NBD unix socket under HOME/mapper/.

The per-request data path is the engine, a native process the agent drives
(engine.py, enginemap.py and docs/dataplane.md); this is its control plane
(maps, names, paths, settings). Without a built engine the daemon does not start
(scripts/setup.sh, or ``make -C engine``, builds it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path as FsPath
from typing import Any

from sanvisor.errors import NotFoundError, SanvisorError
from sanvisor.storage.enginemap import (
    FENCE_TIMEOUT,
    IO_TIMEOUT,
    EngineBackend,
    EngineMap,
    EnginePath,
)
from sanvisor.storage.lvserve import LvServer
from sanvisor.storage.mpconf import MultipathConf, parse_mpconf
from sanvisor.storage.scsi import HbaConf, ScsiTable, load_hbas

log = logging.getLogger("sanvisor.multipath")
LINK_CHECK = 0.05  # seconds between HBA link-state checks (the loopback lab's fault files)


class Multipathd:
    def __init__(self, home: FsPath) -> None:
        self.home = home
        self.conf_path = home / "multipath.conf"
        self.mapper = home / "mapper"
        self.conf = MultipathConf()
        self.backend = EngineBackend(home, self.mapper)
        # the LVs this host serves (storage/lvserve.py): named in every sync of the engine
        # from the first one on (an adopted engine keeps serving the guests' LVs)
        self.volumes = LvServer(home)
        self.backend.volume_specs = self.volumes.specs
        self.after_reload: Callable[[], Awaitable[None]] | None = None  # the volumes' refresh
        self.maps: dict[str, EngineMap] = {}  # by WWID
        self.paths: dict[str, EnginePath] = {}  # by H:C:T:L
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.flushed: set[str] = set()  # WWIDs of maps removed by multipath -f
        self.io_timeout = IO_TIMEOUT  # given to every map (tests shorten them)
        self.fence_timeout = FENCE_TIMEOUT

    # ---- configuration --------------------------------------------------------------
    def load_conf(self) -> MultipathConf:
        if not self.conf_path.exists():
            return MultipathConf(defaults={"user_friendly_names": "yes"})
        return parse_mpconf(self.conf_path.read_text(), str(self.conf_path))

    def set_conf(self, text: str, source: str) -> MultipathConf:
        conf = parse_mpconf(text, source)  # raises ConfigError: file:line
        tmp = self.conf_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.conf_path)
        return conf

    def _bindings(self) -> dict[str, str]:
        out: dict[str, str] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in (self.home / "bindings").read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and not line.startswith("#"):
                    out[parts[1]] = parts[0]
        return out

    def _bind(self, wwid: str) -> str:
        b = self._bindings()
        if wwid not in b:
            n = 0
            while f"mpath{n}" in b.values():
                n += 1
            b[wwid] = f"mpath{n}"
            (self.home / "bindings").write_text(
                "# multipath bindings of this host: name wwid\n"
                + "".join(f"{name} {w}\n" for w, name in b.items()))
        return b[wwid]

    def name_for(self, wwid: str, friendly: bool | None = None) -> str:
        alias = self.conf.alias_for(wwid)
        if alias:
            return alias
        if friendly is None:  # the map's own (settings_for) or the defaults section's
            friendly = self.conf.user_friendly_names
        return self._bind(wwid) if friendly else wwid

    # ---- life -----------------------------------------------------------------------
    async def start(self) -> None:
        await self.backend.start(self.maps)
        with contextlib.suppress(SanvisorError):
            await self.reload()
        self._task = asyncio.create_task(self._checker(), name="multipath-checker")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.backend.stop()

    async def reload(self, reconfigure: bool = False, notify: bool = True) -> None:
        """Rebuild maps from the SCSI table and multipath.conf; keep live paths.
        ``reconfigure`` (a rescan, a new multipath.conf): flushed maps come back, as
        running ``multipath`` again makes them; ``notify``: the LVs follow."""
        async with self._lock:
            if reconfigure:
                self.flushed.clear()
            self.conf = self.load_conf()
            try:
                hbas = {h.index: h for h in load_hbas(self.home)}
            except SanvisorError:
                hbas = {}
            table = ScsiTable(self.home)
            wanted: dict[str, list[Any]] = {}
            for sp in table.paths:
                if sp.hba in hbas and sp.wwid not in self.flushed and not self.conf.blacklisted(
                        sp.wwid, sp.vendor, sp.model, sp.dev):
                    wanted.setdefault(sp.wwid, []).append(sp)
            for hctl in [h for h, p in self.paths.items()
                         if p.scsi.wwid not in wanted or p.scsi not in wanted[p.scsi.wwid]]:
                del self.paths[hctl]  # and from the engine by the sync below
            for wwid in [w for w in self.maps if w not in wanted]:
                await self._drop_map(self.maps.pop(wwid))
            # renamed maps go first: when a new multipath.conf swaps two names, dropping
            # one map later would take the socket the other has just been given
            for wwid, sps in wanted.items():
                old = self.maps.get(wwid)
                settings = self.conf.settings_for(wwid, sps[0].vendor, sps[0].model)
                if old is not None and old.name != self.name_for(
                        wwid, settings.user_friendly_names):
                    await self._drop_map(self.maps.pop(wwid))
            for dm, (wwid, sps) in enumerate(sorted(wanted.items())):
                first = sps[0]
                settings = self.conf.settings_for(wwid, first.vendor, first.model)
                name = self.name_for(wwid, settings.user_friendly_names)
                mp = self.maps.get(wwid)
                if mp is not None and mp.name != name:
                    await self._drop_map(self.maps.pop(wwid))
                    mp = None
                if mp is None:
                    mp = EngineMap(self.backend, name, wwid, dm, first.vendor, first.model,
                                   first.size, settings)
                    self.maps[wwid] = mp
                mp.settings, mp.size = settings, first.size
                mp.paths = [self._engine_path(sp, hbas[sp.hba]) for sp in sps]
            self.backend.io_timeout = self.io_timeout
            self.backend.fence_timeout = self.fence_timeout
            await self.backend.sync()
        if notify and self.after_reload is not None:  # maps came or went: so may the LVs
            await self.after_reload()

    def _engine_path(self, sp: Any, hba: HbaConf) -> EnginePath:
        p = self.paths.get(sp.hctl)
        if p is None or p.scsi != sp or p.hba != hba:
            p = EnginePath(sp, hba)
            self.paths[sp.hctl] = p
        return p

    async def flush(self, name: str) -> str:
        """``multipath -f NAME``: the map removed until the next rescan or multipath.conf
        (the caller checked that nothing holds it); its WWID. The LVs are not told."""
        wwid = self.wwid_of(name)
        self.flushed.add(wwid)
        await self.reload(notify=False)
        return wwid

    def wwid_of(self, name: str) -> str:
        wwid = next((w for w, m in self.maps.items() if m.name == name), None)
        if wwid is None:
            raise NotFoundError(f"{name}: no such multipath map", map=name)
        return wwid

    async def _drop_map(self, mp: EngineMap) -> None:
        mp.close()
        self.backend.drop(mp.name)

    async def _checker(self) -> None:
        """The links the kernel cannot report (the loopback lab's fault files), to the
        engine every 50 ms: it times, fails, fences and reconnects paths by itself."""
        while True:
            await asyncio.sleep(LINK_CHECK)
            self.backend.check_links()

    # ---- views ----------------------------------------------------------------------
    def device(self, path: str) -> FsPath | None:
        """The NBD socket serving /dev/mapper/NAME (a map here), or an LV active here
        (/dev/VG/LV, /dev/mapper/VG-LV)."""
        if path.startswith("/dev/mapper/"):
            name = path.removeprefix("/dev/mapper/")
            if any(mp.name == name for mp in self.maps.values()):
                return self.mapper / f"{name}.sock"
        if path.startswith("/dev/"):
            return self.volumes.socket(path)
        return None

    def hint(self, path: str) -> str | None:
        """Why ``path`` is not a device here, when it names a map or an LV we know."""
        return self.volumes.hint(path)

    def names(self) -> list[str]:
        return sorted(mp.name for mp in self.maps.values())

    def ll(self) -> str:
        self.backend.refresh()
        return "\n".join(mp.ll() for mp in sorted(self.maps.values(), key=lambda m: m.dm))

    def view(self) -> dict[str, Any]:
        self.backend.refresh()
        maps = sorted(self.maps.values(), key=lambda m: m.dm)
        return {"maps": [mp.view(fresh=False) for mp in maps],
                "ll": "\n".join(mp.ll() for mp in maps), "warnings": self.conf.warnings}
