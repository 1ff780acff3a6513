"""Volumes in the SAN lab: PVs are multipath maps (NBD through two HBAs), written by the
hosts' agents; every host sees the same VGs (`-H host2 lvs`); lvm2, reading the array's
LUN files, accepts what they wrote and sees the same extents; and the engine's view
of an LV is its segments on the maps' WWIDs."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.labcli import LabCli
from tests.storage.lvm2 import MIB, Lvm2, loop_devices, needs_lvm2

pytestmark = needs_lvm2
WWPNS = [f"10:00:00:00:c9:00:0{n}:0{k}" for n in (1, 2) for k in (0, 1)]


@pytest.fixture(scope="module")
def lab() -> Iterator[LabCli]:
    root = Path(tempfile.mkdtemp(prefix="svlvlab", dir="/tmp"))
    shutil.rmtree(root)
    lab = LabCli(root, f"v{os.getpid() % 100000}")
    lab.env["SANVISOR_LEASE_IO_TIMEOUT"] = "0.25"
    try:
        lab.sv("lab", "up", "--hosts", "2", "--name", lab.name)
        for lun in ("l1", "l2", "l3"):
            lab.sv("array", "lun", "create", lun, "--size", "128M")
            for w in WWPNS:
                lab.sv("array", "zone", "add", lun, w)
        for h in ("host1", "host2"):
            lab.sv("-H", h, "scsi", "rescan")
        yield lab
    finally:
        lab.sv("lab", "down", check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_volumes_on_maps_seen_alike_from_every_host(lab: LabCli, tmp_path: Path) -> None:
    maps = {m["wwid"]: m["name"] for m in lab.js("-H", "host1", "multipath")["maps"]}
    names = [f"/dev/mapper/{n}" for n in maps.values()]
    lab.sv("-H", "host1", "vgcreate", "vgvirtualdebian", *names)
    lab.sv("-H", "host1", "lvcreate", "-n", "lvsysteme", "-L", "100M", "vgvirtualdebian")
    lab.sv("-H", "host1", "lvcreate", "-n", "lvswap", "-L", "20M", "vgvirtualdebian")
    lab.sv("-H", "host1", "lvextend", "-L", "+200M", "vgvirtualdebian/lvsysteme")
    lab.sv("-H", "host2", "lvcreate", "-n", "lvdata", "-l", "100%FREE", "vgvirtualdebian")

    def view(host: str) -> dict[str, list[str]]:
        """LV -> its PE ranges, each on a LUN's WWID (map names are the host's own)."""
        wwid = {f"/dev/mapper/{m['name']}": m["wwid"]
                for m in lab.js("-H", host, "multipath")["maps"]}
        rep = json.loads(lab.sv("-H", host, "lvs", "--reportformat", "json", "-o",
                                "lv_name,seg_pe_ranges").stdout)["report"][0]["lv"]
        out: dict[str, list[str]] = {}
        for r in rep:
            dev, rng = r["seg_pe_ranges"].split(":")
            out.setdefault(r["lv_name"], []).append(f"{wwid[dev]}:{rng}")
        return out

    one, two = view("host1"), view("host2")
    assert one == two and len(one["lvsysteme"]) >= 3  # several segments, on every LUN
    assert {r.split(":")[0] for r in one["lvsysteme"]} == set(maps)
    refused = lab.sv("-H", "host2", "lvchange", "-ay", "vgvirtualdebian/lvsysteme",
                     check=False)
    assert refused.returncode == 1 and "active on host1" in refused.stderr
    # the engine's description: segments on the maps' WWIDs
    from sanvisor.api.client import AgentClient

    client = AgentClient(lab.root / "host2" / "agent.sock")
    lvmap = client.call("POST", "/v1/lvm/lvmap", {"args": {"lv": "vgvirtualdebian/lvsysteme"}})
    segs = lvmap["data"]["segments"]
    assert [f"{s['map_id']}:{(s['map_offset'] - MIB) // (4 * MIB)}" for s in segs] == [
        r.split("-")[0] for r in one["lvsysteme"]]  # pe_start is 1 MiB: 4 MiB extents
    assert sum(s["length"] for s in segs) == lvmap["data"]["size"] == 300 * MIB
    assert all(s["map_offset"] >= MIB for s in segs) and segs[0]["start"] == 0
    # lvm2, on the LUN files the array serves, agrees
    files = [lab.root / "array" / "luns" / f"{w}.img" for w in maps]
    with loop_devices([], files=files, readonly=True) as loops:
        lvm = Lvm2(loops, tmp_path)
        assert lvm.warnings(lvm.run("vgck", "vgvirtualdebian")) == []
        by_loop = dict(zip(loops, maps, strict=True))
        theirs: dict[str, list[str]] = {}
        for r in lvm.report("lv", "lv_name,seg_pe_ranges"):
            dev, rng = r["seg_pe_ranges"].split(":")
            theirs.setdefault(r["lv_name"], []).append(f"{by_loop[dev]}:{rng}")
        assert theirs == one
