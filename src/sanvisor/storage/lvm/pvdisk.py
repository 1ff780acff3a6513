"""A PV on its device: the label, the metadata areas, and the two-step write of new
metadata that never leaves a torn copy (lvm2's vg_write then vg_commit).

New text goes into each area's circular buffer *after* the committed copy, never over
it; only then is the area's header (one sector, written at once) switched to it. A
host killed at any point leaves every area either at its old copy or at the new one,
each whole and checksummed; a reader takes the highest sequence number among the
sound copies, and the next write brings the others up to date.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from sanvisor.errors import MetadataError
from sanvisor.storage.lvm.blockdev import BlockDevice
from sanvisor.storage.lvm.model import Vg, vg_from_text
from sanvisor.storage.lvm.ondisk import (
    LABEL_SCAN_SECTORS,
    MDA_HEADER_SIZE,
    SECTOR,
    MdaHeader,
    MdaLocation,
    PvLabel,
    RawLocn,
    calc_crc,
    find_label,
    max_text_size,
    next_offset,
    parse_mda_header,
    text_pieces,
)

MIB = 1 << 20
DEFAULT_MDA_SIZE = 1020 * 1024  # lvm2's: the first area from 4 KiB to 1 MiB
DATA_ALIGNMENT = MIB
Guard = Callable[[], None]  # called before every write: raises if the lease is gone


def _no_guard() -> None:
    return None


@dataclass
class MdaCopy:
    """One metadata area of a PV and what it holds."""

    loc: MdaLocation
    header: MdaHeader | None = None
    text: bytes = b""  # the committed text, NUL included
    vg: Vg | None = None
    error: str = ""  # why this copy cannot be used (a bad checksum...)

    @property
    def seqno(self) -> int:
        return self.vg.seqno if self.vg is not None else -1


@dataclass
class PvDisk:
    dev: BlockDevice
    label: PvLabel
    copies: list[MdaCopy] = field(default_factory=list)

    @property
    def uuid(self) -> str:
        return self.label.uuid


def read_label(dev: BlockDevice) -> PvLabel | None:
    return find_label(dev.read(0, LABEL_SCAN_SECTORS * SECTOR))


def read_pv(dev: BlockDevice) -> PvDisk | None:
    """The PV on ``dev`` with every metadata copy it holds (None: not a PV). A copy that
    cannot be used carries the reason instead of its VG."""
    label = read_label(dev)
    if label is None:
        return None
    pv = PvDisk(dev, label)
    for loc in label.mdas:
        copy = MdaCopy(loc)
        pv.copies.append(copy)
        try:
            copy.header = parse_mda_header(dev.read(loc.offset, MDA_HEADER_SIZE), loc.offset,
                                           dev.name)
            slot = copy.header.committed
            if slot.empty:
                continue
            text = b"".join(dev.read(loc.offset + off, n)
                            for off, n in text_pieces(copy.header, slot))
            if calc_crc(text) != slot.checksum:
                raise MetadataError(f"{dev.name}: metadata at {loc.offset + slot.offset} "
                                    "has a bad checksum")
            copy.text = text
            copy.vg = _parsed(text)
        except MetadataError as exc:
            copy.error = str(exc)
    return pv


_CACHE: OrderedDict[bytes, Vg] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _parsed(text: bytes) -> Vg:
    """The VG of a metadata text, parsed once for all the copies and scans that read
    the same bytes (scan results are read-only: a change works on a deep copy)."""
    with _CACHE_LOCK:
        vg = _CACHE.get(text)
        if vg is not None:
            _CACHE.move_to_end(text)
            return vg
    vg = vg_from_text(text)
    with _CACHE_LOCK:
        _CACHE[text] = vg
        while len(_CACHE) > 16:
            _CACHE.popitem(last=False)
    return vg


def layout(dev_size: int, copies: int, mda_size: int = DEFAULT_MDA_SIZE
           ) -> tuple[list[MdaLocation], int]:
    """lvm2's default layout: (metadata areas, pe_start in bytes). The first area at
    4 KiB up to 1 MiB; a second, if asked for, in the last MiB-aligned stretch."""
    first = MdaLocation(4096, DATA_ALIGNMENT - 4096)
    if mda_size + 4096 > DATA_ALIGNMENT:
        end = -(-(4096 + mda_size) // DATA_ALIGNMENT) * DATA_ALIGNMENT
        first = MdaLocation(4096, end - 4096)
    pe_start = first.offset + first.size
    mdas = [first] if copies >= 1 else []
    if copies >= 2:
        start = (dev_size - mda_size) // DATA_ALIGNMENT * DATA_ALIGNMENT
        if start <= pe_start:
            raise MetadataError("the device is too small for two metadata areas")
        mdas.append(MdaLocation(start, dev_size - start))
    if copies == 0:
        pe_start = DATA_ALIGNMENT
    return mdas, pe_start


def data_end(label: PvLabel) -> int:
    """The end (bytes) of the data area: the device's end or the second area's start."""
    ends = [m.offset for m in label.mdas if m.offset > label.pe_start]
    return min(ends, default=label.dev_size)


def write_label(dev: BlockDevice, label: PvLabel, guard: Guard = _no_guard) -> None:
    head = bytearray(dev.read(0, LABEL_SCAN_SECTORS * SECTOR))
    for n in range(LABEL_SCAN_SECTORS):  # one label only: lvm2 would take the first
        if n != label.sector and head[n * SECTOR:n * SECTOR + 8] == b"LABELONE":
            head[n * SECTOR:(n + 1) * SECTOR] = bytes(SECTOR)
    head[label.sector * SECTOR:(label.sector + 1) * SECTOR] = label.pack()
    guard()
    dev.write(0, bytes(head))


def init_mdas(dev: BlockDevice, label: PvLabel, guard: Guard = _no_guard) -> None:
    """Empty metadata areas (an orphan PV's): a header without metadata, the start of
    the buffer zeroed (lvm2 zeroes 4 KiB)."""
    for loc in label.mdas:
        guard()
        dev.write(loc.offset, MdaHeader(loc.offset, loc.size).pack()
                  + bytes(min(loc.size, 4096) - MDA_HEADER_SIZE))


def write_metadata(pvs: list[PvDisk], text: str, guard: Guard = _no_guard) -> None:
    """Write ``text`` (one VG's new metadata) to every area of ``pvs``, then commit it
    area by area. Areas whose header cannot be read are rewritten from scratch."""
    raw = text.encode() + b"\0"
    checksum = calc_crc(raw)
    plans: list[tuple[PvDisk, MdaLocation, MdaHeader, RawLocn]] = []
    for pv in pvs:
        for loc in pv.label.mdas:
            try:
                hdr = parse_mda_header(pv.dev.read(loc.offset, MDA_HEADER_SIZE), loc.offset,
                                       pv.dev.name)
            except MetadataError:
                hdr = MdaHeader(loc.offset, loc.size)  # repaired by this write
            if hdr.committed.flags & 1:
                continue  # an ignored area (pvchange --metadataignore)
            if len(raw) > max_text_size(hdr):
                raise MetadataError(f"{pv.dev.name}: the metadata ({len(raw)} bytes) does not "
                                    f"fit its area ({hdr.size} bytes)")
            slot = RawLocn(next_offset(hdr), len(raw), checksum, 0)
            plans.append((pv, loc, hdr, slot))
    if not plans:
        raise MetadataError("no metadata area to write the VG to")
    for pv, loc, hdr, slot in plans:  # 1: the text, after the committed copy
        pieces = text_pieces(hdr, slot)
        at = 0
        for i, (off, n) in enumerate(pieces):
            chunk = raw[at:at + n]
            at += n
            if i == len(pieces) - 1:  # padded with zeros to the sector, as lvm2 does
                chunk += bytes(-len(chunk) % SECTOR)
            guard()
            pv.dev.write(loc.offset + off, chunk)
    for pv in pvs:
        pv.dev.flush()
    for pv, loc, hdr, slot in plans:  # 2: each header switched at once (one sector)
        new = MdaHeader(hdr.start, hdr.size, [slot, RawLocn()])
        guard()
        pv.dev.write(loc.offset, new.pack())
    for pv in pvs:
        pv.dev.flush()


def orphan(pv: PvDisk, guard: Guard = _no_guard) -> None:
    """Make a PV an orphan again (vgreduce, vgremove): empty areas, PV_EXT_USED off."""
    init_mdas(pv.dev, pv.label, guard)
    pv.label.used = False
    write_label(pv.dev, pv.label, guard)
    pv.dev.flush()
