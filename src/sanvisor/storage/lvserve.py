"""The LVs a host serves: every LV active on it is a device of the data-path engine.

An LV active here (its tag ``sanvisor:active=HOST``) is served on
HOME/mapper/DMNAME.sock, DMNAME as device-mapper names it (``vg-lv``, dashes
doubled): a linear LV is its segments on the maps; an origin with snapshots also
names their exception stores (the engine copies old chunks there before it
overwrites them); a snapshot reads its store, else its origin (docs/volumes.md,
"The data path"). Guests and host tools reach it as ``/dev/VG/LV`` or
``/dev/mapper/DMNAME``, resolved here to that socket.

What is served is kept in HOME/volumes/served.json: an agent that restarts gives the
engine its LVs in its very first sync (a sync removes whatever it does not name:
the guests' LVs would go with it), before it can read the VGs again.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sanvisor.errors import VolumeError
from sanvisor.storage import engineproto as E
from sanvisor.storage.lvm.scan import Scan
from sanvisor.storage.lvm.segments import LvMap, Seg, describe

log = logging.getLogger("sanvisor.volumes")


def dm_name(vg: str, lv: str) -> str:
    """device-mapper's name of an LV: ``vg-lv``, a dash in either doubled."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def _segs(segs: tuple[Seg, ...]) -> tuple[E.Segment, ...]:
    return tuple(E.Segment(s.start, s.length, s.map_id, s.map_offset) for s in segs)


@dataclass(frozen=True)
class ServedLv:
    """One LV served here: its names, and what the engine is told."""

    name: str  # dm name: the device's and the socket's
    vg: str
    lv: str
    uuid: str  # dm uuid: LVM-<vg uuid><lv uuid>
    kind: str  # linear | origin | snapshot
    device: E.DeviceSpec

    @property
    def size(self) -> int:
        return self.device.size

    @property
    def paths(self) -> tuple[str, str]:
        return f"/dev/{self.vg}/{self.lv}", f"/dev/mapper/{self.name}"


@dataclass
class Plan:
    """What to serve after a scan, and what changed since the last plan."""

    served: dict[str, ServedLv] = field(default_factory=dict)
    stores: dict[str, E.StoreSpec] = field(default_factory=dict)
    known: dict[str, str] = field(default_factory=dict)  # path -> dm uuid, every LV seen
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    grown: list[tuple[str, int, int]] = field(default_factory=list)  # name, old, new size


def plan(found: Scan, host: str, ident: Callable[[Any], str],
         warn: Callable[[str], None] = log.warning) -> Plan:
    """The LVs of ``found`` active on ``host``, as engine devices and stores.
    ``ident``: a PV's device -> its map id (the map's WWID)."""
    out = Plan()
    for st in found.vgs:
        vg = st.vg
        ids = {u: ident(d.dev) for u, d in st.disks.items()}
        for lv in vg.lvs:
            if lv.snapshot_seg is not None:
                continue
            name = dm_name(vg.name, lv.name)
            uuid = f"LVM-{vg.uuid}{lv.uuid}"
            if vg.user_visible(lv):
                out.known[f"/dev/{vg.name}/{lv.name}"] = out.known[f"/dev/mapper/{name}"] = uuid
            if host not in lv.active_hosts() or not vg.user_visible(lv):
                continue
            try:
                m = describe(vg, lv, ids)
            except VolumeError as exc:
                warn(f"{vg.name}/{lv.name} is active here but cannot be served: {exc}")
                continue
            out.served[name] = _served(name, vg.name, lv.name, m, out.stores)
    return out


def _served(name: str, vg: str, lv: str, m: LvMap, stores: dict[str, E.StoreSpec]) -> ServedLv:
    origin = m.origin if m.kind == "snapshot" else m.segments
    for cow in m.cows:
        stores[cow.snapshot] = E.StoreSpec(cow.snapshot, sum(s.length for s in cow.segments),
                                           cow.chunk_size, _segs(cow.segments), _segs(origin))
    if m.kind == "snapshot":
        dev = E.DeviceSpec(name, m.size, _segs(m.origin), snap=m.cows[0].snapshot)
    else:
        dev = E.DeviceSpec(name, m.size, _segs(m.segments), tuple(c.snapshot for c in m.cows))
    return ServedLv(name, vg, lv, m.uuid, m.kind, dev)


class LvServer:
    """This host's served LVs: the engine's device specs, the paths that name them."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.file = home / "volumes" / "served.json"
        self.current = Plan()
        self.load()

    # ---- the engine's view -----------------------------------------------------------
    def specs(self) -> tuple[list[E.StoreSpec], list[E.DeviceSpec]]:
        return list(self.current.stores.values()), [s.device for s in
                                                     self.current.served.values()]

    def update(self, new: Plan) -> bool:
        """Take ``new`` as what is served (its added, removed and grown say what changed);
        whether anything did (the engine then needs a sync)."""
        old = self.current.served
        new.added = [n for n in new.served if n not in old]
        new.removed = [n for n in old if n not in new.served]
        new.grown = [(n, old[n].size, s.size) for n, s in new.served.items()
                     if n in old and s.size > old[n].size]
        changed = (new.served != old or new.stores != self.current.stores
                   or new.known != self.current.known)
        self.current = new
        if changed:
            self.save()
        return changed

    # ---- names -----------------------------------------------------------------------
    def name_of(self, path: str) -> str | None:
        """The dm name of the LV that ``path`` (/dev/VG/LV or /dev/mapper/NAME) names,
        if it is served here."""
        for name, s in self.current.served.items():
            if path in s.paths:
                return name
        return None

    def served(self, name: str) -> ServedLv | None:
        return self.current.served.get(name)

    def socket(self, path: str) -> Path | None:
        name = self.name_of(path)
        return self.home / "mapper" / f"{name}.sock" if name is not None else None

    def identity(self, path: str) -> str | None:
        """What names the LV at ``path`` on any host: its dm uuid (a migration's check)."""
        uuid = self.current.known.get(path)
        return f"dm:{uuid}" if uuid else None

    def hint(self, path: str) -> str | None:
        """Why ``path`` is no disk here, if it names an LV this host knows."""
        if path in self.current.known:
            lv = path.removeprefix("/dev/").removeprefix("mapper/")
            return (f"{path} is an LV that is not active on this host (lvchange -ay "
                    f"{lv if '/' in lv else 'VG/LV'})")
        return None

    # ---- on disk ---------------------------------------------------------------------
    def save(self) -> None:
        data = {"served": [asdict(s) for s in self.current.served.values()],
                "stores": [asdict(s) for s in self.current.stores.values()],
                "known": self.current.known}
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.file)

    def load(self) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
            data = json.loads(self.file.read_text())
            plan_ = Plan(known={str(k): str(v) for k, v in data.get("known", {}).items()})
            for s in data["stores"]:
                st = E.StoreSpec(s["ident"], int(s["size"]), int(s["chunk"]),
                                 _seg_list(s["cow"]), _seg_list(s["origin"]))
                plan_.stores[st.ident] = st
            for s in data["served"]:
                d = s["device"]
                dev = E.DeviceSpec(d["name"], int(d["size"]), _seg_list(d["segs"]),
                                   tuple(d["cows"]), d["snap"])
                plan_.served[s["name"]] = ServedLv(s["name"], s["vg"], s["lv"], s["uuid"],
                                                   s["kind"], dev)
            self.current = plan_


def _seg_list(raw: list[dict[str, Any]]) -> tuple[E.Segment, ...]:
    return tuple(E.Segment(int(r["start"]), int(r["length"]), str(r["map_id"]),
                           int(r["map_offset"])) for r in raw)
