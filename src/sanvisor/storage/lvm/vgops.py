"""vgcreate, vgextend, vgreduce, vgremove, vgrename."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sanvisor.errors import VolumeError, VolumeExistsError, VolumeInUseError
from sanvisor.storage.lvm import names, signatures
from sanvisor.storage.lvm.blockdev import BlockDevice
from sanvisor.storage.lvm.lvops import remove_lvs
from sanvisor.storage.lvm.manager import Change, Result, VolumeManager
from sanvisor.storage.lvm.model import Pv, Vg, vg_to_text
from sanvisor.storage.lvm.ondisk import new_uuid
from sanvisor.storage.lvm.pvdisk import PvDisk, data_end, orphan, write_label, write_metadata
from sanvisor.storage.lvm.pvops import NewPv, _distinct, precheck, prepare, unlease
from sanvisor.storage.lvm.scan import Scan

DEFAULT_EXTENT = 4 << 20


def _members(mgr: VolumeManager, found: Scan, devs: list[BlockDevice], vg_name: str,
             force: int, copies: int) -> tuple[list[PvDisk], list[NewPv]]:
    """The PVs ``devs`` give a VG: existing orphans, or devices to make PVs of."""
    ready, new = [], []
    for dev in devs:
        disk = found.disk(dev.name)
        if disk is None:
            new.append(prepare(found, dev, force=force, copies=copies))
            continue
        owner = found.vg_of(disk)
        if owner is not None:
            raise VolumeInUseError(f'Physical volume "{dev.name}" is already in volume group '
                                   f'"{owner.vg.name}"', device=dev.name, vg=owner.vg.name)
        if any(c.error for c in disk.copies):
            raise VolumeError(f"{dev.name}: {next(c.error for c in disk.copies if c.error)}; "
                              "pvcreate it again first", device=dev.name)
        ready.append(disk)
    return ready, new


def _fresh(devs: list[BlockDevice], force: int) -> list[BlockDevice]:
    """The devices that are no PV yet, checked before their lease is written."""
    fresh = [d for d in devs if not signatures.has_lvm_label(d.read(0, 2048))]
    for d in fresh:
        precheck(d, force)
    return fresh


@contextlib.contextmanager
def _unleasing(mgr: VolumeManager, fresh: list[BlockDevice]) -> Iterator[None]:
    try:
        yield
    finally:
        unlease(mgr, fresh)


def _pv_entry(disk: PvDisk, extent: int) -> Pv:
    lab = disk.label
    count = (data_end(lab) - lab.pe_start) // extent
    if count < 1:
        raise VolumeError(f"{disk.dev.name} is smaller than one extent ({extent >> 20} MiB)",
                          device=disk.dev.name)
    return Pv(uuid=lab.uuid, device=disk.dev.name, dev_size=lab.dev_size // 512,
              pe_start=lab.pe_start // 512, pe_count=count)


def vgcreate(mgr: VolumeManager, vg_name: str, devices: list[str], *,
             extent_size: int = DEFAULT_EXTENT, force: int = 0, metadatacopies: int = 2,
             description: str = "") -> Result:
    names.check_vg_name(vg_name)
    if extent_size < 4096 or extent_size & (extent_size - 1) or extent_size % 512:
        raise VolumeError("the extent size must be a power of 2 of at least 4 KiB")
    if not devices:
        raise VolumeError("vgcreate: give at least one device")
    mgr.begin()
    msgs = []
    devs = _distinct([mgr.device(n) for n in devices])
    fresh = _fresh(devs, force)
    with _unleasing(mgr, fresh), mgr.global_change(devs) as (found, guard):
        if any(v.vg.name == vg_name for v in found.vgs):
            raise VolumeExistsError(f"A volume group called {vg_name} already exists.",
                                    vg=vg_name)
        ready, new = _members(mgr, found, devs, vg_name, force, metadatacopies)
        for p in new:
            ready.append(p.write(guard))
            msgs.append(f'Physical volume "{p.dev.name}" successfully created.')
        ordered = sorted(ready, key=lambda d: [x.name for x in devs].index(d.dev.name))
        vg = Vg(name=vg_name, uuid=new_uuid(), extent_size=extent_size // 512, seqno=1,
                pvs=[_pv_entry(d, extent_size) for d in ordered])
        for d in ordered:
            d.label.used = True
            write_label(d.dev, d.label, guard)
        write_metadata(ordered, vg_to_text(vg, description or f"Write from vgcreate {vg_name}",
                                           mgr.host), guard)
    msgs.append(f'Volume group "{vg_name}" successfully created')
    return Result(msgs, {"vg": vg_name, "uuid": vg.uuid})


def vgextend(mgr: VolumeManager, vg_name: str, devices: list[str], *, force: int = 0,
             metadatacopies: int = 2, description: str = "") -> Result:
    mgr.begin()
    msgs = []
    devs = _distinct([mgr.device(n) for n in devices])
    fresh = _fresh(devs, force)
    with _unleasing(mgr, fresh), mgr.change(vg_name, extra=devs) as ch:
        for dev in devs:
            disk = ch.scan.disk(dev.name)
            if disk is not None and disk.uuid in ch.state.disks:
                raise VolumeExistsError(f'Physical volume "{dev.name}" is already in volume '
                                        f'group "{vg_name}"', device=dev.name)
        ready, new = _members(mgr, ch.scan, devs, vg_name, force, metadatacopies)
        for p in new:
            ready.append(p.write(ch.guard))
            msgs.append(f'Physical volume "{p.dev.name}" successfully created.')
        for d in sorted(ready, key=lambda d: [x.name for x in devs].index(d.dev.name)):
            ch.vg.pvs.append(_pv_entry(d, ch.vg.extent_size * 512))
            ch.joining[d.uuid] = d
        ch.commit(description or f"Write from vgextend {vg_name}")
    msgs.append(f'Volume group "{vg_name}" successfully extended')
    return Result(msgs, {"vg": vg_name})


def vgreduce(mgr: VolumeManager, vg_name: str, devices: list[str], *,
             removemissing: bool = False, force: bool = False, description: str = "") -> Result:
    mgr.begin()
    msgs: list[str] = []
    with mgr.change(vg_name, allow_missing=removemissing) as ch:
        vg = ch.vg
        used = vg.used_extents()
        if removemissing:
            gone = {p.uuid for p in vg.pvs if p.uuid in ch.state.missing or p.missing}
            hit = sorted({lv for u in gone for _, _, lv in used.get(u, [])})
            if hit and not force:
                raise VolumeInUseError(f"LVs {', '.join(hit)} have extents on missing PVs: "
                                       "vgreduce --removemissing --force removes them",
                                       vg=vg_name, lvs=hit)
            msgs += remove_lvs(ch, hit, force=True, quiet=True)
        else:
            gone = set()
            for name in devices:
                disk = ch.scan.disk(mgr.device(name).name)
                if disk is None or disk.uuid not in ch.state.disks:
                    raise VolumeError(f'Physical volume "{name}" not in volume group '
                                      f'"{vg_name}"', device=name)
                if used.get(disk.uuid):
                    raise VolumeInUseError(f'Physical volume "{disk.dev.name}" still in use',
                                           device=disk.dev.name)
                gone.add(disk.uuid)
                msgs.append(f'Removed "{disk.dev.name}" from volume group "{vg_name}"')
        if gone and len(gone) >= len(vg.pvs):
            raise VolumeError(f'Can\'t remove final physical volume from volume group '
                              f'"{vg_name}"', vg=vg_name)
        vg.pvs = [p for p in vg.pvs if p.uuid not in gone]
        ch.commit(description or f"Write from vgreduce {vg_name}")
    if removemissing:
        msgs.append(f"Wrote out consistent volume group {vg_name}.")
    return Result(msgs, {"vg": vg_name})


def vgremove(mgr: VolumeManager, vg_name: str, *, force: bool = False) -> Result:
    mgr.begin()
    with mgr.change(vg_name) as ch:
        lvs = [lv.name for lv in ch.vg.lvs if ch.vg.user_visible(lv)]
        if lvs and not force:
            raise VolumeInUseError(f'Volume group "{vg_name}" still contains {len(lvs)} logical '
                                   "volume(s): remove them, or use vgremove -f", vg=vg_name,
                                   lvs=lvs)
        msgs = remove_lvs(ch, lvs, force=True)
        _drop_vg(ch)
    msgs.append(f'Volume group "{vg_name}" successfully removed')
    return Result(msgs, {"vg": vg_name})


def _drop_vg(ch: Change) -> None:
    """Every PV of the VG an orphan again (vgremove)."""
    for disk in [*ch.state.disks.values(), *ch.state.outdated]:
        orphan(disk, ch.guard)


def vgrename(mgr: VolumeManager, old: str, new: str) -> Result:
    names.check_vg_name(new)
    mgr.begin()
    with mgr.global_change([]) as (found, guard):
        if any(v.vg.name == new for v in found.vgs):
            raise VolumeExistsError(f"A volume group called {new} already exists.", vg=new)
        state = next((v for v in found.vgs
                      if old == v.vg.name or old.replace("-", "") == v.vg.uuid), None)
        if state is None:
            found.vg(old)  # raises: not found
            raise AssertionError
        for lv in state.vg.lvs:  # every LV's device name goes with the VG's
            mgr.check_unused(state.vg.name, lv.name, "rename the VG of")
        ch = Change(mgr, found, state, guard)
        from sanvisor.storage.lvm.manager import check_writable

        check_writable(state)
        ch.vg.name = new
        ch.commit(f"Write from vgrename {old} {new}")
    return Result([f'Volume group "{old}" successfully renamed to "{new}"'], {"vg": new})
