"""The agent's volume verbs: LVM's commands over the devices this host sees.

PVs are the host's multipath maps (/dev/mapper/NAME, reached through the map's NBD
socket, the one QEMU and the data-path engine serve) and the block devices or files
listed in HOME/volumes/devices (lvm2's devices file: pvcreate, vgcreate and vgextend
of a path that is not a map add it; pvremove takes it out). Every host of the pool
that sees the LUNs sees the same VGs. Commands run in a worker thread, one at a time;
changes are serialised pool-wide by the leases on the PVs (storage/lvm/lease.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import weakref
from pathlib import Path
from typing import Any

from sanvisor.agent.storage_service import StorageService
from sanvisor.agent.volume_serving import Serving
from sanvisor.errors import LeaseError, UsageError, VolumeError
from sanvisor.storage import hostdevs
from sanvisor.storage.lvm import check, lvops, pvops, report, rows, snapops, vgops
from sanvisor.storage.lvm.blockdev import BlockDevice, FileDevice, NbdDevice
from sanvisor.storage.lvm.lease import LeaseKeeper, Timing
from sanvisor.storage.lvm.manager import DeviceRef, Result, VolumeManager
from sanvisor.storage.lvm.names import Amount, parse_extents, parse_size, split_vg_lv
from sanvisor.storage.lvm.segments import LvMap, describe

log = logging.getLogger("sanvisor.volumes")
_BY_STORAGE: weakref.WeakKeyDictionary[StorageService, VolumeService] = (
    weakref.WeakKeyDictionary())


class VolumeService:
    def __init__(self, home: Path, mpd: Any, host_name: str | None = None) -> None:
        self.home, self.mpd = home, mpd
        self.host = host_name or _host_name(home)
        self.dir = home / "volumes"
        self.maps: list[tuple[str, str, Path]] = []  # (name, WWID, socket), from the loop
        self.extra: list[str] = []  # --devices of the current command
        self.manager = VolumeManager(self.host, self._devices,
                                     LeaseKeeper(self.host, Timing.from_env()))
        self.lock = asyncio.Lock()
        # the LVs active here, served by the engine (agent/volume_serving.py)
        self.serving = Serving(self.manager, mpd, self.host)
        self._refresher: asyncio.Future[None] | None = None
        from sanvisor.agent.backup import Backups

        self.backups = Backups(self)
        if self.serving.backend is not None and hostdevs.enabled():
            self.serving.hostdevs = hostdevs.HostDevices(home)
        if mpd is not None and hasattr(mpd, "after_reload"):
            mpd.after_reload = self.refresh

    @staticmethod
    def attach(storage: StorageService, host_name: str | None = None) -> VolumeService:
        svc = VolumeService(storage.home, storage.mpd, host_name)
        _BY_STORAGE[storage] = svc
        return svc

    @staticmethod
    def of(storage: StorageService) -> VolumeService:
        svc = _BY_STORAGE.get(storage)
        return svc if svc is not None else VolumeService.attach(storage)

    # ---- devices --------------------------------------------------------------------
    @property
    def devices_file(self) -> Path:
        return self.dir / "devices"

    def listed(self) -> list[str]:
        try:
            return [ln.strip() for ln in self.devices_file.read_text().splitlines()
                    if ln.strip() and not ln.startswith("#")]
        except FileNotFoundError:
            return []

    def _list(self, paths: list[str]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.devices_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{p}\n" for p in paths))
        tmp.replace(self.devices_file)

    def _devices(self) -> list[DeviceRef]:
        refs = [DeviceRef(f"/dev/mapper/{name}", wwid, _nbd_opener(str(sock), name))
                for name, wwid, sock in self.maps]
        for path in dict.fromkeys(self.listed() + self.extra):
            if os.path.exists(path):
                refs.append(DeviceRef(path, path, _file_opener(path)))
        return refs

    def _snapshot_maps(self) -> None:
        maps = getattr(self.mpd, "maps", {}) if self.mpd is not None else {}
        mapper = getattr(self.mpd, "mapper", self.home / "mapper")
        self.maps = [(m.name, m.wwid, Path(mapper) / f"{m.name}.sock")
                     for m in maps.values() if m.size]

    def _adopt(self, names: list[str]) -> None:
        """Paths given to pvcreate/vgcreate/vgextend that are no map: remember them."""
        paths = [n for n in names if n.startswith("/") and not n.startswith("/dev/mapper/")]
        if paths:
            self._list(list(dict.fromkeys(self.listed() + paths)))

    # ---- commands -------------------------------------------------------------------
    async def run(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        if command not in COMMANDS:
            raise UsageError(f"unknown volume command {command!r}")
        self._snapshot_maps()
        async with self.lock:
            out = await asyncio.to_thread(self._run, command, args)
            if command not in READ_ONLY:  # what is active here may have changed
                out["warnings"] += await self._refresh()
            return out

    async def flush_maps(self, name: str | None) -> dict[str, Any]:
        """multipath -f NAME (-F: None), refused while held (Serving.flush)."""
        async with self.lock:
            out = await self.serving.flush(name)
            self._snapshot_maps()
            return out | {"warnings": await self._refresh()}

    async def refresh(self) -> None:
        """Serve the LVs active here as the VGs say now (at start, after a rescan)."""
        self._snapshot_maps()
        async with self.lock:
            for w in await self._refresh():
                log.warning("%s", w)

    async def _refresh(self) -> list[str]:
        try:
            return await self.serving.refresh(await asyncio.to_thread(self._plan))
        except VolumeError as exc:  # the VGs cannot be read now: served as they were
            return [f"the LVs served here were not updated: {exc}"]

    def _plan(self) -> Any:
        self.manager.begin()
        return self.serving.plan()

    def _run(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        self.extra = [str(d) for d in args.pop("devices", None) or []]
        if command in ("pvcreate", "vgcreate", "vgextend"):
            self.extra += [str(d) for d in args.get("pvs", [])]
        try:
            try:
                out: dict[str, Any] = COMMANDS[command](self, dict(args))
            except LeaseError as exc:
                if exc.context.get("partial") or not exc.context.get("lapsed"):
                    raise  # the change may be half on disk: said, not redone
                log.warning("%s: %s; once more", command, exc)
                out = COMMANDS[command](self, dict(args))
        finally:
            self.extra = []
        return out | {"warnings": list(self.manager.warnings)}

    def result(self, r: Result) -> dict[str, Any]:
        return {"messages": r.messages, "data": r.data}

    def mapping(self, vg_name: str, lv_name: str) -> LvMap:
        """The LV's segments for the data path (docs/volumes.md, "For the engine")."""
        found = self.manager.scan()
        st = found.vg(vg_name)
        lv = lvops.find_lv(st.vg, lv_name)
        ident = {u: self.manager.ident(d.dev) for u, d in st.disks.items()}
        return describe(st.vg, lv, ident)

    async def devices(self) -> dict[str, Any]:
        """The LVs served here, as the engine sees them (dmsetup ls/info's view)."""
        server, stats = self.serving.server, self.serving.device_stats()
        hd = self.serving.hostdevs
        rows = []
        for name, s in (server.current.served.items() if server is not None else []):
            st = stats.get(name, {})
            rows.append({"name": name, "vg": s.vg, "lv": s.lv, "uuid": s.uuid, "kind": s.kind,
                         "size": s.size, "socket": str(self.home / "mapper" / f"{name}.sock"),
                         "block_device": hd.device(name) if hd is not None else None,
                         "links": [str(hd.root / "mapper" / name), str(hd.root / s.vg / s.lv)]
                         if hd is not None else [], "clients": st.get("clients", 0),
                         "holders": await asyncio.to_thread(self.serving.holders, s.vg, s.lv),
                         "stores": [stats.get(f"store:{x}", {"id": x})
                                    for x in st.get("stores", [])]})
        return {"devices": rows, "devdir": str(hd.root) if hd is not None else None}

    def start(self, table: Any) -> None:
        """The agent is up: its domains (who holds an LV), the VGs read again."""
        self.serving.table = table
        self._refresher = asyncio.ensure_future(self.refresh())

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        if self.manager.leases is not None:
            self.manager.leases.close()
        for _ref, dev in self.manager.opened.values():
            dev.close()
        self.manager.opened.clear()


