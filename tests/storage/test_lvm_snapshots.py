"""Snapshots as lvm2 and dm-snapshot know them: the metadata (lvm2 shows the origin),
the exception store on the COW LV's extents in the kernel's layout, and a merge (the
seed's roll back) that copies the store's chunks onto the origin, done at once when
nothing is active, at the origin's next activation otherwise. The copy-on-write of a
running origin is the engine's; here the store is filled the way the kernel fills it
(cowstore.add_exception), through the LV's segments."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sanvisor.errors import VolumeError
from sanvisor.storage.lvm import cowstore, lvops, snapops, vgops
from sanvisor.storage.lvm.manager import VolumeManager
from sanvisor.storage.lvm.names import parse_size
from sanvisor.storage.lvm.segments import LvIo, describe, lv_segments
from tests.storage.lvm2 import MIB, Lvm2, close, loop_devices, manager, needs_lvm2

pytestmark = needs_lvm2
CHUNK = 4096


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[VolumeManager, Lvm2]]:
    with loop_devices([64 * MIB, 64 * MIB]) as devs:
        mgr = manager(devs)
        try:
            vgops.vgcreate(mgr, "vg0", devs)
            yield mgr, Lvm2(devs, tmp_path)
        finally:
            close(mgr)


def _io(mgr: VolumeManager, name: str) -> LvIo:
    st = mgr.scan().vg("vg0")
    lv = st.vg.lv(name)
    assert lv is not None
    return LvIo(lv_segments(st.vg, lv, {u: u for u in st.disks}),
                {u: d.dev for u, d in st.disks.items()})


def _cow_write(mgr: VolumeManager, origin: str, snap: str, offset: int, data: bytes) -> None:
    """What the data path does for a write to an origin: the old chunk into the store
    first (the kernel's order), then the new data."""
    o, c = _io(mgr, origin), _io(mgr, snap)
    store = cowstore.read_store(c.read, c.size)
    assert store is not None
    chunk = offset // CHUNK
    if chunk not in store.exceptions:
        assert cowstore.add_exception(store, c.read, c.write, c.size, chunk,
                                      o.read(chunk * CHUNK, CHUNK))
    o.write(offset, data)


def test_a_snapshot_store_on_its_extents_and_a_merge_rolls_back(
        two: tuple[VolumeManager, Lvm2]) -> None:
    mgr, lvm = two
    lvops.lvcreate(mgr, "vg0", "lvsysteme", parse_size("40M"), activate=False)
    o = _io(mgr, "lvsysteme")
    before = bytes(range(256)) * (2 * MIB // 256)
    o.write(0, before)
    # the store spans both PVs: 52 MiB on the first is taken, then the second
    lvops.lvcreate(mgr, "vg0", "filler", parse_size("16M"), activate=False)
    snapops.lvcreate_snapshot(mgr, "vg0", "lvsysteme", "lvsnap", parse_size("8M"))
    st = mgr.scan().vg("vg0")
    cow = st.vg.lv("lvsnap")
    assert cow is not None and len(cow.segments) == 2  # across the two LUNs
    assert cowstore.HEADER.unpack(_io(mgr, "lvsnap").read(0, 16)) == (
        cowstore.SNAP_MAGIC, 1, 1, 8)
    for at in (0, 5 * CHUNK, 5 * CHUNK + 7, 300 * CHUNK):  # "the update"
        _cow_write(mgr, "lvsysteme", "lvsnap", at, b"\xee" * 100)
    lvs = {r["lv_name"]: r for r in lvm.report("lv", "lv_name,origin,lv_attr")}
    assert lvs["lvsnap"]["origin"] == "lvsysteme"
    mgr.begin()
    found = mgr.scan()
    from sanvisor.storage.lvm import rows

    pct = next(r["data_percent"] for r in rows.lv_rows(found, "hostA", ["data_percent"])
               if r["lv_name"] == "lvsnap")
    assert pct == pytest.approx(100 * (2 + 3) * 8 / (8 * 2048))  # header, area, 3 chunks
    # the engine's view of the origin: writes must copy into this store first
    m = describe(found.vg("vg0").vg, found.vg("vg0").vg.lv("lvsysteme"),  # type: ignore[arg-type]
                 {u: u for u in found.vg("vg0").disks})
    assert m.kind == "origin" and m.cows[0].chunk_size == CHUNK and len(m.cows[0].segments) == 2
    # roll back: every copied chunk goes back
    msgs = snapops.lvconvert_merge(mgr, "vg0", "lvsnap").messages
    assert msgs[0] == "Merging of volume vg0/lvsnap started."
    assert "3 chunks copied back" in msgs[1]
    assert _io(mgr, "lvsysteme").read(0, 2 * MIB) == before
    assert mgr.scan().vg("vg0").vg.snapshots() == []
    assert lvm.warnings(lvm.run("vgck", "vg0")) == []


def test_a_merge_asked_while_active_waits_for_the_next_activation(
        two: tuple[VolumeManager, Lvm2]) -> None:
    mgr, lvm = two
    lvops.lvcreate(mgr, "vg0", "lv1", parse_size("8M"))  # active here
    _io(mgr, "lv1").write(0, b"old" * 1000)
    snapops.lvcreate_snapshot(mgr, "vg0", "lv1", "snap", parse_size("4M"))
    _cow_write(mgr, "lv1", "snap", 0, b"new")
    msgs = snapops.lvconvert_merge(mgr, "vg0", "snap").messages
    assert msgs == ["Merging of snapshot vg0/snap will occur on next activation of vg0/lv1."]
    attrs = {r["lv_name"]: r["lv_attr"] for r in lvm.report("lv", "lv_name,lv_attr", "-a")}
    assert attrs["lv1"][0] == "O" and attrs["[snap]"][0] == "S"  # lvm2 sees the merge
    with pytest.raises(VolumeError, match="being merged"):
        snapops.lvcreate_snapshot(mgr, "vg0", "lv1", "snap2", parse_size("4M"))
    assert _io(mgr, "lv1").read(0, 3) == b"new"
    lvops.lvchange(mgr, "vg0", ["lv1"], activate="n")
    out = lvops.lvchange(mgr, "vg0", ["lv1"], activate="y").messages
    assert out and "Merged: 100.00%" in out[0]
    assert _io(mgr, "lv1").read(0, 3000) == b"old" * 1000
    assert lvm.warnings(lvm.run("vgck", "vg0")) == []


def test_snapshot_rules(two: tuple[VolumeManager, Lvm2]) -> None:
    mgr, _lvm = two
    lvops.lvcreate(mgr, "vg0", "lv1", parse_size("8M"), activate=False)
    r = snapops.lvcreate_snapshot(mgr, "vg0", "lv1", "big", parse_size("40M"))
    assert r.messages[0].startswith("Reducing COW size 40.00 MiB down to maximum usable")
    with pytest.raises(VolumeError, match="Snapshots of snapshots"):
        snapops.lvcreate_snapshot(mgr, "vg0", "big", "s2", parse_size("4M"))
    with pytest.raises(VolumeError, match="has snapshots"):
        lvops.lvresize(mgr, "vg0", "lv1", parse_size("+4M"), verb="lvextend")
    with pytest.raises(VolumeError, match="would also remove 1 snapshot"):
        lvops.lvremove(mgr, "vg0", ["lv1"])
    lvops.lvcreate(mgr, "vg0", "lv2", parse_size("4M"), activate=False)
    msgs = lvops.lvremove(mgr, "vg0", [], force=True).messages  # lvremove -f vg0
    assert sorted(msgs) == sorted(f'Logical volume "{n}" successfully removed.'
                                  for n in ("lv1", "big", "lv2"))
    assert mgr.scan().vg("vg0").vg.lvs == []
