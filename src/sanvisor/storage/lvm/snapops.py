"""Snapshots: lvcreate -s, lvconvert --merge, and a snapshot's fill (lvs Data%).

A snapshot is written as lvm2 writes one (model.py): its COW LV, hidden, and a
``snapshotN`` LV of one ``snapshot`` segment. Its exception store is initialised on
the COW extents *before* the metadata that makes them a snapshot is committed, while
they are still free: a host killed in between leaves free extents with a header in
them, never a snapshot whose store holds an old snapshot's exceptions.

A merge (the seed's "test an update, then roll back") copies every chunk the store
holds back onto the origin, then removes the snapshot. It is marked in the metadata
first (``merging_store``, as lvm2 does), so that a merge interrupted by a crash, or
asked for while the origin is active, finishes at the origin's next activation.
"""

from __future__ import annotations

import time

from sanvisor.errors import MetadataError, VolumeError, VolumeExistsError
from sanvisor.storage.lvm import alloc, cowstore, names
from sanvisor.storage.lvm.blockdev import BlockDevice
from sanvisor.storage.lvm.lvops import find_lv, pv_uuids, remove_lvs, target_extents
from sanvisor.storage.lvm.manager import Change, Result, VolumeManager
from sanvisor.storage.lvm.model import ACTIVE_TAG, Lv, Segment, Vg
from sanvisor.storage.lvm.names import Amount
from sanvisor.storage.lvm.ondisk import new_uuid
from sanvisor.storage.lvm.report import human_long
from sanvisor.storage.lvm.segments import LvIo, lv_segments


def _io(vg: Vg, lv: Lv, devices: dict[str, BlockDevice]) -> LvIo:
    return LvIo(lv_segments(vg, lv, {u: u for u in devices}), devices)