def _host_name(home: Path) -> str:
    with contextlib.suppress(FileNotFoundError, ValueError):
        name = json.loads((home / "host.json").read_text()).get("name")
        if isinstance(name, str) and name:
            return name
    return os.uname().nodename


def _nbd_opener(sock: str, map_name: str) -> Any:
    def open_() -> BlockDevice:
        return NbdDevice(sock, f"/dev/mapper/{map_name}", export=map_name)
    return open_


def _file_opener(path: str) -> Any:
    def open_() -> BlockDevice:
        return FileDevice(path)
    return open_


# ---- argument handling: the body of POST /v1/lvm/{command} --------------------------

def _strs(args: dict[str, Any], key: str) -> list[str]:
    v = args.get(key) or []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise UsageError(f"{key}: a list of strings")
    return list(v)


def _str(args: dict[str, Any], key: str, default: str | None = None) -> str:
    v = args.get(key, default)
    if not isinstance(v, str):
        raise UsageError(f"{key}: a string is needed")
    return v


def _amount(args: dict[str, Any]) -> Amount:
    size, extents = args.get("size"), args.get("extents")
    if (size is None) == (extents is None):
        raise VolumeError("give the size: -L SIZE or -l EXTENTS (one of them)")
    return parse_size(str(size)) if size is not None else parse_extents(str(extents))


