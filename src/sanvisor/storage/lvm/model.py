"""A volume group as LVM2's metadata text describes it: read from, and written to, the
text lvm2 writes (lib/format_text/import_vsn1.c and export.c), field for field.

Sizes in the metadata are in 512-byte sectors (extent_size, dev_size, pe_start) or in
extents. Segments name their PVs ``pv0``, ``pv1``... (renumbered at every write);
here they name a PV by its uuid. A snapshot is what lvm2 makes of one: the COW LV
(the name the user gave, hidden) and a ``snapshotN`` LV (visible) whose only segment,
of type ``snapshot``, names the origin, the COW LV and the chunk size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sanvisor.errors import MetadataError
from sanvisor.storage.lvm import cfgtext as C
from sanvisor.storage.lvm.ondisk import format_uuid, parse_uuid

SNAPSHOT_PREFIX = "snapshot"
ACTIVE_TAG = "sanvisor:active="  # + host: the LV is open for writing on that host
HANDOVER_TAG = "sanvisor:handover="  # + host: it may open it too (a migration)
_PV_OPTIONAL = ("device_id_type", "device_id", "ba_start", "ba_size")
_LV_OPTIONAL = ("lock_args", "allocation_policy", "profile", "read_ahead", "major", "minor")
_VG_OPTIONAL = ("system_id", "lock_type", "lock_args", "pr", "allocation_policy", "profile")


@dataclass
class Pv:
    uuid: str  # 32 characters, no dashes
    device: str  # the device hint (/dev/mapper/NAME)
    dev_size: int  # sectors
    pe_start: int  # sectors
    pe_count: int
    status: list[str] = field(default_factory=lambda: ["ALLOCATABLE"])
    flags: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    extra: dict[str, C.Value] = field(default_factory=dict)

    @property
    def missing(self) -> bool:
        return "MISSING" in self.status or "MISSING" in self.flags


@dataclass
class Segment:
    start_extent: int
    extent_count: int
    type: str = "striped"
    stripes: list[tuple[str, int]] = field(default_factory=list)  # (PV uuid, first PE)
    stripe_size: int = 0  # sectors, when there are several stripes
    chunk_size: int = 0  # sectors (snapshot)
    origin: str = ""  # snapshot: the origin LV
    cow: str = ""  # snapshot: the COW LV
    merging: bool = False  # snapshot: merging_store instead of cow_store
    tags: list[str] = field(default_factory=list)
    raw: C.Section = field(default_factory=dict)  # other types, kept as they were

    @property
    def linear(self) -> bool:
        return self.type == "striped" and len(self.stripes) == 1


@dataclass
class Lv:
    name: str
    uuid: str
    segments: list[Segment] = field(default_factory=list)
    status: list[str] = field(default_factory=lambda: ["READ", "WRITE", "VISIBLE"])
    flags: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    creation_time: int = 0
    creation_host: str = ""
    extra: dict[str, C.Value] = field(default_factory=dict)

    @property
    def extents(self) -> int:
        return sum(s.extent_count for s in self.segments)

    @property
    def visible_flag(self) -> bool:
        return "VISIBLE" in self.status

    @property
    def snapshot_seg(self) -> Segment | None:
        """This is a snapshotN LV: its segment."""
        if len(self.segments) == 1 and self.segments[0].type == "snapshot":
            return self.segments[0]
        return None

    def active_hosts(self) -> list[str]:
        return [t.removeprefix(ACTIVE_TAG) for t in self.tags if t.startswith(ACTIVE_TAG)]

    def handover_hosts(self) -> list[str]:
        return [t.removeprefix(HANDOVER_TAG) for t in self.tags
                if t.startswith(HANDOVER_TAG)]


@dataclass
class Vg:
    name: str
    uuid: str
    extent_size: int  # sectors
    seqno: int = 1
    pvs: list[Pv] = field(default_factory=list)
    lvs: list[Lv] = field(default_factory=list)
    status: list[str] = field(default_factory=lambda: ["RESIZEABLE", "READ", "WRITE"])
    flags: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    max_lv: int = 0
    max_pv: int = 0
    metadata_copies: int = 0
    extra: dict[str, C.Value] = field(default_factory=dict)
    historical: C.Section | None = None

    # ---- lookups ------------------------------------------------------------------
    def pv(self, uuid: str) -> Pv:
        for p in self.pvs:
            if p.uuid == uuid:
                return p
        raise MetadataError(f"VG {self.name}: no PV {format_uuid(uuid)}")

    def lv(self, name: str) -> Lv | None:
        return next((lv for lv in self.lvs if lv.name == name), None)

    def snapshots(self) -> list[tuple[Lv, Segment]]:
        """(the snapshotN LV, its segment) for every snapshot."""
        return [(lv, seg) for lv in self.lvs if (seg := lv.snapshot_seg) is not None]

    def cow_of(self, lv: Lv) -> Segment | None:
        """If ``lv`` is a snapshot's COW LV (what the user calls the snapshot)."""
        return next((s for _, s in self.snapshots() if s.cow == lv.name), None)

    def snapshots_of(self, origin: str) -> list[Segment]:
        return [s for _, s in self.snapshots() if s.origin == origin]

    def user_visible(self, lv: Lv) -> bool:
        """lvm2's lv_is_visible: a COW shows as its origin does; snapshotN never."""
        if lv.snapshot_seg is not None:
            return False
        seg = self.cow_of(lv)
        if seg is not None:
            origin = self.lv(seg.origin)
            return (not seg.merging) and origin is not None and origin.visible_flag
        return lv.visible_flag

    def used_extents(self) -> dict[str, list[tuple[int, int, str]]]:
        """PV uuid -> [(first PE, count, LV name)], sorted."""
        used: dict[str, list[tuple[int, int, str]]] = {p.uuid: [] for p in self.pvs}
        for lv in self.lvs:
            for seg in lv.segments:
                n = seg.extent_count // max(1, len(seg.stripes)) if seg.stripes else 0
                for pv, pe in seg.stripes:
                    used.setdefault(pv, []).append((pe, n, lv.name))
        for areas in used.values():
            areas.sort()
        return used

    def free_extents(self, uuid: str) -> int:
        p = self.pv(uuid)
        return p.pe_count - sum(n for _, n, _ in self.used_extents().get(uuid, []))

    @property
    def extent_count(self) -> int:
        return sum(p.pe_count for p in self.pvs)

    @property
    def free_count(self) -> int:
        return sum(self.free_extents(p.uuid) for p in self.pvs)


