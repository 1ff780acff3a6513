"""lvcreate, lvextend/lvreduce/lvresize, lvrename, lvremove, lvchange.

Activation is the pool's record of which host has an LV open for writing: the tag
``sanvisor:active=HOST`` in the VG metadata (lvm2 shows it with `lvs -o +lv_tags`; it
is HA-LVM's old way of exclusive activation by host tags). One host at a time; a
migration hands over explicitly: the source adds ``sanvisor:handover=TARGET``, the
target activates too, the source deactivates (which ends the handover).
"""

from __future__ import annotations

import time

from sanvisor.errors import (
    VolumeError,
    VolumeExistsError,
    VolumeInUseError,
    VolumeNotFoundError,
)
from sanvisor.storage.lvm import alloc, names
from sanvisor.storage.lvm.manager import Change, Result, VolumeManager
from sanvisor.storage.lvm.model import ACTIVE_TAG, HANDOVER_TAG, Lv, Vg
from sanvisor.storage.lvm.names import Amount
from sanvisor.storage.lvm.ondisk import new_uuid
from sanvisor.storage.lvm.report import human_long
from sanvisor.storage.lvm.segments import LvIo, lv_segments


def find_lv(vg: Vg, name: str) -> Lv:
    lv = vg.lv(name)
    if lv is None or lv.snapshot_seg is not None:
        raise VolumeNotFoundError(f'Failed to find logical volume "{vg.name}/{name}"',
                                  vg=vg.name, lv=name)
    return lv


def pv_uuids(ch: Change, pvs: list[str]) -> list[str] | None:
    """The PVs named on a command line (allocation restricted to them)."""
    if not pvs:
        return None
    out = []
    for name in pvs:
        disk = ch.scan.disk(ch.mgr.device(name).name)
        if disk is None or disk.uuid not in ch.state.disks:
            raise VolumeError(f'Physical volume "{name}" not in volume group "{ch.vg.name}"')
        out.append(disk.uuid)
    return out


