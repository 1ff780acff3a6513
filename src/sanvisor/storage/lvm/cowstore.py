"""A snapshot's exception store, laid out as the kernel's dm-snapshot persistent store
(drivers/md/dm-snap-persistent.c) writes it, so that a kernel with device-mapper can
take over a snapshot sanvisor made, and sanvisor reads one the kernel wrote.

The COW device is cut in chunks of ``chunk_size`` sectors:

    chunk 0             header: magic "SnAp" (0x70416e53), valid, version 1,
                        chunk_size (u32 each, little-endian), the rest zeros
    chunk 1             metadata area 0: chunk_size*512/16 exceptions
                        {old_chunk u64, new_chunk u64}; the list ends at the first
                        entry whose new_chunk is 0 (chunk 0 is the header)
    chunks 2..E+1       the data chunks of area 0 (E exceptions per area)
    chunk E+2           metadata area 1, then its data chunks, and so on

An exception says: origin chunk ``old_chunk`` was copied, before it was first
overwritten, to COW chunk ``new_chunk``. A snapshot that fills up is invalidated:
the header's ``valid`` becomes 0 (the origin is unharmed). The copy-on-write itself
is the data path's (the engine's); here are the layout, a new store, reading one,
and adding an exception as the kernel does (write the data, then the area).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from sanvisor.errors import MetadataError

SNAP_MAGIC = 0x70416E53
DISK_VERSION = 1
HEADER = struct.Struct("<IIII")
EXCEPTION = struct.Struct("<QQ")
DEFAULT_CHUNK = 8  # sectors: lvm2's default, 4 KiB
Read = Callable[[int, int], bytes]
Write = Callable[[int, bytes], None]


def check_chunk_size(sectors: int) -> int:
    """lvm2 takes chunk sizes from 4 KiB to 512 KiB, powers of two."""
    if sectors < 8 or sectors > 1024 or sectors & (sectors - 1):
        raise MetadataError(f"chunk size {sectors * 512 // 1024} KiB: a power of 2 from 4 "
                            "to 512 KiB")
    return sectors


def per_area(chunk: int) -> int:
    return chunk * 512 // EXCEPTION.size


def area_chunk(chunk: int, area: int) -> int:
    return 1 + (per_area(chunk) + 1) * area


def max_cow_sectors(origin_sectors: int, chunk: int) -> int:
    """A store that can hold every chunk of the origin: header, areas, data."""
    chunks = -(-origin_sectors // chunk)
    areas = -(-chunks // per_area(chunk)) or 1
    return (1 + areas + chunks) * chunk


def header(chunk: int, valid: bool = True) -> bytes:
    return HEADER.pack(SNAP_MAGIC, 1 if valid else 0, DISK_VERSION, chunk).ljust(
        chunk * 512, b"\0")


def init_store(write: Write, chunk: int) -> None:
    """A new, empty store (what the kernel writes at a snapshot's first activation):
    the header, and area 0 zeroed."""
    write(0, header(chunk))
    write(area_chunk(chunk, 0) * chunk * 512, bytes(chunk * 512))


@dataclass
class Store:
    chunk: int  # sectors
    valid: bool
    exceptions: dict[int, int] = field(default_factory=dict)  # origin chunk -> COW chunk
    area: int = 0  # the area new exceptions go to
    used_in_area: int = 0
    next_free: int = 2  # the next COW chunk to give out

    def used_sectors(self) -> int:
        """What the kernel reports as allocated (data and metadata chunks)."""
        return self.next_free * self.chunk

    def metadata_sectors(self) -> int:
        return (self.area + 2) * self.chunk


def read_store(read: Read, size: int) -> Store | None:
    """The store on a COW device of ``size`` bytes; None if it was never initialised
    (all zeros: the kernel would make it new). MetadataError if it is not a store."""
    magic, valid, version, chunk = HEADER.unpack(read(0, HEADER.size))
    if magic == 0:
        return None
    if magic != SNAP_MAGIC:
        raise MetadataError("not a snapshot exception store (bad magic)")
    if version != DISK_VERSION:
        raise MetadataError(f"exception store version {version}: unknown")
    check_chunk_size(chunk)
    st = Store(chunk, bool(valid))
    if not st.valid:
        return st
    epa = per_area(chunk)
    area = 0
    while True:
        at = area_chunk(chunk, area) * chunk * 512
        if at + chunk * 512 > size:
            raise MetadataError(f"exception store: area {area} beyond the COW device")
        raw = read(at, chunk * 512)
        for i in range(epa):
            old, new = EXCEPTION.unpack_from(raw, i * EXCEPTION.size)
            if new == 0:
                st.area, st.used_in_area = area, i
                _skip_metadata(st)
                return st
            st.exceptions[old] = new
            st.next_free = max(st.next_free, new + 1)
        area += 1


def _skip_metadata(st: Store) -> None:
    if st.next_free % (per_area(st.chunk) + 1) == 1:
        st.next_free += 1


def add_exception(st: Store, read: Read, write: Write, size: int, old_chunk: int,
                  data: bytes) -> bool:
    """Copy ``data`` (origin chunk ``old_chunk``, before its first overwrite) into the
    store as the kernel does: the data chunk first, then the area naming it (and the
    next area zeroed when this one fills). False, and the store invalidated, when it
    is full."""
    c = st.chunk * 512
    if (st.next_free + 1) * c > size:
        st.valid = False
        write(0, header(st.chunk, valid=False))
        return False
    new = st.next_free
    st.next_free += 1
    _skip_metadata(st)
    write(new * c, data.ljust(c, b"\0")[:c])
    at = area_chunk(st.chunk, st.area) * c
    area = bytearray(read(at, c))
    EXCEPTION.pack_into(area, st.used_in_area * EXCEPTION.size, old_chunk, new)
    st.used_in_area += 1
    if st.used_in_area == per_area(st.chunk):
        write(area_chunk(st.chunk, st.area + 1) * c, bytes(c))
    write(at, bytes(area))
    st.exceptions[old_chunk] = new
    if st.used_in_area == per_area(st.chunk):
        st.area, st.used_in_area = st.area + 1, 0
    return True