# ---- reading --------------------------------------------------------------------------

def vg_from_text(data: bytes | str) -> Vg:
    """The VG of a metadata text (MetadataError if it is not a sound one)."""
    tree = C.parse(data)
    names = [k for k, v in tree.items() if isinstance(v, dict)]
    if len(names) != 1:
        raise MetadataError("metadata text: expected exactly one VG section")
    return vg_from_tree(names[0], C.section(tree, names[0], "metadata"))


def vg_from_tree(name: str, node: C.Section) -> Vg:
    w = f"VG {name}"
    vg = Vg(name=name, uuid=parse_uuid(C.get_str(node, "id", w)),
            extent_size=C.get_int(node, "extent_size", w),
            seqno=C.get_int(node, "seqno", w), status=C.get_strs(node, "status", w),
            flags=C.get_strs(node, "flags", w), tags=C.get_strs(node, "tags", w),
            max_lv=C.get_int(node, "max_lv", w, 0), max_pv=C.get_int(node, "max_pv", w, 0),
            metadata_copies=C.get_int(node, "metadata_copies", w, 0),
            extra={k: v for k in _VG_OPTIONAL if not isinstance(v := node.get(k), dict | None)})
    if vg.extent_size <= 0:
        raise MetadataError(f"{w}: extent_size must be positive")
    if vg.seqno < 0:
        raise MetadataError(f"{w}: seqno must not be negative")
    keys: dict[str, str] = {}
    pvs = node.get("physical_volumes", {})
    if not isinstance(pvs, dict):
        raise MetadataError(f"{w}: physical_volumes must be a section")
    for key, pvn in pvs.items():
        if not isinstance(pvn, dict):
            raise MetadataError(f"{w}: {key} must be a section")
        pw = f"{w}, PV {key}"
        pv = Pv(uuid=parse_uuid(C.get_str(pvn, "id", pw)),
                device=C.get_str(pvn, "device", pw, ""),
                dev_size=C.get_int(pvn, "dev_size", pw, 0),
                pe_start=C.get_int(pvn, "pe_start", pw), pe_count=C.get_int(pvn, "pe_count", pw),
                status=C.get_strs(pvn, "status", pw), flags=C.get_strs(pvn, "flags", pw),
                tags=C.get_strs(pvn, "tags", pw),
                extra={k: v for k in _PV_OPTIONAL
                       if not isinstance(v := pvn.get(k), dict | None)})
        if pv.pe_count < 0 or pv.pe_start < 0:
            raise MetadataError(f"{pw}: negative extents")
        if pv.uuid in keys.values():
            raise MetadataError(f"{w}: PV {format_uuid(pv.uuid)} listed twice")
        keys[key] = pv.uuid
        vg.pvs.append(pv)
    lvs = node.get("logical_volumes", {})
    if not isinstance(lvs, dict):
        raise MetadataError(f"{w}: logical_volumes must be a section")
    for lname, lvn in lvs.items():
        if not isinstance(lvn, dict):
            raise MetadataError(f"{w}: {lname} must be a section")
        vg.lvs.append(_lv_from_tree(lname, lvn, keys, f"{w}, LV {lname}"))
    hist = node.get("historical_logical_volumes")
    vg.historical = hist if isinstance(hist, dict) else None
    return vg


