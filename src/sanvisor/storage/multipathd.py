"""The host's multipath daemon (inside the agent): maps, path checker, data path.

Paths come from the SCSI table (after a rescan) and are grouped into one map
per WWID. A map's name is its alias in multipath.conf; without one, `mpathN`
from this host's bindings when user_friendly_names is on (assigned in the order
this host first saw each WWID: another host may number them differently, the
seed's trap), else the WWID. Each map serves /dev/mapper/NAME to QEMU as an
NBD unix socket under HOME/mapper/.

The per-request data path is either the engine (a native process the agent
drives, enginemap.py and docs/dataplane.md) or the Python one of mpmap.py,
paths.py and mpfront.py: SANVISOR_DATAPATH=engine|python, read when the daemon
is made; unset, the engine when it is built. Everything else here (maps, names,
paths, settings) is the same control plane for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path as FsPath
from typing import Any

from sanvisor.errors import ConfigError, SanvisorError
from sanvisor.storage.engine import engine_binary
from sanvisor.storage.enginemap import EngineBackend, EngineMap, EnginePath
from sanvisor.storage.fence import FENCE_TIMEOUT
from sanvisor.storage.lvserve import LvServer
from sanvisor.storage.mpconf import MultipathConf, parse_mpconf
from sanvisor.storage.mpfront import Front
from sanvisor.storage.mpmap import IO_TIMEOUT, Map
from sanvisor.storage.paths import Path
from sanvisor.storage.scsi import HbaConf, ScsiTable, load_hbas

log = logging.getLogger("sanvisor.multipath")
LINK_CHECK = 0.05  # seconds between HBA link-state checks


def datapath_setting() -> str:
    """SANVISOR_DATAPATH: ``engine`` or ``python``; unset, the engine when it is built
    (scripts/setup.sh builds it), else the Python data path, with a warning."""
    value = os.environ.get("SANVISOR_DATAPATH", "").strip().lower()
    if value in ("engine", "python"):
        return value
    if value:
        raise ConfigError(f"SANVISOR_DATAPATH={value!r}: it must be engine or python")
    if engine_binary() is not None:
        return "engine"
    log.warning("the data-path engine is not built (scripts/setup.sh): using the Python "
                "data path")
    return "python"


class Multipathd:
    def __init__(self, home: FsPath, datapath: str | None = None) -> None:
        self.home = home
        self.conf_path = home / "multipath.conf"
        self.mapper = home / "mapper"
        self.conf = MultipathConf()
        self.datapath = datapath or datapath_setting()
        self.backend = EngineBackend(home, self.mapper) if self.datapath == "engine" else None
        # the LVs this host serves (storage/lvserve.py): named in every sync of the engine
        # from the first one on (an adopted engine keeps serving the guests' LVs)
        self.volumes = LvServer(home)
        if self.backend is not None:
            self.backend.volume_specs = self.volumes.specs
        self.after_reload: Callable[[], Awaitable[None]] | None = None  # the volumes' refresh
        self.maps: dict[str, Map | EngineMap] = {}  # by WWID
        self.paths: dict[str, Path | EnginePath] = {}  # by H:C:T:L
        self.servers: dict[str, asyncio.AbstractServer] = {}  # by map name
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._probes: set[asyncio.Future[bool]] = set()
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
        if self.backend is not None:
            await self.backend.start(self.maps)  # type: ignore[arg-type]
        with contextlib.suppress(SanvisorError):
            await self.reload()
        self._task = asyncio.create_task(self._checker(), name="multipath-checker")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.backend is not None:
            await self.backend.stop()
            return
        for srv in self.servers.values():
            srv.close()
        for mp in self.maps.values():
            mp.close()
        for p in self.paths.values():
            if isinstance(p, Path):
                p.fail("multipathd stopping")

    async def reload(self) -> None:
        """Rebuild maps from the SCSI table and multipath.conf; keep live paths."""
        async with self._lock:
            self.conf = self.load_conf()
            try:
                hbas = {h.index: h for h in load_hbas(self.home)}
            except SanvisorError:
                hbas = {}
            table = ScsiTable(self.home)
            wanted: dict[str, list[Any]] = {}
            for sp in table.paths:
                if sp.hba in hbas and not self.conf.blacklisted(sp.wwid, sp.vendor, sp.model,
                                                                sp.dev):
                    wanted.setdefault(sp.wwid, []).append(sp)
            for hctl in [h for h, p in self.paths.items()
                         if p.scsi.wwid not in wanted or p.scsi not in wanted[p.scsi.wwid]]:
                gone = self.paths.pop(hctl)
                if isinstance(gone, Path):  # the engine's: removed by the sync
                    gone.fail("removed by a rescan")
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
                if mp is None and self.backend is not None:
                    mp = EngineMap(self.backend, name, wwid, dm, first.vendor, first.model,
                                   first.size, settings)
                    self.maps[wwid] = mp
                elif mp is None:
                    mp = Map(name, wwid, dm, first.vendor, first.model, first.size, settings)
                    mp.io_timeout, mp.fence_timeout = self.io_timeout, self.fence_timeout
                    self.maps[wwid] = mp
                    await self._serve(mp)
                mp.settings, mp.size = settings, first.size
                if isinstance(mp, EngineMap):
                    mp.paths = [self._engine_path(sp, hbas[sp.hba]) for sp in sps]
                else:
                    mp.paths = [self._path(sp, hbas[sp.hba], mp) for sp in sps]
            if self.backend is not None:
                self.backend.io_timeout = self.io_timeout
                self.backend.fence_timeout = self.fence_timeout
                await self.backend.sync()
            else:
                await asyncio.gather(*(p.connect() for p in self.paths.values()
                                       if isinstance(p, Path) and not p.ready and p.link_up()))
        if self.after_reload is not None:  # maps came or went: so may the LVs on them
            await self.after_reload()

    def _path(self, sp: Any, hba: HbaConf, mp: Map) -> Path:
        p = self.paths.get(sp.hctl)
        if not isinstance(p, Path) or p.scsi.wwid != sp.wwid:
            p = Path(sp, hba, mp.path_changed)
            self.paths[sp.hctl] = p
        p.on_change = mp.path_changed
        return p

    def _engine_path(self, sp: Any, hba: HbaConf) -> EnginePath:
        p = self.paths.get(sp.hctl)
        if not isinstance(p, EnginePath) or p.scsi != sp or p.hba != hba:
            p = EnginePath(sp, hba)
            self.paths[sp.hctl] = p
        return p

    async def _serve(self, mp: Map) -> None:
        self.mapper.mkdir(exist_ok=True)
        sock = self.mapper / f"{mp.name}.sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        srv = await asyncio.get_running_loop().create_unix_server(lambda: Front(mp), str(sock))
        sock.chmod(0o600)
        self.servers[mp.name] = srv

    async def _drop_map(self, mp: Map | EngineMap) -> None:
        mp.close()
        if self.backend is not None:
            self.backend.drop(mp.name)
            return
        srv = self.servers.pop(mp.name, None)
        if srv is not None:
            srv.close()
        with contextlib.suppress(FileNotFoundError):
            (self.mapper / f"{mp.name}.sock").unlink()

    async def _checker(self) -> None:
        """Link state and I/O timeouts every 50 ms (fast failure); reconnect faulty
        paths every polling_interval of their map; expire queues (no_path_retry)."""
        last_probe: dict[str, float] = {}
        while True:
            await asyncio.sleep(LINK_CHECK)
            if self.backend is not None:  # the engine times and retries by itself
                self.backend.check_links()
                continue
            now = time.monotonic()
            for mp in list(self.maps.values()):
                if not isinstance(mp, Map):
                    continue
                for p in mp.paths:
                    if p.ready and not p.link_up():
                        p.fail(f"link down on {p.hba.ifname or f'HBA {p.hba.index}'}")
                    elif not p.ready and p.link_up() and \
                            now - last_probe.get(p.scsi.hctl, 0) >= mp.settings.polling_interval:
                        last_probe[p.scsi.hctl] = now
                        task = asyncio.ensure_future(p.connect())
                        self._probes.add(task)
                        task.add_done_callback(self._probes.discard)
                mp.check_timeouts(now)
                mp.expire()

    # ---- views ----------------------------------------------------------------------
    def device(self, path: str) -> FsPath | None:
        """The NBD socket serving /dev/mapper/NAME (a map here), or an LV active here
        (/dev/VG/LV, /dev/mapper/VG-LV: served by the engine only)."""
        if path.startswith("/dev/mapper/"):
            name = path.removeprefix("/dev/mapper/")
            if any(mp.name == name for mp in self.maps.values()):
                return self.mapper / f"{name}.sock"
        if self.backend is not None and path.startswith("/dev/"):
            return self.volumes.socket(path)
        return None

    def hint(self, path: str) -> str | None:
        """Why ``path`` is not a device here, when it names a map or an LV we know."""
        if self.backend is None and self.volumes.current.known.get(path):
            return (f"{path} is an LV: LVs are served by the data-path engine "
                    "(SANVISOR_DATAPATH=python serves none)")
        return self.volumes.hint(path)

    def names(self) -> list[str]:
        return sorted(mp.name for mp in self.maps.values())

    def ll(self) -> str:
        if self.backend is not None:
            self.backend.refresh()
        return "\n".join(mp.ll() for mp in sorted(self.maps.values(), key=lambda m: m.dm))

    def view(self) -> dict[str, Any]:
        if self.backend is not None:
            self.backend.refresh()
        maps = sorted(self.maps.values(), key=lambda m: m.dm)
        return {"maps": [mp.view(fresh=False) if isinstance(mp, EngineMap) else mp.view()
                         for mp in maps],
                "ll": "\n".join(mp.ll() for mp in maps), "warnings": self.conf.warnings,
                "datapath": self.datapath}
