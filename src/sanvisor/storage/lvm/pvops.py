"""pvcreate and pvremove; and the PV preparation vgcreate and vgextend share (they
make PVs of the devices given that are not PVs yet, as lvm2 does)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sanvisor.errors import VolumeError, VolumeInUseError, VolumeNotFoundError
from sanvisor.storage.lvm import signatures
from sanvisor.storage.lvm.blockdev import BlockDevice
from sanvisor.storage.lvm.manager import Result, VolumeManager
from sanvisor.storage.lvm.ondisk import LABEL_SCAN_SECTORS, SECTOR, PvLabel, new_uuid
from sanvisor.storage.lvm.pvdisk import PvDisk, init_mdas, layout, read_pv, write_label
from sanvisor.storage.lvm.scan import Scan

MIN_PV_SIZE = 2 << 20


@dataclass
class NewPv:
    dev: BlockDevice
    label: PvLabel
    wipe: list[tuple[str, int]]

    def write(self, guard: Callable[[], None]) -> PvDisk:
        guard()
        signatures.wipe(self.dev, self.wipe)
        guard()
        self.dev.write(0, bytes(LABEL_SCAN_SECTORS * SECTOR))  # old labels, boot sector
        init_mdas(self.dev, self.label, guard)
        write_label(self.dev, self.label, guard)
        self.dev.flush()
        return PvDisk(self.dev, self.label)


def precheck(dev: BlockDevice, force: int) -> list[tuple[str, int]]:
    """What ``dev`` holds, refused without --force: checked before anything (its lease
    included) is written to it."""
    sigs = signatures.detect(dev)
    if sigs and not force:
        what = ", ".join(f"{w} (at offset {o})" for w, o in sigs)
        raise VolumeInUseError(f"{dev.name} holds {what}: pvcreate does not overwrite it "
                               "without --force", device=dev.name, found=[w for w, _ in sigs])
    return sigs


def prepare(found: Scan, dev: BlockDevice, *, force: int, copies: int) -> NewPv:
    """Check that ``dev`` may become a PV (nothing written); what to write."""
    disk = found.disk(dev.name)
    if disk is not None:
        owner = found.vg_of(disk)
        if owner is not None and force < 2:
            raise VolumeInUseError(f'Can\'t initialize physical volume "{dev.name}" of volume '
                                   f'group "{owner.vg.name}" without -ff', device=dev.name,
                                   vg=owner.vg.name)
    sigs = precheck(dev, force)
    if copies not in (0, 1, 2):
        raise VolumeError("--pvmetadatacopies must be 0, 1 or 2")
    if dev.size < MIN_PV_SIZE:
        raise VolumeError(f"{dev.name} is too small for a PV ({dev.size} bytes; at least "
                          f"{MIN_PV_SIZE})", device=dev.name)
    mdas, pe_start = layout(dev.size, copies)
    return NewPv(dev, PvLabel(uuid=new_uuid(), dev_size=dev.size, pe_start=pe_start,
                              mdas=mdas), sigs)


def pvcreate(mgr: VolumeManager, names: list[str], *, force: int = 0,
             metadatacopies: int = 2) -> Result:
    mgr.begin()
    with mgr.lock:
        devs = _distinct([mgr.device(n) for n in names])
        fresh = [d for d in devs if not signatures.has_lvm_label(d.read(0, 2048))]
        for d in fresh:
            precheck(d, force)
        try:
            with mgr.leased({mgr.ident(d): d for d in devs}) as guard:
                found = mgr.scan()
                plans = [prepare(found, d, force=force, copies=metadatacopies) for d in devs]
                for p in plans:
                    p.write(guard)
        finally:
            unlease(mgr, fresh)
    return Result([f'Physical volume "{d.name}" successfully created.' for d in devs],
                  {"pvs": [d.name for d in devs]})


def pvremove(mgr: VolumeManager, names: list[str], *, force: int = 0) -> Result:
    mgr.begin()
    with mgr.lock:
        devs = _distinct([mgr.device(n) for n in names])
        with mgr.leased({mgr.ident(d): d for d in devs}) as guard:
            found = mgr.scan()
            disks = []
            for d in devs:
                disk = found.disk(d.name) or read_pv(d)
                if disk is None:
                    raise VolumeNotFoundError(f"No PV found on device {d.name}.", device=d.name)
                owner = found.vg_of(disk)
                if owner is not None and force < 2:
                    raise VolumeInUseError(f"PV {d.name} is used by VG {owner.vg.name} so please "
                                           "use vgreduce first.", device=d.name,
                                           vg=owner.vg.name)
                disks.append(disk)
            for disk in disks:
                guard()
                disk.dev.write(disk.label.sector * SECTOR, bytes(SECTOR))
                init_mdas(disk.dev, disk.label, guard)
                disk.dev.flush()
        if mgr.leases is not None:
            for d in devs:
                mgr.leases.forget(mgr.ident(d))
    return Result([f'Labels on physical volume "{d.name}" successfully wiped.' for d in devs],
                  {"pvs": [d.name for d in devs]})


def _distinct(devs: list[BlockDevice]) -> list[BlockDevice]:
    seen: set[str] = set()
    for d in devs:
        if d.name in seen:
            raise VolumeError(f"{d.name} is given twice", device=d.name)
        seen.add(d.name)
    return devs


def unlease(mgr: VolumeManager, devs: list[BlockDevice]) -> None:
    """Devices locked to become PVs that did not: their lease sectors zeroed again."""
    if mgr.leases is None:
        return
    for d in devs:
        if not signatures.has_lvm_label(d.read(0, 2048)):
            mgr.leases.forget(mgr.ident(d))