def _lv_from_tree(name: str, node: C.Section, keys: dict[str, str], w: str) -> Lv:
    lv = Lv(name=name, uuid=parse_uuid(C.get_str(node, "id", w)),
            status=C.get_strs(node, "status", w), flags=C.get_strs(node, "flags", w),
            tags=C.get_strs(node, "tags", w),
            creation_time=C.get_int(node, "creation_time", w, 0),
            creation_host=C.get_str(node, "creation_host", w, ""),
            extra={k: v for k in _LV_OPTIONAL if not isinstance(v := node.get(k), dict | None)})
    count = C.get_int(node, "segment_count", w)
    for i in range(1, count + 1):
        sn = C.section(node, f"segment{i}", w)
        sw = f"{w}, segment{i}"
        seg = Segment(start_extent=C.get_int(sn, "start_extent", sw),
                      extent_count=C.get_int(sn, "extent_count", sw),
                      type=C.get_str(sn, "type", sw), tags=C.get_strs(sn, "tags", sw))
        if seg.extent_count <= 0 or seg.start_extent != lv.extents:
            raise MetadataError(f"{sw}: segments must follow each other without holes")
        if seg.type == "striped":
            stripes = sn.get("stripes")
            n = C.get_int(sn, "stripe_count", sw)
            if (not isinstance(stripes, list) or n < 1 or len(stripes) != 2 * n
                    or seg.extent_count % n):
                raise MetadataError(f"{sw}: malformed stripes")
            for j in range(n):
                pv, pe = stripes[2 * j], stripes[2 * j + 1]
                if pv not in keys or not isinstance(pe, int) or isinstance(pe, bool) or pe < 0:
                    raise MetadataError(f"{sw}: stripe {j} names no PV of the VG")
                seg.stripes.append((keys[str(pv)], pe))
            if n > 1:
                seg.stripe_size = C.get_int(sn, "stripe_size", sw)
        elif seg.type == "snapshot":
            seg.chunk_size = C.get_int(sn, "chunk_size", sw)
            seg.origin = C.get_str(sn, "origin", sw)
            seg.merging = "merging_store" in sn
            seg.cow = C.get_str(sn, "merging_store" if seg.merging else "cow_store", sw)
        else:
            seg.raw = sn
        lv.segments.append(seg)
    return lv


# ---- writing --------------------------------------------------------------------------

def _strs(items: list[str]) -> str:
    return "[" + ", ".join(C.quote(s) for s in items) + "]"


def _val(v: C.Value) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_val(x) for x in v) + "]"
    return C.quote(v) if isinstance(v, str) else str(v)


def _raw(node: C.Section, out: list[str]) -> None:
    for k, v in node.items():
        if isinstance(v, dict):
            out.append(f"{k} {{")
            _raw(v, out)
            out.append("}")
        else:
            out.append(f"{k} = {_val(v)}")