def target_extents(vg: Vg, amount: Amount, current: int, pvs: list[str] | None,
                   origin: int = 0) -> int:
    ext = vg.extent_size * 512
    if amount.extents:
        base = {"": amount.value, "FREE": vg.free_count, "VG": vg.extent_count,
                "ORIGIN": origin,
                "PVS": sum(p.pe_count for p in vg.pvs if pvs is None or p.uuid in pvs)}
        n = (base[amount.percent_of] * amount.value // 100 if amount.percent_of
             else amount.value)
    else:
        n = -(-amount.value // ext)
    return current + n if amount.sign == "+" else current - n if amount.sign == "-" else n


def lvcreate(mgr: VolumeManager, vg_name: str, name: str, amount: Amount, *,
             pvs: list[str] | None = None, activate: bool = True, zero: bool = True,
             tags: list[str] | None = None, description: str = "") -> Result:
    names.check_lv_name(name)
    for t in tags or []:
        names.check_tag(t)
    if amount.sign:
        raise VolumeError("lvcreate takes a size, not a change of size (no + or -)")
    mgr.begin()
    msgs = []
    with mgr.change(vg_name) as ch:
        vg = ch.vg
        if vg.lv(name) is not None:
            raise VolumeExistsError(f'Logical Volume "{name}" already exists in volume group '
                                    f'"{vg_name}"', vg=vg_name, lv=name)
        restrict = pv_uuids(ch, pvs or [])
        count = target_extents(vg, amount, 0, restrict)
        if count < 1:
            raise VolumeError(f"lvcreate: {name} would have no extents")
        if not amount.extents and amount.value % (vg.extent_size * 512):
            msgs.append(f"Rounding up size to full physical extent "
                        f"{human_long(count * vg.extent_size * 512)}.")
        lv = Lv(name=name, uuid=new_uuid(), creation_time=int(time.time()),
                creation_host=mgr.host, tags=list(tags or []))
        alloc.extend(lv, alloc.allocate(vg, count, restrict, what=f"{vg_name}/{name}"))
        if zero:  # as lvm2 -Zy: the first 4 KiB, while the extents are still free
            io = LvIo(lv_segments(vg, lv, {u: u for u in ch.state.disks}),
                      {u: d.dev for u, d in ch.state.disks.items()})
            ch.guard()
            io.write(0, bytes(min(4096, io.size)))
            io.flush()
        if activate:
            lv.tags.append(ACTIVE_TAG + mgr.host)
        vg.lvs.append(lv)
        ch.commit(description or f"Write from lvcreate -n {name} {vg_name}")
    msgs.append(f'Logical volume "{name}" created.')
    return Result(msgs, {"vg": vg_name, "lv": name, "extents": count,
                         "size": count * vg.extent_size * 512})


def lvresize(mgr: VolumeManager, vg_name: str, name: str, amount: Amount, *, verb: str,
             force: bool = False, pvs: list[str] | None = None, description: str = "") -> Result:
    mgr.begin()
    with mgr.change(vg_name) as ch:
        vg = ch.vg
        lv = find_lv(vg, name)
        cow = vg.cow_of(lv)
        if vg.snapshots_of(lv.name):
            raise VolumeInUseError(f"{vg_name}/{name} has snapshots: an origin keeps its size "
                                   "while it has any (remove or merge them first)")
        old = lv.extents
        restrict = pv_uuids(ch, pvs or [])
        new = target_extents(vg, amount, old, restrict)
        ext = vg.extent_size * 512
        if new == old:
            raise VolumeError(f"New size ({new} extents) matches existing size ({old} "
                              "extents).")
        if new < 1:
            raise VolumeError(f"{verb}: {vg_name}/{name} would have no extents left")
        if verb == "lvextend" and new < old:
            raise VolumeError(f"New size given ({new} extents) not larger than existing size "
                              f"({old} extents)")
        if verb == "lvreduce" and new > old:
            raise VolumeError(f"New size given ({new} extents) not less than existing size "
                              f"({old} extents)")
        if new < old:
            mgr.check_unused(vg_name, name, "reduce")
            if cow is not None:
                raise VolumeError(f"{vg_name}/{name} is a snapshot: its store can grow, "
                                  "not shrink")
            if not force:
                raise VolumeError(f"Reducing {vg_name}/{name} to {human_long(new * ext)} "
                                  "destroys the data beyond: confirm with -f")
            alloc.reduce(lv, new)
        else:
            alloc.extend(lv, alloc.allocate(vg, new - old, restrict, alloc.end_of(lv),
                                            what=f"{vg_name}/{name}"))
        ch.commit(description or f"Write from {verb} {vg_name}/{name}")
    return Result([f"Size of logical volume {vg_name}/{name} changed from "
                   f"{human_long(old * ext)} ({old} extents) to {human_long(new * ext)} "
                   f"({new} extents).", f"Logical volume {vg_name}/{name} successfully "
                   "resized."], {"vg": vg_name, "lv": name, "extents": new, "size": new * ext})


def lvrename(mgr: VolumeManager, vg_name: str, old: str, new: str) -> Result:
    names.check_lv_name(new)
    mgr.begin()
    with mgr.change(vg_name) as ch:
        vg = ch.vg
        lv = find_lv(vg, old)
        for x in _activation_group(vg, lv):  # its device's name goes with the old one
            mgr.check_unused(vg_name, x.name, "rename")
        if vg.lv(new) is not None:
            raise VolumeExistsError(f'Logical Volume "{new}" already exists in volume group '
                                    f'"{vg_name}"', vg=vg_name, lv=new)
        for _snap, seg in vg.snapshots():
            seg.origin = new if seg.origin == old else seg.origin
            seg.cow = new if seg.cow == old else seg.cow
        lv.name = new
        ch.commit(f"Write from lvrename {vg_name} {old} {new}")
    return Result([f'Renamed "{old}" to "{new}" in volume group "{vg_name}"'],
                  {"vg": vg_name, "lv": new})


def remove_lvs(ch: Change, lvs: list[str], *, force: bool, quiet: bool = False) -> list[str]:
    """Take LVs (and what goes with them: a snapshot's snapshotN LV, an origin's
    snapshots) out of ``ch.vg``; the messages lvm2 prints."""
    vg, msgs, gone = ch.vg, [], set()
    for name in lvs:
        if name in gone:
            continue  # went with its origin
        lv = find_lv(vg, name) if not quiet else vg.lv(name)
        if lv is None:
            continue
        others = [h for h in lv.active_hosts() if h != ch.mgr.host]
        if others and not quiet:
            raise VolumeInUseError(f"Logical volume {vg.name}/{name} is active on "
                                   f"{', '.join(others)}: deactivate it there first",
                                   lv=name, hosts=others)
        if lv.active_hosts() and not force and not quiet:
            raise VolumeInUseError(f"Logical volume {vg.name}/{name} is active on this host: "
                                   "lvchange -an it, or lvremove -f", lv=name)
        if not quiet:
            ch.mgr.check_unused(vg.name, name, "remove")
        snaps = vg.snapshots_of(name)
        if snaps and not force:
            raise VolumeInUseError(f"Removing origin {name} would also remove {len(snaps)} "
                                   "snapshot(s): use lvremove -f", lv=name)
        for seg in snaps:
            msgs += remove_lvs(ch, [seg.cow], force=True, quiet=quiet)
            gone.add(seg.cow)
        seg_of = vg.cow_of(lv)
        if seg_of is not None:  # a snapshot: its snapshotN LV goes with it
            vg.lvs = [x for x in vg.lvs if x.snapshot_seg is not seg_of]
        vg.lvs = [x for x in vg.lvs if x.name != lv.name]
        gone.add(lv.name)
        msgs.append(f'Logical volume "{lv.name}" successfully removed.')
    return msgs


def lvremove(mgr: VolumeManager, vg_name: str, lvs: list[str], *, force: bool = False
             ) -> Result:
    mgr.begin()
    with mgr.change(vg_name) as ch:
        if not lvs:  # lvremove VG: every LV of it
            lvs = [lv.name for lv in ch.vg.lvs if ch.vg.user_visible(lv)]
        msgs = remove_lvs(ch, lvs, force=force)
        ch.commit(f"Write from lvremove {vg_name}/{','.join(lvs)}")
    return Result(msgs, {"vg": vg_name, "removed": lvs})


def lvchange(mgr: VolumeManager, vg_name: str, lvs: list[str], *, activate: str | None = None,
             addtag: list[str] | None = None, deltag: list[str] | None = None,
             handover: str | None = None, force: bool = False) -> Result:
    from sanvisor.storage.lvm.snapops import finish_merge

    if activate not in (None, "y", "ey", "n", "sy"):
        raise VolumeError(f"-a {activate}: y, ey or n")
    if activate == "sy":
        raise VolumeError("shared activation is not offered: an LV is open for writing on one "
                          "host at a time (lvchange --handover HOST for a migration)")
    for t in (addtag or []) + (deltag or []):
        names.check_tag(t)
    if handover is not None:
        names.check_tag(HANDOVER_TAG + handover)
    mgr.begin()
    msgs: list[str] = []
    with mgr.change(vg_name) as ch:
        vg, me = ch.vg, mgr.host
        for name in lvs:
            lv = find_lv(vg, name)
            group = _activation_group(vg, lv)
            if activate in ("y", "ey"):
                for x in group:
                    others = [h for h in x.active_hosts() if h != me]
                    if others and me not in x.handover_hosts() and not force:
                        raise VolumeInUseError(
                            f"Logical volume {vg_name}/{x.name} is active on "
                            f"{', '.join(others)}: it is open for writing on one host at a "
                            f"time (there: lvchange -an, or lvchange --handover {me}; "
                            f"--force if {', '.join(others)} is down)", lv=x.name, hosts=others)
                msgs += finish_merge(ch, lv)
                for x in _activation_group(vg, lv):
                    if force:
                        x.tags = [t for t in x.tags if not t.startswith(ACTIVE_TAG)]
                    if ACTIVE_TAG + me not in x.tags:
                        x.tags.append(ACTIVE_TAG + me)
            elif activate == "n":
                for x in group:
                    mgr.check_unused(vg_name, x.name, "deactivate")
                for x in group:  # the source deactivating ends a handover; the target
                    target = me in x.handover_hosts()  # (a migration undone) does not
                    x.tags = [t for t in x.tags if t != ACTIVE_TAG + me]
                    if not target or not x.active_hosts():
                        x.tags = [t for t in x.tags if not t.startswith(HANDOVER_TAG)]
            if handover is not None:
                for x in group:
                    if me not in x.active_hosts():
                        raise VolumeError(f"{vg_name}/{x.name} is not active on this host: "
                                          "nothing to hand over")
                    x.tags = [t for t in x.tags if not t.startswith(HANDOVER_TAG)]
                    x.tags.append(HANDOVER_TAG + handover)
            lv.tags += [t for t in addtag or [] if t not in lv.tags]
            lv.tags = [t for t in lv.tags if t not in (deltag or [])]
        ch.commit(f"Write from lvchange {vg_name}/{','.join(lvs)}")
    return Result(msgs, {"vg": vg_name, "lvs": lvs})


def _activation_group(vg: Vg, lv: Lv) -> list[Lv]:
    """An origin and its snapshots are activated together (dm-snapshot needs both)."""
    seg = vg.cow_of(lv)
    origin = vg.lv(seg.origin) if seg is not None else lv
    assert origin is not None
    cows = [vg.lv(s.cow) for s in vg.snapshots_of(origin.name)]
    return [origin, *[c for c in cows if c is not None]]
