"""What a device already holds, found the way blkid finds it (by magic numbers), so
that pvcreate refuses to overwrite a filesystem, a partition table or another VG
without --force, and says which.
"""

from __future__ import annotations

import struct

from sanvisor.storage.lvm.blockdev import BlockDevice
from sanvisor.storage.lvm.ondisk import LABEL_ID

# (offset, magic, what)
_MAGICS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"XFSB", "an xfs filesystem"),
    (0, b"LUKS\xba\xbe", "a LUKS encrypted volume"),
    (3, b"NTFS    ", "an ntfs filesystem"),
    (0x10040, b"_BHRfS_M", "a btrfs filesystem"),
    (4086, b"SWAPSPACE2", "a swap area"),
    (4086, b"SWAP-SPACE", "a swap area"),
    (32769, b"CD001", "an iso9660 filesystem"),
    (512, b"EFI PART", "a GPT partition table"),
)


def detect(dev: BlockDevice) -> list[tuple[str, int]]:
    """(what, byte offset) of every signature found; the LVM2 label not included."""
    head = dev.read(0, min(dev.size, 0x10100))
    found: list[tuple[str, int]] = []
    for offset, magic, what in _MAGICS:
        if head[offset:offset + len(magic)] == magic:
            found.append((what, offset))
    if head[1080:1082] == b"\x53\xef":
        found.append(("an ext2/ext3/ext4 filesystem", 1080))
    if head[510:512] == b"\x55\xaa":
        if head[54:62] in (b"FAT12   ", b"FAT16   ") or head[82:90] == b"FAT32   ":
            found.append(("a vfat filesystem", 54))
        elif not any(w == "a GPT partition table" for w, _ in found):
            types = [head[446 + 16 * i + 4] for i in range(4)]
            sizes = [struct.unpack_from("<I", head, 446 + 16 * i + 12)[0] for i in range(4)]
            if any(t and s for t, s in zip(types, sizes, strict=True)):
                found.append(("a DOS (MBR) partition table", 510))
    return found


def has_lvm_label(head: bytes) -> bool:
    return any(head[n * 512:n * 512 + 8] == LABEL_ID for n in range(4))


def wipe(dev: BlockDevice, found: list[tuple[str, int]]) -> None:
    """Zero the sectors holding the signatures found (pvcreate --force)."""
    for _what, offset in found:
        start = offset - offset % 512
        dev.write(start, bytes(1024 if offset % 512 > 500 else 512))
