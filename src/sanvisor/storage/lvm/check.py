"""sanvisor's own vgck: is a VG consistent, on disk and in itself?

Every area of every PV holds the same metadata (the newest); every PV is where its
label says and its extents fit the device; every LV's segments follow each other,
lie on the VG's PVs within their extents, and no extent belongs to two LVs; every
snapshot names an origin and a hidden COW LV, with a valid chunk size and a store
that reads as dm-snapshot's.
"""

from __future__ import annotations

from sanvisor.errors import MetadataError, VolumeNameError
from sanvisor.storage.lvm import cowstore, names
from sanvisor.storage.lvm.ondisk import format_uuid
from sanvisor.storage.lvm.pvdisk import data_end
from sanvisor.storage.lvm.scan import VgState


def check_vg(st: VgState) -> list[str]:
    vg = st.vg
    out: list[str] = list(f"metadata area {w} is not up to date" for w in st.lagging)
    out += [f"PV {format_uuid(u)} is missing" for u in st.missing]
    out += [f"{d.dev.name} left the VG but still holds its metadata" for d in st.outdated]
    ext = vg.extent_size
    for pv in vg.pvs:
        disk = st.disks.get(pv.uuid)
        if disk is None:
            continue
        lab = disk.label
        if pv.pe_start * 512 != lab.pe_start:
            out.append(f"PV {disk.dev.name}: pe_start {pv.pe_start} (metadata) is not "
                       f"{lab.pe_start // 512} (label)")
        if (pv.pe_start + pv.pe_count * ext) * 512 > data_end(lab):
            out.append(f"PV {disk.dev.name}: {pv.pe_count} extents run past its data area")
        if not lab.used:
            out.append(f"PV {disk.dev.name}: its label does not say it is in a VG")
    owner: dict[tuple[str, int], str] = {}
    uuids: set[str] = set()
    for lv in vg.lvs:
        if lv.uuid in uuids:
            out.append(f"LV {lv.name}: its uuid is taken by another LV")
        uuids.add(lv.uuid)
        try:
            if lv.snapshot_seg is None:
                names.check_lv_name(lv.name)
        except VolumeNameError as exc:
            out.append(f"LV {lv.name}: {exc}")
        at = 0
        for seg in lv.segments:
            if seg.start_extent != at:
                out.append(f"LV {lv.name}: a segment starts at {seg.start_extent}, not {at}")
            at = seg.start_extent + seg.extent_count
            per = seg.extent_count // max(1, len(seg.stripes))
            for pv_uuid, pe in seg.stripes:
                on = next((p for p in vg.pvs if p.uuid == pv_uuid), None)
                if on is None:
                    out.append(f"LV {lv.name}: a segment is on a PV not in the VG")
                    continue
                if pe + per > on.pe_count:
                    out.append(f"LV {lv.name}: extents {pe}-{pe + per - 1} beyond PV "
                               f"{on.device}'s {on.pe_count}")
                for e in range(pe, pe + per):
                    other = owner.setdefault((pv_uuid, e), lv.name)
                    if other != lv.name:
                        out.append(f"extent {e} of PV {on.device} belongs to {other} and "
                                   f"{lv.name}")
                        break
    out += _check_snapshots(st)
    return out


def _check_snapshots(st: VgState) -> list[str]:
    from sanvisor.storage.lvm.snapops import read_store

    vg, out = st.vg, []
    for snap, seg in vg.snapshots():
        origin, cow = vg.lv(seg.origin), vg.lv(seg.cow)
        if origin is None or cow is None:
            out.append(f"{snap.name}: its origin {seg.origin} or COW {seg.cow} is missing")
            continue
        if cow.visible_flag:
            out.append(f"snapshot {cow.name}: its COW LV is marked visible")
        if vg.cow_of(origin) is not None:
            out.append(f"snapshot {cow.name}: its origin is itself a snapshot")
        if seg.extent_count != origin.extents:
            out.append(f"snapshot {cow.name}: {seg.extent_count} extents, its origin "
                       f"{origin.extents}")
        try:
            cowstore.check_chunk_size(seg.chunk_size)
            if not st.missing:
                store = read_store(vg, cow, {u: d.dev for u, d in st.disks.items()})
                if store is not None and store.chunk != seg.chunk_size:
                    out.append(f"snapshot {cow.name}: its store has chunk size {store.chunk}, "
                               f"the metadata {seg.chunk_size}")
        except MetadataError as exc:
            out.append(f"snapshot {cow.name}: {exc}")
    return out
