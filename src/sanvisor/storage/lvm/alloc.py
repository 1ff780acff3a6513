"""Extent allocation: which physical extents an LV gets, grows into, gives back.

An LV that grows continues on the PV where it ends if the extents right after its
last one are free (so that `lvextend` usually makes one longer segment); otherwise
extents are taken from the PVs in the VG's order (or the PVs named on the command
line), lowest first, across as many PVs as it takes: a multi-segment LV. Adjacent
pieces on one PV are one segment, as lvm2 merges them.
"""

from __future__ import annotations

from sanvisor.errors import VolumeSpaceError
from sanvisor.storage.lvm.model import Lv, Segment, Vg


def free_areas(vg: Vg, pvs: list[str] | None = None) -> list[tuple[str, int, int]]:
    """(PV uuid, first PE, count) of every free stretch, in PV then PE order."""
    used = vg.used_extents()
    out = []
    for pv in vg.pvs:
        if (pvs is not None and pv.uuid not in pvs) or "ALLOCATABLE" not in pv.status:
            continue
        if pv.missing:
            continue
        at = 0
        for first, n, _lv in used.get(pv.uuid, []):
            if first > at:
                out.append((pv.uuid, at, first - at))
            at = max(at, first + n)
        if pv.pe_count > at:
            out.append((pv.uuid, at, pv.pe_count - at))
    return out


def allocate(vg: Vg, count: int, pvs: list[str] | None = None,
             after: tuple[str, int] | None = None, what: str = "") -> list[tuple[str, int, int]]:
    """``count`` extents: [(PV uuid, first PE, count)]; VolumeSpaceError saying what is
    free when there is not enough."""
    areas = free_areas(vg, pvs)
    total = sum(n for _, _, n in areas)
    if count > total:
        size = vg.extent_size * 512
        where = "on the PVs given" if pvs is not None else f"in volume group {vg.name}"
        raise VolumeSpaceError(
            f"Insufficient free space{(' for ' + what) if what else ''}: {count} extents "
            f"({_h(count * size)}) needed, but only {total} ({_h(total * size)}) available "
            f"{where}", needed=count, free=total, extent_size=size)
    if after is not None:
        areas.sort(key=lambda a: (a[0], a[1]) != after)  # the stretch right after first
    out: list[tuple[str, int, int]] = []
    left = count
    for pv, first, n in areas:
        take = min(n, left)
        out.append((pv, first, take))
        left -= take
        if not left:
            break
    return out


def _h(nbytes: int) -> str:
    from sanvisor.storage.lvm.report import human

    return human(nbytes)


def extend(lv: Lv, pieces: list[tuple[str, int, int]]) -> None:
    """Append ``pieces`` to ``lv``'s segments, merging what continues the last one."""
    for pv, first, n in pieces:
        last = lv.segments[-1] if lv.segments else None
        if (last is not None and last.linear and last.stripes[0][0] == pv
                and last.stripes[0][1] + last.extent_count == first):
            last.extent_count += n
            continue
        lv.segments.append(Segment(lv.extents, n, "striped", [(pv, first)]))


def end_of(lv: Lv) -> tuple[str, int] | None:
    """(PV uuid, PE) right after the LV's last extent, if it ends linearly."""
    if not lv.segments or not lv.segments[-1].linear:
        return None
    last = lv.segments[-1]
    return last.stripes[0][0], last.stripes[0][1] + last.extent_count


def reduce(lv: Lv, extents: int) -> None:
    """Keep the first ``extents`` extents of ``lv``; the rest is free again."""
    kept: list[Segment] = []
    for seg in lv.segments:
        if seg.start_extent >= extents:
            break
        if seg.start_extent + seg.extent_count > extents:
            n = extents - seg.start_extent
            stripes = len(seg.stripes) or 1
            if n % stripes:
                n -= n % stripes
            if n == 0:
                break
            seg.extent_count = n
        kept.append(seg)
    lv.segments = kept