def lvcreate_snapshot(mgr: VolumeManager, vg_name: str, origin_name: str, name: str,
                      amount: Amount, *, chunk: int = cowstore.DEFAULT_CHUNK,
                      pvs: list[str] | None = None, description: str = "") -> Result:
    names.check_lv_name(name)
    cowstore.check_chunk_size(chunk)
    if amount.sign:
        raise VolumeError("lvcreate takes a size, not a change of size (no + or -)")
    mgr.begin()
    msgs = []
    with mgr.change(vg_name) as ch:
        vg = ch.vg
        origin = find_lv(vg, origin_name)
        if vg.cow_of(origin) is not None:
            raise VolumeError("Snapshots of snapshots are not supported.")
        if any(s.merging for s in vg.snapshots_of(origin.name)):
            raise VolumeError(f"{vg_name}/{origin_name} is being merged into: wait for the "
                              "merge (at its next activation)")
        if vg.lv(name) is not None:
            raise VolumeExistsError(f'Logical Volume "{name}" already exists in volume group '
                                    f'"{vg_name}"', vg=vg_name, lv=name)
        restrict = pv_uuids(ch, pvs or [])
        count = target_extents(vg, amount, 0, restrict, origin=origin.extents)
        most = -(-cowstore.max_cow_sectors(origin.extents * vg.extent_size, chunk)
                 // vg.extent_size)
        ext = vg.extent_size * 512
        if count > most:
            msgs.append(f"Reducing COW size {human_long(count * ext)} down to maximum usable "
                        f"size {human_long(most * ext)}.")
            count = most
        if count < 1:
            raise VolumeError(f"lvcreate: snapshot {name} would have no extents")
        now = int(time.time())
        cow = Lv(name=name, uuid=new_uuid(), status=["READ", "WRITE"], creation_time=now,
                 creation_host=mgr.host,
                 tags=[t for t in origin.tags if t.startswith(ACTIVE_TAG)])
        alloc.extend(cow, alloc.allocate(vg, count, restrict, what=f"snapshot {name}"))
        io = _io(vg, cow, {u: d.dev for u, d in ch.state.disks.items()})
        ch.guard()
        cowstore.init_store(io.write, chunk)
        io.flush()
        taken = {lv.name for lv in vg.lvs}
        n = next(i for i in range(len(taken) + 1) if f"snapshot{i}" not in taken)
        snap = Lv(name=f"snapshot{n}", uuid=new_uuid(), creation_time=now,
                  creation_host=mgr.host,
                  segments=[Segment(0, origin.extents, "snapshot", chunk_size=chunk,
                                    origin=origin.name, cow=name)])
        vg.lvs += [cow, snap]
        ch.commit(description or f"Write from lvcreate -s -n {name} {vg_name}/{origin_name}")
    msgs.append(f'Logical volume "{name}" created.')
    return Result(msgs, {"vg": vg_name, "lv": name, "origin": origin_name,
                         "extents": count, "chunk_size": chunk * 512})


def lvconvert_merge(mgr: VolumeManager, vg_name: str, snap_name: str) -> Result:
    mgr.begin()
    with mgr.change(vg_name) as ch:
        vg = ch.vg
        cow = find_lv(vg, snap_name)
        seg = vg.cow_of(cow)
        if seg is None:
            raise VolumeError(f'"{vg_name}/{snap_name}" is not a mergeable logical volume.')
        origin = vg.lv(seg.origin)
        assert origin is not None
        store = read_store(vg, cow, {u: d.dev for u, d in ch.state.disks.items()})
        if store is not None and not store.valid:
            raise VolumeError(f"Unable to merge invalidated snapshot {vg_name}/{snap_name}.")
        if any(s.merging and s is not seg for s in vg.snapshots_of(origin.name)):
            raise VolumeError(f"{vg_name}/{origin.name} is already being merged into")
        seg.merging = True
        ch.commit(f"Write from lvconvert --merge {vg_name}/{snap_name}")
        if origin.active_hosts() or cow.active_hosts():
            return Result([f"Merging of snapshot {vg_name}/{snap_name} will occur on next "
                           f"activation of {vg_name}/{origin.name}."],
                          {"vg": vg_name, "lv": snap_name, "merged": False})
        msgs = [f"Merging of volume {vg_name}/{snap_name} started."]
        msgs += finish_merge(ch, origin)
        ch.commit(f"Write from lvconvert --merge {vg_name}/{snap_name}")
    return Result(msgs, {"vg": vg_name, "lv": snap_name, "merged": True})


def finish_merge(ch: Change, lv: Lv) -> list[str]:
    """Copy a merging snapshot of ``lv`` (or of ``lv``'s origin) back onto the origin
    and take the snapshot out of ``ch.vg`` (the caller commits)."""
    vg = ch.vg
    seg = vg.cow_of(lv)
    origin = vg.lv(seg.origin) if seg is not None else lv
    assert origin is not None
    merging = [s for s in vg.snapshots_of(origin.name) if s.merging]
    if not merging:
        return []
    s = merging[0]
    cow = vg.lv(s.cow)
    assert cow is not None
    devices = {u: d.dev for u, d in ch.state.disks.items()}
    store = read_store(vg, cow, devices)
    copied = 0
    if store is not None and store.valid:
        src, dst = _io(vg, cow, devices), _io(vg, origin, devices)
        c = store.chunk * 512
        for old, new in sorted(store.exceptions.items()):
            at = old * c
            if at >= dst.size:
                continue
            data = src.read(new * c, c)[:dst.size - at]
            ch.guard()
            dst.write(at, data)
            copied += 1
        dst.flush()
    remove_lvs(ch, [cow.name], force=True, quiet=True)
    return [f"{vg.name}/{origin.name}: Merged: 100.00% ({copied} chunks copied back)"]


def read_store(vg: Vg, cow: Lv, devices: dict[str, BlockDevice]) -> cowstore.Store | None:
    io = _io(vg, cow, devices)
    return cowstore.read_store(io.read, io.size)


def usage(vg: Vg, cow: Lv, devices: dict[str, BlockDevice]) -> tuple[float | None, bool]:
    """(Data% as dm-snapshot reports it, valid) of a snapshot, read from its store."""
    try:
        store = read_store(vg, cow, devices)
    except (MetadataError, VolumeError):
        return None, False
    if store is None:
        return 0.0, True
    if not store.valid:
        return 100.0, False
    total = cow.extents * vg.extent_size
    used = store.used_sectors()
    return (0.0 if used <= store.metadata_sectors() else 100.0 * used / total), True
