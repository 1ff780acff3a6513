"""The control plane's side of the engine data path: maps and paths as the agent
sees them, and what the engine is told about them.

The multipath daemon (multipathd.py) decides the maps, their paths and settings
(SCSI table, multipath.conf, zoning views) and keeps these objects;
``EngineBackend.sync`` gives the engine the whole configuration at once (maps,
paths, devices with their segment tables and listening sockets), after every
reload and after an engine restart.
Views read the engine's counters (a synchronous ``stats`` request): what
`multipath -ll` and `--json` show is the engine's state, not a copy of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path as FsPath
from typing import Any

from sanvisor.errors import DeviceError
from sanvisor.storage import engineproto as E
from sanvisor.storage import nbdproto as P
from sanvisor.storage.engine import Engine
from sanvisor.storage.mpconf import Settings
from sanvisor.storage.mpview import PathView, render_ll
from sanvisor.storage.scsi import HbaConf, ScsiPath

log = logging.getLogger("sanvisor.multipath")
_STATS = ("read_bytes", "written_bytes", "requests", "failures", "inflight")
MAX_TRIES = 5  # a request in flight on this many failed paths fails with EIO
IO_TIMEOUT = 30.0  # seconds a request may wait for its reply on a path whose link is up
FENCE_TIMEOUT = 5.0  # seconds for one fence attempt (connect, handshake, the array's ack)
# what a stale copy can harm: held with a failed path's session until the array fenced it
WRITES = (P.CMD_WRITE, P.CMD_WRITE_ZEROES, P.CMD_TRIM)
SYSFS_NET = FsPath("/sys/class/net")


def link_up(ifname: str, sysfs: FsPath = SYSFS_NET) -> bool:
    """An HBA's link is up when its operstate says so ("up", or "unknown" for drivers
    without one) and it has carrier: "down", "lowerlayerdown", "dormant",
    "notpresent" and "testing" are not up. The carrier is read too: a veth whose peer
    (the switch side) went down loses carrier at once, its operstate follows only
    up to a second later (the kernel's link watch)."""
    base = sysfs / ifname
    try:
        state = (base / "operstate").read_text().strip()
        carrier = (base / "carrier").read_text().strip()
    except OSError:  # no such interface, or carrier unreadable: the interface is down
        return False
    return state in ("up", "unknown") and carrier == "1"


class EnginePath:
    """One path, as the engine reports it (events and stats)."""

    def __init__(self, scsi: ScsiPath, hba: HbaConf) -> None:
        self.scsi, self.hba = scsi, hba
        self.state = "faulty"
        self.reason = "not connected yet"
        self.session: int | None = None
        self.stats: dict[str, int] = dict.fromkeys(_STATS, 0)
        self.link_sent: bool | None = None  # the link state last given to the engine

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def link_up(self) -> bool:
        if self.hba.fault_file:  # a loopback lab has no link to look at
            return not FsPath(self.hba.fault_file).exists()
        return link_up(self.hba.ifname)

    def update(self, data: dict[str, Any]) -> None:
        self.state = str(data.get("state", self.state))
        if "reason" in data:
            self.reason = str(data["reason"])
        if "session" in data:
            s = data["session"]
            self.session = int(str(s), 16) if s else None
        for k in _STATS:
            if k in data:
                self.stats[k] = int(data[k])

    def view(self) -> dict[str, Any]:
        return {"hctl": self.scsi.hctl, "dev": self.scsi.dev, "state": self.state,
                "reason": self.reason, "hba": self.hba.index,
                "inflight": self.stats["inflight"],
                "session": f"{self.session:016x}" if self.session is not None else None,
                **{k: v for k, v in self.stats.items() if k != "inflight"}}


class EngineMap:
    """One map, as the control plane keeps it; its data path runs in the engine."""

    def __init__(self, backend: EngineBackend, name: str, wwid: str, dm: int, vendor: str,
                 model: str, size: int, settings: Settings) -> None:
        self.backend = backend
        self.name, self.wwid, self.dm = name, wwid, dm
        self.vendor, self.model, self.size = vendor, model, size
        self.settings = settings
        self.paths: list[EnginePath] = []
        self.counters: dict[str, Any] = {}
        self.current: str | None = None

    def close(self) -> None:
        """Nothing to do here: the next sync removes the map from the engine."""

    def update(self, data: dict[str, Any]) -> None:
        self.counters = data
        self.current = data.get("current")
        by_id = {p.get("id"): p for p in data.get("paths", [])}
        for p in self.paths:
            if p.scsi.hctl in by_id:
                p.update(by_id[p.scsi.hctl])

    def view(self, fresh: bool = True) -> dict[str, Any]:
        if fresh:
            self.backend.refresh()
        c = self.counters
        return {"name": self.name, "wwid": self.wwid, "dm": f"dm-{self.dm}",
                "vendor": self.vendor, "model": self.model, "size": self.size,
                "policy": self.settings.path_grouping_policy,
                "queued": c.get("queued", 0), "held": c.get("held", 0),
                "unfenced": c.get("unfenced", []), "io_errors": c.get("io_errors", 0),
                "retries_exhausted": c.get("retries_exhausted", 0),
                "fences": c.get("fences", 0), "fence_failures": c.get("fence_failures", 0),
                "paths": [p.view() for p in self.paths]}

    def ll(self) -> str:
        return render_ll(self)

    @property
    def path_views(self) -> list[PathView]:
        return list(self.paths)

    def choose_view(self) -> PathView | None:
        if self.settings.path_grouping_policy == "multibus":
            return None
        return next((p for p in self.paths if p.scsi.hctl == self.current), None)

    def command(self, io_timeout: float, fence_timeout: float) -> bytes:
        s = self.settings
        return E.line("map", id=self.wwid, size=self.size, policy=s.path_grouping_policy,
                      failback=s.failback, no_path_retry=s.no_path_retry,
                      polling_interval=s.polling_interval, io_timeout=io_timeout,
                      fence_timeout=fence_timeout, max_tries=MAX_TRIES,
                      hold=E.hold(tuple(WRITES)))


class EngineBackend:
    """What the multipath daemon needs from the engine: sync, listeners, views, links."""

    def __init__(self, home: FsPath, mapper: FsPath) -> None:
        self.mapper = mapper
        self.maps: dict[str, EngineMap] = {}  # by WWID (the daemon's own dict)
        self.io_timeout = IO_TIMEOUT
        self.fence_timeout = FENCE_TIMEOUT
        self.listeners: dict[str, socket.socket] = {}  # device name -> its listening socket
        self.engine = Engine(home, self._event, self.sync)
        # the volumes' devices (storage/lvserve.py): named in every sync, or it removes them
        self.volume_specs: Callable[[], tuple[list[E.StoreSpec], list[E.DeviceSpec]]] | None \
            = None
        self._sync_lock = asyncio.Lock()

    async def start(self, maps: dict[str, EngineMap]) -> None:
        self.maps = maps
        await self.engine.start()

    async def stop(self) -> None:
        await self.engine.stop()
        for sock in self.listeners.values():
            sock.close()
        self.listeners.clear()

    def _paths(self) -> dict[str, EnginePath]:
        return {p.scsi.hctl: p for mp in self.maps.values() for p in mp.paths}

    def _event(self, data: dict[str, Any]) -> None:
        if data.get("ev") == "path":
            p = self._paths().get(str(data.get("id")))
            if p is not None:
                p.update(data)
                if data.get("state") == "faulty":
                    log.warning("path %s (%s) failed: %s", p.scsi.hctl, p.scsi.dev, p.reason)
                else:
                    log.info("path %s (%s) is ready", p.scsi.hctl, p.scsi.dev)
        elif data.get("ev") == "log":
            level = logging.WARNING if data.get("level") == "warning" else logging.INFO
            if "path" not in str(data.get("msg", ""))[:5]:  # path news are logged above
                log.log(level, "engine: %s", data.get("msg"))

    def listener(self, name: str) -> socket.socket:
        """The listening socket of /dev/mapper/NAME (HOME/mapper/NAME.sock), kept by the
        agent so that a client's reconnect waits in its backlog while the engine restarts."""
        sock = self.listeners.get(name)
        if sock is None:
            self.mapper.mkdir(exist_ok=True)
            path = self.mapper / f"{name}.sock"
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen(128)
            self.listeners[name] = sock
        return sock

    def drop(self, name: str) -> None:
        sock = self.listeners.pop(name, None)
        if sock is not None:
            sock.close()
        with contextlib.suppress(FileNotFoundError):
            (self.mapper / f"{name}.sock").unlink()

    async def sync(self) -> None:
        """Give the engine the whole configuration; what it has but is not named here
        (maps, paths, devices, stores) goes. One at a time."""
        async with self._sync_lock:
            await self._sync()

    async def _sync(self) -> None:
        eng = self.engine
        stores, devices = self.volume_specs() if self.volume_specs is not None else ([], [])
        await eng.request(E.line("sync-begin"))
        for mp in self.maps.values():
            await eng.request(mp.command(self.io_timeout, self.fence_timeout))
            for i, p in enumerate(mp.paths):
                up = p.link_up() if not p.hba.ifname else None
                p.link_sent = up
                await eng.request(E.line(
                    "path", id=p.scsi.hctl, map=mp.wwid, index=i, dev=p.scsi.dev,
                    src=p.hba.address, target=p.hba.target, export=mp.wwid,
                    ifname=p.hba.ifname or None, up=up))
            seg = [E.Segment(0, mp.size, mp.wwid, 0)]
            sock = self.listener(mp.name)
            await eng.request(E.device_line(mp.name, mp.size, seg, True), [sock.fileno()])
        keep = {mp.name for mp in self.maps.values()}
        for st in stores:
            await eng.request(st.line())
        for dev in devices:
            if dev.name in keep:
                log.warning("LV device %s: a multipath map has that name: not served", dev.name)
                continue
            keep.add(dev.name)
            try:
                await eng.request(dev.line(), [self.listener(dev.name).fileno()])
            except DeviceError as exc:  # one LV refused stops no other device
                log.warning("LV device %s: %s", dev.name, exc)
        await eng.request(E.line("sync-end"))
        for name in [n for n in self.listeners if n not in keep]:
            self.drop(name)
        self.refresh()

    def refresh(self) -> None:
        """The engine's counters and path states, now."""
        reply = self.engine.query(E.line("stats"))
        if reply is None or reply.kind != "ok":
            return
        by_id = {m.get("id"): m for m in reply.data.get("maps", [])}
        for mp in self.maps.values():
            if mp.wwid in by_id:
                mp.update(by_id[mp.wwid])

    def check_links(self) -> None:
        """Links the kernel cannot report (the loopback lab's fault files): to the engine."""
        link = self.engine.link
        if link is None or link.sock is None:
            return
        for p in self._paths().values():
            if p.hba.ifname:
                continue  # the engine has the kernel's link events for it
            up = p.link_up()
            if up != p.link_sent:
                p.link_sent = up
                link.send_nowait(E.line("link", id=p.scsi.hctl, up=up,
                                        why=f"link down on HBA {p.hba.index}"))