def _lv_ref(args: dict[str, Any], key: str = "lv") -> tuple[str, str]:
    return split_vg_lv(_str(args, key), args.get("vg"))


def _pvcreate(s: VolumeService, a: dict[str, Any]) -> dict[str, Any]:
    r = pvops.pvcreate(s.manager, _strs(a, "pvs"), force=int(a.get("force", 0)),
                       metadatacopies=int(a.get("metadatacopies", 2)))
    s._adopt(_strs(a, "pvs"))
    return s.result(r)


def _pvremove(s: VolumeService, a: dict[str, Any]) -> dict[str, Any]:
    pvs = _strs(a, "pvs")
    r = pvops.pvremove(s.manager, pvs, force=int(a.get("force", 0)))
    s._list([p for p in s.listed() if p not in pvs])
    return s.result(r)


def _vgcreate(s: VolumeService, a: dict[str, Any]) -> dict[str, Any]:
    ext = parse_size(str(a.get("extent_size") or "4m")).value
    r = vgops.vgcreate(s.manager, _str(a, "vg"), _strs(a, "pvs"), extent_size=ext,
                       force=int(a.get("force", 0)),
                       metadatacopies=int(a.get("metadatacopies", 2)))
    s._adopt(_strs(a, "pvs"))
    return s.result(r)


def _vgextend(s: VolumeService, a: dict[str, Any]) -> dict[str, Any]:
    r = vgops.vgextend(s.manager, _str(a, "vg"), _strs(a, "pvs"), force=int(a.get("force", 0)),
                       metadatacopies=int(a.get("metadatacopies", 2)))
    s._adopt(_strs(a, "pvs"))
    return s.result(r)


def _vgreduce(s: VolumeService, a: dict[str, Any]) -> dict[str, Any]:
    return s.result(vgops.vgreduce(s.manager, _str(a, "vg"), _strs(a, "pvs"),
                                   removemissing=bool(a.get("removemissing")),
                                   force=bool(a.get("force"))))


def _vgremove(s: VolumeService, a: dict[str, Any]) -> dict[str, Any]:
    msgs: list[str] = []
    for vg in _strs(a, "vgs"):
        msgs += vgops.vgremove(s.manager, vg, force=bool(a.get("force"))).messages
    return {"messages": msgs, "data": {"vgs": _strs(a, "vgs")}}


def _vgrename(s: VolumeService, a: dict[str, Any]) -> dict[str, Any]:
    return s.result(vgops.vgrename(s.manager, _str(a, "old"), _str(a, "new")))


def _vgck(s: VolumeService, a: dict[str, Any]) -> dict[str, Any]:
    s.manager.begin()
    found = s.manager.scan()
    names = _strs(a, "vgs") or [st.vg.name for st in found.vgs]
    problems = {n: check.check_vg(found.vg(n)) for n in names}
    if a.get("updatemetadata"):
        for n, p in problems.items():
            if p:
                with s.manager.change(n, allow_missing=True) as ch:
                    ch.commit(f"Write from vgck --updatemetadata {n}")
        found = s.manager.scan()
        problems = {n: check.check_vg(found.vg(n)) for n in names}
    return {"messages": [f"VG {n}: {p}" for n, ps in problems.items() for p in ps],
            "data": {"problems": problems, "seqno": {n: found.vg(n).vg.seqno for n in names}}}


def _lvcreate(s: VolumeService, a: dict[str, Any]) -> dict[str, Any]:
    target = _str(a, "vg")
    pvs = _strs(a, "pvs")
    if a.get("snapshot"):
        vg, origin = split_vg_lv(target, a.get("origin_vg"))
        chunk = parse_size(str(a.get("chunk_size") or "4k"), "k").value // 512
        return s.result(snapops.lvcreate_snapshot(s.manager, vg, origin, _str(a, "name"),
                                                  _amount(a), chunk=chunk, pvs=pvs))
    if "/" in target.removeprefix("/dev/"):
        raise VolumeError(f"lvcreate: {target}: give the VG (VG/LV is for -s)")
    name = a.get("name") or _next_lvol(s, target)
    return s.result(lvops.lvcreate(s.manager, target, str(name), _amount(a), pvs=pvs,
                                   activate=a.get("activate", "y") != "n",
                                   zero=a.get("zero", "y") != "n", tags=_strs(a, "addtag")))


