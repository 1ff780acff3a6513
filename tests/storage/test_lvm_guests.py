"""Real guests on LVs (the seed's ``disk = ['phy:/dev/vgvirtualdebian/lvsysteme,sda,w']``).

One lab, one VG on two LUNs, one guest for the module: its disk is an LV whose two
segments are on the two LUNs, served by the data-path engine. The guest's writes
land on each LUN at the offsets the LV's segments say; an ``lvextend`` under the
running guest reaches it without a reboot (``/sys/block/sda/size``); removing,
reducing or deactivating the LV it uses is refused, naming the domain; so is
removing a map (``multipath -f``) the LV, a guest or a mount holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest.helpers import wait_until
from tests.labcli import LabCli

pytestmark = [pytest.mark.root, pytest.mark.guest,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")]
MIB = 1 << 20
WWPNS = [f"10:00:00:00:c9:00:01:0{k}" for k in (0, 1)]
VG, LV = "vgvirtualdebian", "lvsysteme"


class Guest:
    def __init__(self, lab: LabCli, name: str, shell: Any) -> None:
        self.lab, self.name, self.shell = lab, name, shell

    def run(self, cmd: str, timeout: float = 30.0) -> str:
        return str(self.shell.run(cmd, timeout=timeout))


@pytest.fixture(scope="module")
def lab() -> Iterator[LabCli]:
    root = Path(tempfile.mkdtemp(prefix="svlvg", dir="/tmp"))
    shutil.rmtree(root)
    lab = LabCli(root, f"g{os.getpid() % 100000}")
    lab.env["SANVISOR_LEASE_IO_TIMEOUT"] = "0.25"
    try:
        lab.sv("lab", "up", "--hosts", "1", "--name", lab.name)
        for lun in ("la", "lb"):
            lab.sv("array", "lun", "create", lun, "--size", "64M")
            for w in WWPNS:
                lab.sv("array", "zone", "add", lun, w)
        lab.sv("-H", "host1", "scsi", "rescan")
        yield lab
    finally:
        lab.sv("-H", "host1", "destroy", "lvg1", check=False)
        lab.sv("lab", "down", check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def guest(lab: LabCli, kit: object) -> Guest:
    from sanvisor.lab.guestshell import GuestShell

    maps = sorted(m["name"] for m in lab.js("-H", "host1", "multipath")["maps"])
    a, b = (f"/dev/mapper/{m}" for m in maps)
    lab.sv("-H", "host1", "vgcreate", VG, a, b)
    lab.sv("-H", "host1", "lvcreate", "-n", LV, "-L", "8M", VG, a)
    lab.sv("-H", "host1", "lvextend", "-L", "+8M", f"{VG}/{LV}", b)  # a segment on each
    cfg = lab.root / "lvg1.cfg"
    cfg.write_text(f'name = "lvg1"\nmemory = 128\ndisk = [ "phy:/dev/{VG}/{LV},sda,w" ]\n')
    lab.sv("-H", "host1", "create", str(cfg))
    info = lab.js("-H", "host1", "list", "lvg1")[-1]
    log = Path(info["console_log"])
    wait_until("the guest's marker", lambda: b"SANVISOR-READY" in log.read_bytes(), 90)
    return Guest(lab, "lvg1", GuestShell(info["console_socket"]))


def lvmap(lab: LabCli) -> dict[str, Any]:
    from sanvisor.api.client import AgentClient

    client = AgentClient(lab.root / "host1" / "agent.sock")
    return dict(client.call("POST", "/v1/lvm/lvmap", {"args": {"lv": f"{VG}/{LV}"}})["data"])


def lun_bytes(lab: LabCli, wwid: str, off: int, n: int) -> bytes:
    with open(lab.root / "array" / "luns" / f"{wwid}.img", "rb") as f:
        f.seek(off)
        return f.read(n)


def test_a_guest_on_an_lv_writes_to_each_segment_on_its_lun(lab: LabCli,
                                                            guest: Guest) -> None:
    segs = lvmap(lab)["segments"]
    assert len(segs) == 2 and segs[0]["map_id"] != segs[1]["map_id"]
    assert guest.run("cat /sys/block/sda/size") == str(16 * MIB // 512)
    for i, s in enumerate(segs):  # a marker 4 KiB into each segment, written in the guest
        sector = (s["start"] + 4096) // 512
        guest.run(f"echo SEGMENT-{i}-MARK | dd of=/dev/sda bs=512 seek={sector} "
                  "conv=sync,fsync 2>/dev/null")
    for i, s in enumerate(segs):
        got = lun_bytes(lab, s["map_id"], s["map_offset"] + 4096, 14)
        assert got == f"SEGMENT-{i}-MARK".encode(), (i, got)
    # and back: what is on the LUN is what the guest reads, across the boundary
    boundary = segs[1]["start"] // 512 - 1
    guest.run(f"printf 'AAAA%508sBBBB%508s' x y | dd of=/dev/sda bs=512 seek={boundary} "
              "count=2 conv=fsync 2>/dev/null")
    assert guest.run(f"dd if=/dev/sda bs=512 skip={boundary} count=2 2>/dev/null "
                     "| md5sum | cut -c1-32") == hashlib.md5(
        b"AAAA" + b" " * 507 + b"x" + b"BBBB" + b" " * 507 + b"y").hexdigest()
    assert lun_bytes(lab, segs[1]["map_id"], segs[1]["map_offset"], 4) == b"BBBB"


def test_lvextend_reaches_the_running_guest(lab: LabCli, guest: Guest) -> None:
    lab.sv("-H", "host1", "lvextend", "-L", "+8M", f"{VG}/{LV}")
    want = str(24 * MIB // 512)
    wait_until("the guest to see 24 MiB", lambda: guest.run(
        "cat /sys/block/sda/size") == want or None, 30, 0.2)
    guest.run(f"echo AFTER-GROW | dd of=/dev/sda bs=512 seek={20 * MIB // 512} "
              "conv=sync,fsync 2>/dev/null")  # the new extents are usable at once
    last = lvmap(lab)["segments"][-1]
    at = 20 * MIB - last["start"] + last["map_offset"]
    assert lun_bytes(lab, last["map_id"], at, 10) == b"AFTER-GROW"


@pytest.mark.parametrize("argv", [["lvremove", "-f", f"{VG}/{LV}"],
                                  ["lvreduce", "-f", "-L", "16M", f"{VG}/{LV}"],
                                  ["lvchange", "-an", f"{VG}/{LV}"]])
def test_an_lv_in_use_is_not_taken_away(lab: LabCli, guest: Guest, argv: list[str]) -> None:
    before = lvmap(lab)["size"]
    refused = lab.sv("-H", "host1", *argv, check=False)
    assert refused.returncode != 0
    assert "in use by domain lvg1 (sda)" in refused.stderr, refused.stderr
    assert refused.stderr.count("\n") == 1  # one line
    assert lvmap(lab)["size"] == before
    assert guest.run("echo ok") == "ok"


def lv_image(lab: LabCli) -> bytes:
    """The LV as it is on the LUNs now (its segments, read from the array's files)."""
    return b"".join(lun_bytes(lab, s["map_id"], s["map_offset"], s["length"])
                    for s in lvmap(lab)["segments"])


def test_backup_of_a_running_guest_is_its_disk_at_the_snapshot_instant(
        lab: LabCli, guest: Guest) -> None:
    """The guest rewrites its disk all along (write i: "WRITE i" at a block of its own,
    fsynced, counted); the copy must be the disk before the backup plus exactly a prefix
    of those writes: every write acknowledged before the backup began, none acknowledged
    after it ended, nothing torn."""
    before = lv_image(lab)
    nblocks = len(before) // 512
    guest.run("rm -f /tmp/stop /tmp/b.n /tmp/b.out")
    guest.run(f"(i=0; while [ ! -e /tmp/stop ]; do p=$(( (i * 7919) % {nblocks} )); "
              "printf 'WRITE %06d' $i | dd of=/dev/sda bs=512 seek=$p conv=sync,fsync "
              "2>/dev/null; i=$((i+1)); echo $i > /tmp/b.n; done; echo done > /tmp/b.out) "
              "</dev/null >/dev/null 2>&1 & true")

    def count() -> int:
        out = guest.run("cat /tmp/b.n 2>/dev/null || echo 0")
        return int(out) if out.isdigit() else 0

    wait_until("the guest's first writes", lambda: count() >= 10 or None, 60, 0.1)
    n0 = count()
    target = lab.root / "backup.img"
    job = lab.js("-H", "host1", "backup", "lvg1", "sda", "--to", str(target))
    n1 = count()
    wait_until("writes after the backup", lambda: count() > n1 + 5 or None, 60, 0.1)
    guest.run("touch /tmp/stop")
    wait_until("the writer to stop", lambda: guest.run("cat /tmp/b.out 2>/dev/null || true")
               == "done" or None, 30, 0.1)
    copy = target.read_bytes()
    assert job["state"] == "done" and job["total"] == len(before) == len(copy)
    assert hashlib.sha256(copy).hexdigest() == job["sha256"]
    seen = []
    expected = bytearray(before)
    for i in range(count()):
        p = (i * 7919) % nblocks * 512
        block = f"WRITE {i:06d}".encode().ljust(512, b"\0")
        if copy[p:p + 512] == block:
            seen.append(i)
            expected[p:p + 512] = block
    k = len(seen)
    assert seen == list(range(k)), "the copy holds writes that are no prefix"
    assert n0 < n1  # the guest wrote while the backup ran
    assert n0 <= k <= n1 + 1, (n0, k, n1)  # acknowledged before: in; after: out
    assert copy == bytes(expected)  # and nothing else changed, nothing torn
    assert lv_image(lab) != copy  # the guest went on writing after the instant
    lvs = lab.sv("-H", "host1", "lvs", "-a", VG).stdout
    assert "backup" not in lvs  # its snapshot removed


def test_host_tools_get_block_devices_and_a_mounted_lv_is_kept(lab: LabCli, guest: Guest,
                                                                tmp_path: Path) -> None:
    """Every active LV (and map) is a real block device for the host's tools, at
    HOME/dev/VG/LV and HOME/dev/mapper/VG-LV; an LV mounted on the host is not
    deactivated (the mount is named); released, its device goes."""
    import subprocess

    dev = lab.root / "host1" / "dev"
    node = dev / VG / LV
    assert node.is_symlink() and os.readlink(node).startswith("/dev/loop")
    assert (dev / "mapper" / f"{VG}-{LV}").resolve() == node.resolve()
    assert all((dev / "mapper" / m["name"]).is_symlink()
               for m in lab.js("-H", "host1", "multipath")["maps"])
    guest.run("echo HOST-SEES-THIS | dd of=/dev/sda bs=512 seek=24 conv=sync,fsync "
              "2>/dev/null")
    read = subprocess.run(["dd", f"if={node}", "bs=4096", "skip=3", "count=1",
                           "iflag=direct", "status=none"], capture_output=True, check=True)
    assert read.stdout.startswith(b"HOST-SEES-THIS")
    lab.sv("-H", "host1", "lvcreate", "-n", "lvdata", "-L", "8M", VG)
    data, mnt = dev / VG / "lvdata", tmp_path / "mnt"
    assert data.is_symlink()
    subprocess.run(["mkfs.ext4", "-q", "-F", str(data)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", str(data), str(mnt)], check=True)
    try:
        (mnt / "f").write_text("on the SAN")
        refused = lab.sv("-H", "host1", "lvchange", "-an", f"{VG}/lvdata", check=False)
        assert refused.returncode == 1 and f"a mount on {mnt}" in refused.stderr, \
            refused.stderr
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    lab.sv("-H", "host1", "lvchange", "-an", f"{VG}/lvdata")
    assert not data.exists() and not data.is_symlink()
    lab.sv("-H", "host1", "lvremove", f"{VG}/lvdata")


def test_a_second_domain_boots_from_a_snapshot_of_the_running_one(lab: LabCli,
                                                                  guest: Guest) -> None:
    """The seed's "on démarre une nouvelle instance à partir de lvsnap": a snapshot of
    the running guest's LV is the disk of a second domain; each sees the snapshot's
    instant plus its own writes only."""
    from sanvisor.lab.guestshell import GuestShell

    guest.run("echo BEFORE-SNAP | dd of=/dev/sda bs=512 seek=40 conv=sync,fsync 2>/dev/null")
    lab.sv("-H", "host1", "lvcreate", "-s", "-L", "8M", "-n", "lvsnap", f"{VG}/{LV}")
    guest.run("echo AFTER-SNAP1 | dd of=/dev/sda bs=512 seek=40 conv=sync,fsync 2>/dev/null")
    cfg = lab.root / "lvg2.cfg"
    cfg.write_text(f'name = "lvg2"\nmemory = 128\ndisk = [ "phy:/dev/{VG}/lvsnap,sda,w" ]\n')
    lab.sv("-H", "host1", "create", str(cfg))
    try:
        info = lab.js("-H", "host1", "list", "lvg2")[-1]
        log = Path(info["console_log"])
        wait_until("the second guest's marker", lambda: b"SANVISOR-READY" in log.read_bytes(),
                   90)
        second = Guest(lab, "lvg2", GuestShell(info["console_socket"]))
        read40 = "dd if=/dev/sda bs=512 skip=40 count=1 2>/dev/null | head -c 11"
        assert second.run(read40) == "BEFORE-SNAP"
        second.run("echo SECOND-ONLY | dd of=/dev/sda bs=512 seek=41 conv=sync,fsync "
                   "2>/dev/null")
        assert guest.run(read40) == "AFTER-SNAP1"
        assert guest.run("dd if=/dev/sda bs=512 skip=41 count=1 2>/dev/null | head -c 11"
                         ) != "SECOND-ONLY"
        assert second.run("cat /sys/block/sda/size") == guest.run("cat /sys/block/sda/size")
        refused = lab.sv("-H", "host1", "lvremove", "-f", f"{VG}/lvsnap", check=False)
        assert "in use by domain lvg2 (sda)" in refused.stderr, refused.stderr
    finally:
        lab.sv("-H", "host1", "destroy", "lvg2", check=False)
    lab.sv("-H", "host1", "lvremove", "-f", f"{VG}/lvsnap")
    assert guest.run("echo ok") == "ok"


def test_an_lv_on_two_luns_survives_either_hba_failing(lab: LabCli, guest: Guest) -> None:
    segs = lvmap(lab)["segments"][:2]  # one on each LUN
    try:
        for hba in ("0", "1"):
            lab.sv("lab", "fault", "hba-down", "host1", hba)
            for i, s in enumerate(segs):
                sector = (s["start"] + 8192) // 512
                out = guest.run(f"echo HBA{hba}-DOWN-{i} | dd of=/dev/sda bs=512 "
                                f"seek={sector} conv=sync,fsync 2>&1 >/dev/null; echo rc=$?",
                                timeout=60)
                assert out.endswith("rc=0"), out
            lab.sv("lab", "fault", "hba-up", "host1", hba)
            for i, s in enumerate(segs):
                want = f"HBA{hba}-DOWN-{i}\n".encode()
                assert lun_bytes(lab, s["map_id"], s["map_offset"] + 8192, len(want)) == want
    finally:
        for hba in ("0", "1"):
            lab.sv("lab", "fault", "hba-up", "host1", hba, check=False)
    assert "I/O error" not in guest.run("dmesg | grep -i error || true")


def test_a_map_in_use_is_not_removed(lab: LabCli, guest: Guest, tmp_path: Path) -> None:
    """``multipath -f MAP`` is refused while a guest, a mount or an active LV holds the
    map, naming them, as an LV in use is; an unused map goes (its socket and block
    device with it) and comes back at the next ``scsi rescan``."""
    import subprocess

    def maps() -> dict[str, str]:
        return {m["name"]: m["wwid"] for m in lab.js("-H", "host1", "multipath")["maps"]}

    on_lv = {s["map_id"] for s in lvmap(lab)["segments"]}
    name = next(n for n, w in maps().items() if w in on_lv)
    refused = lab.sv("-H", "host1", "multipath", "-f", name, check=False)
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert f"map {name} is in use by LV {VG}/{LV} (active here)" in refused.stderr
    before = set(maps())
    lab.sv("array", "lun", "create", "lc", "--size", "16M")
    for w in WWPNS:
        lab.sv("array", "zone", "add", "lc", w)
    lab.sv("-H", "host1", "scsi", "rescan")
    (new,) = set(maps()) - before
    home = lab.root / "host1"
    node, mnt = home / "dev" / "mapper" / new, tmp_path / "mnt"
    wait_until("the new map's block device", lambda: node.is_symlink() or None, 30, 0.1)
    lab.sv("-H", "host1", "block-attach", guest.name, f"phy:/dev/mapper/{new}", "sdb", "w")
    try:
        refused = lab.sv("-H", "host1", "multipath", "-f", new, check=False)
        assert refused.returncode == 1, refused.stderr
        assert f"in use by domain {guest.name} (sdb)" in refused.stderr, refused.stderr
    finally:
        lab.sv("-H", "host1", "block-detach", guest.name, "sdb")
    subprocess.run(["mkfs.ext4", "-q", "-F", str(node)], check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", str(node), str(mnt)], check=True)
    try:
        refused = lab.sv("-H", "host1", "multipath", "-f", new, check=False)
        assert refused.returncode == 1 and f"a mount on {mnt}" in refused.stderr, \
            refused.stderr
        out = lab.sv("--json", "-H", "host1", "multipath", "-F", check=False)
        held = json.loads(out.stdout)  # every map is held: none goes
        assert out.returncode == 1 and held["removed"] == [] and set(held["in_use"]) == set(
            maps())
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    lab.sv("-H", "host1", "multipath", "-f", new)
    assert new not in maps()
    assert not node.is_symlink() and not (home / "mapper" / f"{new}.sock").exists()
    assert guest.run("echo ok") == "ok"  # the others untouched
    lab.sv("-H", "host1", "scsi", "rescan")
    assert new in maps()
    wait_until("its block device again", lambda: node.is_symlink() or None, 30, 0.1)
