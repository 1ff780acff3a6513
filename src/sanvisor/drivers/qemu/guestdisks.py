"""How a QEMU guest sees its disks: SCSI LUNs, scan order, names, and ``root=``. Pure.

Every disk is a LUN of one virtio-SCSI target. A whole disk's LUN is its letter (sda,
xvda, hda -> 0; sdb -> 1; sdaa -> 26); a partition target (xvda2, as xen-tools
writes them) is a disk of its own at LUN 1024 + 16 x letter + partition (xvda2 -> 1026),
so none collides. The guest's kernel scans LUN 0, then the LUNs in the order QEMU's
REPORT LUNS lists them, which is the reverse of the order the devices were created in:
the command line creates them in reverse *scan order* (letter, then partition), so the
guest finds xvda1, xvda2, xvdb in that order. Linux names SCSI disks as it probes them,
and it probes them in parallel on several vCPUs: /dev/sdX follows the scan order on one
vCPU only. The serial number (the target name) is the name that holds: udev links it
as /dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_<target>, and the guest kit's /init too.
"""

from __future__ import annotations

from collections.abc import Iterable

from sanvisor.model.diskspec import sd_name
from sanvisor.model.domain import DiskSpec, target_slot

PART_LUN_BASE = 1024
BY_ID = "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_"


def disk_lun(target: str) -> int:
    """sda -> 0, sdb -> 1, ..., sdz -> 25, sdaa -> 26 (same for xvd/hd/vd); a partition
    target xvdaN -> 1024 + N, xvdbN -> 1040 + N (16 a letter, as Linux numbers sd minors)."""
    n, part = target_slot(target.removeprefix("/dev/"))
    return PART_LUN_BASE + 16 * n + part if part else n


def scan_order(disks: Iterable[DiskSpec]) -> list[DiskSpec]:
    """The disks in the order the guest's SCSI scan finds them: by letter, a letter's
    partition targets in partition order (a letter is a whole disk or partitions)."""
    return sorted(disks, key=lambda d: d.slot)


def creation_order(disks: Iterable[DiskSpec]) -> list[DiskSpec]:
    """The order to create the devices in for the guest to scan them in scan_order."""
    return scan_order(disks)[::-1]


def guest_names(disks: Iterable[DiskSpec]) -> dict[str, str]:
    """target -> the /dev/sdX the guest names each disk (CD-ROMs are srN) when it probes
    them in scan order (one vCPU; see the module's docstring)."""
    hard = [d for d in scan_order(disks) if d.devtype != "cdrom"]
    return {d.target: "/dev/" + sd_name(i) for i, d in enumerate(hard)}


def by_id(target: str, part: int = 0) -> str:
    return BY_ID + target + (f"-part{part}" if part else "")


def guest_root(dev: str, disks: list[DiskSpec], *, udev: bool) -> str | None:
    """What ``root=DEV`` must say for the guest to find that disk, or None to leave it.

    DEV names a disk of the domain by its target (or any prefix of the same letter:
    xvda2, sda2 and hda2 are one slot), or a partition of a whole disk (xvda1 on xvda).
    The guest sees neither name when it is a partition target or not an ``sd`` name or
    not at the disk's place in the scan order: then it becomes the disk's by-id link
    when the guest boots with an initramfs (``udev``), else its /dev/sdX."""
    name = dev.removeprefix("/dev/")
    try:
        n, part = target_slot(name)
    except ValueError:
        return None  # /dev/mapper/..., LABEL=..., UUID=...
    hard = {d.slot: d for d in disks if d.devtype != "cdrom"}
    if (n, part) in hard:
        disk, part = hard[n, part], 0
    elif part and (n, 0) in hard:
        disk = hard[n, 0]
    else:
        return None  # not one of ours: as written
    seen = guest_names(disks)[disk.target] + (str(part) if part else "")
    if seen == "/dev/" + name:
        return None
    return by_id(disk.target, part) if udev else seen
