"""LVM2's format for real, lvm2 the oracle: what sanvisor writes, lvm2 reads (pvs, vgs,
lvs -o +seg_pe_ranges, vgck accept it and show the same extents, snapshots with their
origin); what lvm2 writes, sanvisor reads and changes, and lvm2 still accepts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sanvisor.storage.lvm import lvops, pvops, rows, snapops, vgops
from sanvisor.storage.lvm.names import parse_extents, parse_size
from tests.storage.lvm2 import (
    MIB,
    Lvm2,
    close,
    loop_devices,
    lvm2_segments,
    manager,
    needs_lvm2,
    sv_segments,
)

pytestmark = needs_lvm2


@pytest.fixture
def three(tmp_path: Path) -> Iterator[tuple[list[str], Lvm2]]:
    with loop_devices([64 * MIB, 64 * MIB, 64 * MIB]) as devs:
        yield devs, Lvm2(devs, tmp_path)


def test_lvm2_reads_what_sanvisor_writes(three: tuple[list[str], Lvm2]) -> None:
    devs, lvm = three
    mgr = manager(devs)
    try:
        vgops.vgcreate(mgr, "vgvirtualdebian", devs)
        lvops.lvcreate(mgr, "vgvirtualdebian", "lvsysteme", parse_size("40M"))
        lvops.lvcreate(mgr, "vgvirtualdebian", "lvdata", parse_size("20M"))
        # grows past lvdata, then across the second and third LUN: four segments
        lvops.lvresize(mgr, "vgvirtualdebian", "lvsysteme", parse_size("+100M"),
                       verb="lvextend")
        lvops.lvresize(mgr, "vgvirtualdebian", "lvsysteme", parse_extents("+100%FREE"),
                       verb="lvextend")
        lvops.lvresize(mgr, "vgvirtualdebian", "lvsysteme", parse_size("-8M"),
                       verb="lvreduce", force=True)
        snapops.lvcreate_snapshot(mgr, "vgvirtualdebian", "lvdata", "lvsnap",
                                  parse_size("8M"))
        ours = sv_segments(mgr, "vgvirtualdebian")
        assert len(ours["lvsysteme"]) >= 3
        assert {r.split(":")[0] for r in ours["lvsysteme"]} == set(devs)  # three LUNs
        # lvm2 accepts it all and sees the same extents
        assert lvm.warnings(lvm.run("vgck", "vgvirtualdebian")) == []
        assert lvm2_segments(lvm, "vgvirtualdebian") == ours
        lvs = {r["lv_name"]: r for r in lvm.report(
            "lv", "lv_name,lv_size,origin,lv_attr,chunk_size,seg_count")}
        assert lvs["lvsnap"]["origin"] == "lvdata" and lvs["lvsnap"]["lv_attr"][0] == "s"
        assert lvs["lvdata"]["lv_attr"][0] == "o" and lvs["lvsnap"]["chunk_size"] == "4096"
        found = mgr.scan()
        want = {str(r["lv_name"]): str(r["lv_size"]) for r in
                rows.lv_rows(found, "hostA", ["lv_size"])}
        assert {n: r["lv_size"] for n, r in lvs.items()} == want
        vgs = lvm.report("vg", "vg_name,pv_count,lv_count,snap_count,vg_size,vg_free,vg_seqno")
        ours_vg = rows.vg_rows(found)[0]
        assert [(v["vg_size"], v["vg_free"], v["vg_seqno"], v["snap_count"]) for v in vgs] == [
            (str(ours_vg["vg_size"]), str(ours_vg["vg_free"]), str(ours_vg["vg_seqno"]), "1")]
        pvs = lvm.report("pv", "pv_name,vg_name,pv_size,pv_free,pv_uuid")
        assert sorted((p["pv_name"], p["pv_uuid"], p["pv_free"]) for p in pvs) == sorted(
            (str(r["pv_name"]), str(r["pv_uuid"]), str(r["pv_free"]))
            for r in rows.pv_rows(found))
    finally:
        close(mgr)


def test_sanvisor_reads_and_changes_what_lvm2_writes(three: tuple[list[str], Lvm2]) -> None:
    devs, lvm = three
    lvm.run("pvcreate", "-y", *devs)
    lvm.run("vgcreate", "vgl", *devs)
    lvm.run("lvcreate", "-an", "-Zn", "-y", "-n", "lv1", "-L", "100M", "vgl")
    lvm.run("lvcreate", "-an", "-Zn", "-y", "-n", "lv2", "-L", "8M", "vgl", devs[2])
    lvm.run("lvextend", "-L", "+40M", "vgl/lv1")
    lvm.run("lvchange", "--addtag", "team=blue", "vgl/lv2")
    mgr = manager(devs)
    try:
        assert sv_segments(mgr, "vgl") == lvm2_segments(lvm, "vgl")
        found = mgr.scan()
        lv2 = next(r for r in rows.lv_rows(found, "hostA", ["lv_tags"]) if r["lv_name"] == "lv2")
        assert lv2["lv_tags"] == ["team=blue"] and mgr.warnings == []
        # sanvisor changes it; lvm2 reads the change and its check passes
        lvops.lvcreate(mgr, "vgl", "lv3", parse_extents("50%FREE"))
        snapops.lvcreate_snapshot(mgr, "vgl", "lv1", "snap1", parse_size("12M"))
        lvops.lvrename(mgr, "vgl", "lv2", "lvdeux")
        assert lvm.warnings(lvm.run("vgck", "vgl")) == []
        assert lvm2_segments(lvm, "vgl") == sv_segments(mgr, "vgl")
        # and lvm2 changes it again (its own write over ours), sanvisor follows
        lvm.run("lvextend", "-L", "+4M", "vgl/lv3")
        lvm.run("lvremove", "-y", "vgl/snap1")
        assert sv_segments(mgr, "vgl") == lvm2_segments(lvm, "vgl")
        assert "snap1" not in sv_segments(mgr, "vgl")
    finally:
        close(mgr)


def test_snapshot_metadata_as_lvm2_rewrites_it(three: tuple[list[str], Lvm2],
                                               tmp_path: Path) -> None:
    """lvm2 cannot make a snapshot without device-mapper, but it rewrites one: a backup
    and restore of sanvisor's VG by lvm2 is lvm2's own snapshot metadata, and sanvisor
    reads it back the same."""
    devs, lvm = three
    mgr = manager(devs)
    try:
        vgops.vgcreate(mgr, "vgs", devs[:2])
        lvops.lvcreate(mgr, "vgs", "origin", parse_size("16M"))
        snapops.lvcreate_snapshot(mgr, "vgs", "origin", "snap", parse_size("8M"), chunk=16)
        before = sv_segments(mgr, "vgs")
        backup = tmp_path / "vgs.backup"
        lvm.run("vgcfgbackup", "-f", str(backup), "vgs")
        assert 'cow_store = "snap"' in backup.read_text()
        lvm.run("vgcfgrestore", "-f", str(backup), "vgs")
        found = mgr.scan()
        vg = found.vg("vgs").vg
        assert vg.seqno >= 3 and sv_segments(mgr, "vgs") == before
        (_, seg), = vg.snapshots()
        assert (seg.origin, seg.cow, seg.chunk_size) == ("origin", "snap", 16)
        assert mgr.warnings == []
    finally:
        close(mgr)


def test_pvcreate_layout_matches_lvm2(three: tuple[list[str], Lvm2]) -> None:
    """A sanvisor PV is what lvm2's pvcreate makes (label sector, areas, pe_start),
    and pvck accepts it."""
    devs, lvm = three
    mgr = manager(devs)
    try:
        pvops.pvcreate(mgr, [devs[0]], metadatacopies=2)
        pvops.pvcreate(mgr, [devs[1]], metadatacopies=1)
        lvm.run("pvcreate", "--pvmetadatacopies", "2", devs[2])
        assert lvm.warnings(lvm.run("pvck", devs[0], devs[1])) == []
        fields = "pv_name,pv_mda_count,pv_mda_size,pe_start,pv_size"
        got = {r["pv_name"]: r for r in lvm.report("pv", fields)}
        assert got[devs[0]] | {"pv_name": ""} == got[devs[2]] | {"pv_name": ""}
        assert got[devs[1]]["pv_mda_count"] == "1"
        with open(devs[0], "rb") as a, open(devs[2], "rb") as b:
            la, lb = a.read(1024)[512:], b.read(1024)[512:]
        assert la[64:] == lb[64:]  # all but the label header and uuid: lvm2's bytes
    finally:
        close(mgr)
