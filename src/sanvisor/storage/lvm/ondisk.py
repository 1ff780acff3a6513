"""LVM2's on-disk structures, byte for byte (lvm2 lib/format_text/layout.h, label.h).

A PV starts with a label in one of its first four sectors (lvm2 writes sector 1):

    label_header (32 bytes): "LABELONE", sector (u64), crc (u32, of the rest of the
        sector from offset 20), offset of the pv_header (u32, 32), "LVM2 001"
    pv_header: uuid (32 chars, no dashes), device size (u64), then two lists of
        disk_locn {offset u64, size u64}, each ended by a zero entry: data areas
        (pe_start; size 0 = to the end), then metadata areas
    pv_header_extension: version (u32, 2), flags (u32, PV_EXT_USED = 1 when the PV
        is in a VG), bootloader areas (a list ended by a zero entry)

Each metadata area (mda) starts with a 512-byte mda_header: checksum (u32, of the
rest of the sector), magic, version (1), start (its own offset), size, and raw_locn
slots {offset, size, checksum, flags}: slot 0 the committed metadata, slot 1 the
precommitted. The text follows in a circular buffer after the header.

Everything is little-endian. Checksums are lvm2's calc_crc: CRC-32 (the reflected
polynomial 0xedb88320) seeded with 0xf597a6cf and without the final inversion.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from sanvisor.errors import MetadataError

SECTOR = 512
INITIAL_CRC = 0xF597A6CF
LABEL_ID = b"LABELONE"
LABEL_TYPE = b"LVM2 001"
LABEL_SCAN_SECTORS = 4
MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MDA_VERSION = 1
MDA_HEADER_SIZE = 512
PV_EXT_VERSION = 2
PV_EXT_USED = 1
RAW_LOCN_IGNORED = 1
UUID_LEN = 32
UUID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#"[:62]

_LOCN = struct.Struct("<QQ")
_RLOCN = struct.Struct("<QQII")
_LABEL = struct.Struct("<8sQII8s")
_MDAH = struct.Struct("<I16sIQQ")


def calc_crc(data: bytes, initial: int = INITIAL_CRC) -> int:
    """lvm2's calc_crc (lib/misc/crc.c)."""
    return zlib.crc32(data, initial ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def format_uuid(raw: str) -> str:
    """32 characters as lvm2 prints them: 6-4-4-4-4-4-6."""
    cuts = (6, 4, 4, 4, 4, 4, 6)
    out, i = [], 0
    for n in cuts:
        out.append(raw[i:i + n])
        i += n
    return "-".join(out)


def parse_uuid(text: str) -> str:
    raw = text.replace("-", "")
    if len(raw) != UUID_LEN or not all(c.isalnum() or c in "!#" for c in raw):
        raise MetadataError(f"not an LVM uuid: {text!r}")
    return raw


def new_uuid() -> str:
    import secrets

    return "".join(secrets.choice(UUID_CHARS) for _ in range(UUID_LEN))


@dataclass
class MdaLocation:
    offset: int
    size: int


@dataclass
class PvLabel:
    """A PV's label sector: what lvm2's label scan reads."""

    uuid: str  # 32 characters, no dashes
    dev_size: int
    pe_start: int  # bytes (the first data area's offset)
    mdas: list[MdaLocation] = field(default_factory=list)
    used: bool = False  # PV_EXT_USED: in a VG
    sector: int = 1
    data_size: int = 0
    ext_version: int = PV_EXT_VERSION
    bootloader: list[MdaLocation] = field(default_factory=list)

    def pack(self) -> bytes:
        body = bytearray(self.uuid.encode()[:UUID_LEN].ljust(UUID_LEN, b"0"))
        body += struct.pack("<Q", self.dev_size)
        body += _LOCN.pack(self.pe_start, self.data_size) + _LOCN.pack(0, 0)
        for m in self.mdas:
            body += _LOCN.pack(m.offset, m.size)
        body += _LOCN.pack(0, 0)
        body += struct.pack("<II", self.ext_version, PV_EXT_USED if self.used else 0)
        for b in self.bootloader:
            body += _LOCN.pack(b.offset, b.size)
        body += _LOCN.pack(0, 0)
        sector = bytearray(SECTOR)
        sector[32:32 + len(body)] = body
        sector[0:32] = _LABEL.pack(LABEL_ID, self.sector, 0, 32, LABEL_TYPE)
        struct.pack_into("<I", sector, 16, calc_crc(bytes(sector[20:])))
        return bytes(sector)


def find_label(head: bytes) -> PvLabel | None:
    """The PV label in the first four sectors, or None if there is none. A label
    that is there but damaged raises MetadataError (never taken for 'no PV')."""
    for n in range(LABEL_SCAN_SECTORS):
        sector = head[n * SECTOR:(n + 1) * SECTOR]
        if len(sector) < SECTOR or sector[:8] != LABEL_ID:
            continue
        _id, where, crc, offset, kind = _LABEL.unpack_from(sector)
        if where != n:
            continue  # lvm2 ignores a label that does not name its own sector
        if calc_crc(sector[20:]) != crc:
            raise MetadataError(f"the PV label in sector {n} has a bad checksum")
        if kind != LABEL_TYPE:
            raise MetadataError(f"the label in sector {n} is not LVM2's ({kind!r})")
        if not 32 <= offset <= SECTOR - 64:
            raise MetadataError(f"the PV label in sector {n} is malformed")
        return _parse_pv_header(sector, offset, n)
    return None


def _parse_pv_header(sector: bytes, at: int, n: int) -> PvLabel:
    uuid = sector[at:at + UUID_LEN].decode("ascii", "replace")
    (dev_size,) = struct.unpack_from("<Q", sector, at + UUID_LEN)
    pos = at + UUID_LEN + 8
    lists: list[list[MdaLocation]] = []
    for _ in range(2):
        items: list[MdaLocation] = []
        while True:
            if pos + 16 > SECTOR:
                raise MetadataError(f"the PV header in sector {n} runs past its sector")
            off, size = _LOCN.unpack_from(sector, pos)
            pos += 16
            if off == 0:
                break
            items.append(MdaLocation(off, size))
        lists.append(items)
    data, mdas = lists
    if not data:
        raise MetadataError(f"the PV header in sector {n} has no data area")
    version, flags, boot = 0, 0, []
    if pos + 8 <= SECTOR:
        version, flags = struct.unpack_from("<II", sector, pos)
        pos += 8
        while version and pos + 16 <= SECTOR:
            off, size = _LOCN.unpack_from(sector, pos)
            pos += 16
            if off == 0:
                break
            boot.append(MdaLocation(off, size))
    return PvLabel(uuid=uuid, dev_size=dev_size, pe_start=data[0].offset, mdas=mdas,
                   used=bool(version and flags & PV_EXT_USED), sector=n,
                   data_size=data[0].size, ext_version=version, bootloader=boot)


@dataclass
class RawLocn:
    offset: int = 0
    size: int = 0
    checksum: int = 0
    flags: int = 0

    @property
    def empty(self) -> bool:
        return self.offset == 0 and self.size == 0


@dataclass
class MdaHeader:
    start: int
    size: int
    slots: list[RawLocn] = field(default_factory=lambda: [RawLocn(), RawLocn()])

    @property
    def committed(self) -> RawLocn:
        return self.slots[0]

    def pack(self) -> bytes:
        buf = bytearray(MDA_HEADER_SIZE)
        _MDAH.pack_into(buf, 0, 0, MDA_MAGIC, MDA_VERSION, self.start, self.size)
        pos = _MDAH.size
        for r in [*self.slots, RawLocn()]:
            if pos + _RLOCN.size > MDA_HEADER_SIZE:
                break
            _RLOCN.pack_into(buf, pos, r.offset, r.size, r.checksum, r.flags)
            pos += _RLOCN.size
        struct.pack_into("<I", buf, 0, calc_crc(bytes(buf[4:])))
        return bytes(buf)


def parse_mda_header(raw: bytes, where: int, device: str = "") -> MdaHeader:
    """The mda_header at byte ``where``; MetadataError saying what is wrong with it."""
    at = f"{device}: " if device else ""
    if len(raw) < MDA_HEADER_SIZE:
        raise MetadataError(f"{at}metadata area at {where}: short read")
    checksum, magic, version, start, size = _MDAH.unpack_from(raw)
    if calc_crc(raw[4:MDA_HEADER_SIZE]) != checksum:
        raise MetadataError(f"{at}metadata area header at {where} has a bad checksum")
    if magic != MDA_MAGIC:
        raise MetadataError(f"{at}metadata area header at {where} has a bad magic")
    if version != MDA_VERSION:
        raise MetadataError(f"{at}metadata area at {where}: unknown version {version}")
    if start != where:
        raise MetadataError(f"{at}metadata area at {where} says it starts at {start}")
    slots: list[RawLocn] = []
    pos = _MDAH.size
    while pos + _RLOCN.size <= MDA_HEADER_SIZE and len(slots) < 2:
        slots.append(RawLocn(*_RLOCN.unpack_from(raw, pos)))
        pos += _RLOCN.size
    hdr = MdaHeader(start=start, size=size, slots=slots)
    c = hdr.committed
    if not c.empty and (c.offset < MDA_HEADER_SIZE or c.offset >= size
                        or c.size > size - MDA_HEADER_SIZE):
        raise MetadataError(f"{at}metadata area at {where}: metadata location out of "
                            f"bounds (offset {c.offset} size {c.size} area {size})")
    return hdr


def text_pieces(hdr: MdaHeader, slot: RawLocn) -> list[tuple[int, int]]:
    """(offset from the area's start, length) of the text, in one or two pieces (it may
    wrap around the end of the circular buffer, continuing after the header)."""
    if slot.offset + slot.size <= hdr.size:
        return [(slot.offset, slot.size)]
    first = hdr.size - slot.offset
    return [(slot.offset, first), (MDA_HEADER_SIZE, slot.size - first)]


def next_offset(hdr: MdaHeader) -> int:
    """Where new metadata goes (lvm2's _next_rlocn_offset, 512-byte alignment)."""
    old = hdr.committed
    if old.empty or old.flags & RAW_LOCN_IGNORED:
        return MDA_HEADER_SIZE
    if old.offset + old.size > hdr.size:
        last = old.offset + old.size - hdr.size + MDA_HEADER_SIZE - 1
    else:
        last = old.offset + old.size - 1
    if hdr.size - last < SECTOR:
        return MDA_HEADER_SIZE
    start = -(-(last + 1) // SECTOR) * SECTOR
    return MDA_HEADER_SIZE if start > hdr.size - SECTOR else start


def max_text_size(hdr: MdaHeader) -> int:
    """The largest metadata text an area holds (two copies must fit: lvm2's rule)."""
    return (hdr.size - MDA_HEADER_SIZE) // 2 - SECTOR
