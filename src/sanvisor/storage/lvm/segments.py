"""What an LV is, for a data path: byte ranges of the LV mapped onto byte ranges of
maps (docs/volumes.md, "For the engine").

    LvMap(name="vg0/lv1", size=..., segments=[
        Seg(start=0,         length=60 MiB, map_id=WWID_A, map_offset=1 MiB),
        Seg(start=60 MiB,    length=4 MiB,  map_id=WWID_B, map_offset=9 MiB)])

``start``/``length`` are bytes of the LV, ``map_offset`` bytes of the map (the PV's
``pe_start`` plus its first extent times the extent size). The segments cover the LV
in order, without holes: the engine's own segment table (engineproto.Segment has the
same four fields). An origin with snapshots and a snapshot add a ``Cow``: the COW
LV's own segments, the chunk size, and the exception store's layout (cowstore.py).

``LvIo`` reads and writes an LV through these segments in Python: the control plane
uses it for what is not per-request I/O (a snapshot's store header, a merge, lvs'
Data%), and tests use it as the reference the engine must agree with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sanvisor.errors import VolumeError
from sanvisor.storage.lvm.blockdev import BlockDevice
from sanvisor.storage.lvm.model import Lv, Vg


@dataclass(frozen=True)
class Seg:
    start: int  # bytes into the LV
    length: int  # bytes
    map_id: str  # the PV's map: its WWID (or, outside a SAN, its device path)
    map_offset: int  # bytes into the map


@dataclass(frozen=True)
class Cow:
    """A snapshot's exception store, as dm-snapshot's persistent store lays it out."""

    snapshot: str  # vg/name of the snapshot (the COW LV's name)
    segments: tuple[Seg, ...]  # the COW LV's own
    chunk_size: int  # bytes
    merging: bool = False


@dataclass(frozen=True)
class LvMap:
    name: str  # vg/lv
    uuid: str  # device-mapper's: LVM-<VG uuid><LV uuid>
    size: int  # bytes
    segments: tuple[Seg, ...]
    kind: str = "linear"  # linear | origin (writes copy old chunks first) | snapshot
    cows: tuple[Cow, ...] = field(default_factory=tuple)  # origin: every snapshot's store
    # snapshot: reads come from the store where a chunk was copied, else the origin
    origin: tuple[Seg, ...] = field(default_factory=tuple)


def lv_segments(vg: Vg, lv: Lv, ident: dict[str, str]) -> tuple[Seg, ...]:
    """``lv``'s linear segments; ``ident``: PV uuid -> its map's id."""
    ext = vg.extent_size * 512
    out = []
    for s in lv.segments:
        if not s.linear:
            raise VolumeError(f"{vg.name}/{lv.name}: a {s.type} segment with "
                              f"{len(s.stripes)} stripes cannot be mapped (linear LVs and "
                              "snapshots only)")
        pv_uuid, pe = s.stripes[0]
        if pv_uuid not in ident:
            raise VolumeError(f"{vg.name}/{lv.name}: its PV {vg.pv(pv_uuid).device} is "
                              "missing")
        pv = vg.pv(pv_uuid)
        out.append(Seg(s.start_extent * ext, s.extent_count * ext, ident[pv_uuid],
                       pv.pe_start * 512 + pe * ext))
    return tuple(out)


def describe(vg: Vg, lv: Lv, ident: dict[str, str]) -> LvMap:
    """The mapping of a user-visible LV (a plain LV, an origin or a snapshot)."""
    dm_uuid = f"LVM-{vg.uuid}{lv.uuid}"
    cow_seg = vg.cow_of(lv)
    if cow_seg is not None:  # lv is a snapshot (its COW LV)
        origin = vg.lv(cow_seg.origin)
        assert origin is not None
        own = lv_segments(vg, origin, ident)
        return LvMap(f"{vg.name}/{lv.name}", dm_uuid, origin.extents * vg.extent_size * 512,
                     own, "snapshot", (_cow(vg, lv, cow_seg.chunk_size, cow_seg.merging,
                                            ident),), own)
    segs = lv_segments(vg, lv, ident)
    snaps = vg.snapshots_of(lv.name)
    cows = []
    for s in snaps:
        cow_lv = vg.lv(s.cow)
        assert cow_lv is not None
        cows.append(_cow(vg, cow_lv, s.chunk_size, s.merging, ident))
    return LvMap(f"{vg.name}/{lv.name}", dm_uuid, lv.extents * vg.extent_size * 512, segs,
                 "origin" if snaps else "linear", tuple(cows))


def _cow(vg: Vg, cow_lv: Lv, chunk: int, merging: bool, ident: dict[str, str]) -> Cow:
    return Cow(f"{vg.name}/{cow_lv.name}", lv_segments(vg, cow_lv, ident), chunk * 512,
               merging)


class LvIo:
    """Reads and writes an LV's bytes through its segments (Python, not per request)."""

    def __init__(self, segments: tuple[Seg, ...], devices: dict[str, BlockDevice]) -> None:
        self.segments, self.devices = segments, devices
        self.size = sum(s.length for s in segments)

    def _pieces(self, offset: int, length: int) -> list[tuple[Seg, int, int]]:
        if offset < 0 or offset + length > self.size:
            raise VolumeError(f"I/O at {offset}+{length} beyond the LV's {self.size} bytes")
        out = []
        for s in self.segments:
            lo, hi = max(offset, s.start), min(offset + length, s.start + s.length)
            if lo < hi:
                out.append((s, lo - s.start, hi - lo))
        return out

    def read(self, offset: int, length: int) -> bytes:
        return b"".join(self.devices[s.map_id].read(s.map_offset + off, n)
                        for s, off, n in self._pieces(offset, length))

    def write(self, offset: int, data: bytes) -> None:
        at = 0
        for s, off, n in self._pieces(offset, len(data)):
            self.devices[s.map_id].write(s.map_offset + off, data[at:at + n])
            at += n

    def flush(self) -> None:
        for map_id in {s.map_id for s in self.segments}:
            self.devices[map_id].flush()