def _next_lvol(s: VolumeService, vg_name: str) -> str:
    vg = s.manager.scan().vg(vg_name).vg
    return next(f"lvol{i}" for i in range(len(vg.lvs) + 1) if vg.lv(f"lvol{i}") is None)


def _resize(verb: str) -> Any:
    def run(s: VolumeService, a: dict[str, Any]) -> dict[str, Any]:
        vg, lv = _lv_ref(a)
        return s.result(lvops.lvresize(s.manager, vg, lv, _amount(a), verb=verb,
                                       force=bool(a.get("force")), pvs=_strs(a, "pvs")))
    return run


def _lvrename(s: VolumeService, a: dict[str, Any]) -> dict[str, Any]:
    vg, old = split_vg_lv(_str(a, "old"), a.get("vg"))
    new_vg, new = split_vg_lv(_str(a, "new"), vg)
    if new_vg != vg:
        raise VolumeError(f"lvrename: {new_vg} is not {vg}: an LV stays in its VG")
    return s.result(lvops.lvrename(s.manager, vg, old, new))


def _lvremove(s: VolumeService, a: dict[str, Any]) -> dict[str, Any]:
    msgs: list[str] = []
    for ref in _strs(a, "lvs"):
        text = ref.removeprefix("/dev/")
        if "/" in text or text.startswith("mapper/"):
            vg, lv = split_vg_lv(ref)
            msgs += lvops.lvremove(s.manager, vg, [lv], force=bool(a.get("force"))).messages
        else:
            msgs += lvops.lvremove(s.manager, text, [], force=bool(a.get("force"))).messages
    return {"messages": msgs, "data": {"lvs": _strs(a, "lvs")}}


def _lvconvert(s: VolumeService, a: dict[str, Any]) -> dict[str, Any]:
    if not a.get("merge"):
        raise VolumeError("lvconvert: only --merge (a snapshot back into its origin)")
    vg, lv = _lv_ref(a)
    return s.result(snapops.lvconvert_merge(s.manager, vg, lv))


def _lvchange(s: VolumeService, a: dict[str, Any]) -> dict[str, Any]:
    msgs: list[str] = []
    for ref in _strs(a, "lvs"):
        vg, lv = split_vg_lv(ref)
        msgs += lvops.lvchange(s.manager, vg, [lv], activate=a.get("activate"),
                               addtag=_strs(a, "addtag"), deltag=_strs(a, "deltag"),
                               handover=a.get("handover"), force=bool(a.get("force"))).messages
    return {"messages": msgs, "data": {"lvs": _strs(a, "lvs")}}


def _report(kind: str) -> Any:
    def run(s: VolumeService, a: dict[str, Any]) -> dict[str, Any]:
        s.manager.begin()
        fields = report.resolve(kind, _strs(a, "options"))
        found = s.manager.scan()
        sel = _strs(a, "select")
        if kind == "pv":
            out = rows.pv_rows(found)
            if sel:
                want = {s.manager.device(x).name for x in sel}
                out = [r for r in out if r["pv_name"] in want]
        elif kind == "vg":
            out = [r for r in rows.vg_rows(found) if not sel or r["vg_name"] in sel]
        else:
            out = rows.lv_rows(found, s.host, fields, bool(a.get("all")))
            if sel:
                out = [r for r in out if r["vg_name"] in sel
                       or f"{r['vg_name']}/{str(r['lv_name']).strip('[]')}" in sel]
            out.sort(key=lambda r: (str(r["vg_name"]), str(r["lv_name"]).strip("[]")))
        return {"kind": kind, "fields": fields, "rows": out}
    return run


def _lvmap(s: VolumeService, a: dict[str, Any]) -> dict[str, Any]:
    from dataclasses import asdict

    vg, lv = _lv_ref(a)
    return {"messages": [], "data": asdict(s.mapping(vg, lv))}


READ_ONLY = ("pvs", "vgs", "lvs", "lvmap", "vgck")
COMMANDS: dict[str, Any] = {
    "pvcreate": _pvcreate, "pvremove": _pvremove, "vgcreate": _vgcreate,
    "vgextend": _vgextend, "vgreduce": _vgreduce, "vgremove": _vgremove,
    "vgrename": _vgrename, "vgck": _vgck, "lvcreate": _lvcreate,
    "lvextend": _resize("lvextend"), "lvreduce": _resize("lvreduce"),
    "lvresize": _resize("lvresize"), "lvrename": _lvrename, "lvremove": _lvremove,
    "lvconvert": _lvconvert, "lvchange": _lvchange, "pvs": _report("pv"),
    "vgs": _report("vg"), "lvs": _report("lv"), "lvmap": _lvmap,
}