def vg_to_text(vg: Vg, description: str, host: str, now: int | None = None) -> str:
    """The metadata text lvm2 would write for ``vg`` (its raw-area form: no indentation,
    the header lines after the VG section). Without the final NUL."""
    now = int(time.time()) if now is None else now
    o: list[str] = [f"{vg.name} {{", f'id = "{format_uuid(vg.uuid)}"', f"seqno = {vg.seqno}",
                    'format = "lvm2"', f"status = {_strs(vg.status)}",
                    f"flags = {_strs(vg.flags)}"]
    if vg.tags:
        o.append(f"tags = {_strs(vg.tags)}")
    o += [f"{k} = {_val(v)}" for k, v in vg.extra.items() if k not in ("allocation_policy",
                                                                      "profile")]
    o += [f"extent_size = {vg.extent_size}", f"max_lv = {vg.max_lv}", f"max_pv = {vg.max_pv}"]
    if "allocation_policy" in vg.extra:
        o += ["", f"allocation_policy = {_val(vg.extra['allocation_policy'])}"]
    if "profile" in vg.extra:
        o.append(f"profile = {_val(vg.extra['profile'])}")
    o += [f"metadata_copies = {vg.metadata_copies}", "", "physical_volumes {"]
    key = {p.uuid: f"pv{i}" for i, p in enumerate(vg.pvs)}
    for p in vg.pvs:
        o += ["", f"{key[p.uuid]} {{", f'id = "{format_uuid(p.uuid)}"',
              f"device = {C.quote(p.device)}", ""]
        for k in ("device_id_type", "device_id"):
            if k in p.extra:
                o.append(f"{k} = {_val(p.extra[k])}")
        o += [f"status = {_strs(p.status)}", f"flags = {_strs(p.flags)}"]
        if p.tags:
            o.append(f"tags = {_strs(p.tags)}")
        o += [f"dev_size = {p.dev_size}", f"pe_start = {p.pe_start}", f"pe_count = {p.pe_count}"]
        o += [f"{k} = {_val(p.extra[k])}" for k in ("ba_start", "ba_size") if k in p.extra]
        o.append("}")
    o += ["}", ""]
    if vg.lvs:
        o.append("logical_volumes {")
        ordered = ([lv for lv in vg.lvs if vg.user_visible(lv)]
                   + [lv for lv in vg.lvs if not vg.user_visible(lv)])
        for lv in ordered:
            o += _lv_text(lv, key)
        o.append("}")
    o.append("")
    if vg.historical:
        o.append("historical_logical_volumes {")
        _raw(vg.historical, o)
        o.append("}")
    o.append("}")
    o += [f"# Generated by sanvisor (LVM2 text format): {time.ctime(now)}", "",
          'contents = "Text Format Volume Group"', "version = 1", "",
          f"description = {C.quote(description)}", "",
          f"creation_host = {C.quote(host)}\t# sanvisor",
          f"creation_time = {now}\t# {time.ctime(now)}", "", ""]
    return "\n".join(o)


def _lv_text(lv: Lv, key: dict[str, str]) -> list[str]:
    o = ["", f"{lv.name} {{", f'id = "{format_uuid(lv.uuid)}"', f"status = {_strs(lv.status)}",
         f"flags = {_strs(lv.flags)}"]
    if lv.tags:
        o.append(f"tags = {_strs(lv.tags)}")
    if lv.creation_time:
        o += [f"creation_time = {lv.creation_time}",
              f"creation_host = {C.quote(lv.creation_host)}"]
    o += [f"{k} = {_val(v)}" for k, v in lv.extra.items()]
    o += [f"segment_count = {len(lv.segments)}", ""]
    for i, s in enumerate(lv.segments, 1):
        o += [f"segment{i} {{", f"start_extent = {s.start_extent}",
              f"extent_count = {s.extent_count}", "", f"type = {C.quote(s.type)}"]
        if s.tags:
            o.append(f"tags = {_strs(s.tags)}")
        if s.type == "striped":
            o.append(f"stripe_count = {len(s.stripes)}")
            if len(s.stripes) > 1:
                o.append(f"stripe_size = {s.stripe_size}")
            o += ["", "stripes = ["]
            o += [f'"{key[pv]}", {pe}' + ("," if j < len(s.stripes) - 1 else "")
                  for j, (pv, pe) in enumerate(s.stripes)]
            o.append("]")
        elif s.type == "snapshot":
            o += [f"chunk_size = {s.chunk_size}", f"origin = {C.quote(s.origin)}",
                  f"{'merging_store' if s.merging else 'cow_store'} = {C.quote(s.cow)}"]
        else:
            _raw({k: v for k, v in s.raw.items()
                  if k not in ("start_extent", "extent_count", "type", "tags")}, o)
        o.append("}")
    o.append("}")
    return o
