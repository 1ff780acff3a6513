"""Xen's virtual device numbers (xen-vbd-interface.txt), the Vdev column of xm
block-list: xvda is 51712, sda 2048, hda 768. I/O-free."""

from __future__ import annotations

from sanvisor.model.domain import target_slot, target_split

_XVD, _SD = 202, 8
_HD_MAJORS = (3, 22, 33, 34, 56, 57, 88, 89, 90, 91)  # hda+hdb, hdc+hdd, ...
_EXTENDED = 1 << 28


def vdev_number(target: str) -> int:
    """The number Xen gives a disk target (vd* is numbered as xvd*)."""
    prefix, _letters, _part = target_split(target)
    disk, part = target_slot(target)
    if prefix == "hd" and disk < 2 * len(_HD_MAJORS):
        return (_HD_MAJORS[disk // 2] << 8) | ((disk % 2) << 6) | part
    major = _SD if prefix == "sd" else _XVD
    if disk < 16 and part < 16:
        return (major << 8) | (disk << 4) | part
    return _EXTENDED | (disk << 8) | part
