"""Bad input and bad disks: one-line refusals that write nothing; a metadata copy with
a bad checksum replaced by another, with a warning; a VG with a missing PV read but
not written until vgreduce --removemissing; a host killed at any write of a change
leaves every copy whole (old or new), and lvm2 agrees."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanvisor.errors import (
    MissingPvError,
    SanvisorError,
    VolumeExistsError,
    VolumeInUseError,
    VolumeNameError,
    VolumeSpaceError,
)
from sanvisor.storage.lvm import check, lvops, pvops, vgops
from sanvisor.storage.lvm.blockdev import BlockDevice, FileDevice
from sanvisor.storage.lvm.manager import DeviceRef, VolumeManager
from sanvisor.storage.lvm.names import parse_size
from sanvisor.storage.lvm.ondisk import find_label, parse_mda_header
from tests.storage.lvm2 import MIB, Lvm2, close, loop_devices, manager, needs_lvm2

pytestmark = needs_lvm2


@pytest.fixture
def three(tmp_path: Path) -> Iterator[tuple[list[str], Lvm2]]:
    with loop_devices([64 * MIB, 64 * MIB, 64 * MIB]) as devs:
        yield devs, Lvm2(devs, tmp_path)


def _seqno(devs: list[str], vg: str) -> int:
    mgr = manager(devs, leases=False)
    try:
        return mgr.scan().vg(vg).vg.seqno
    finally:
        close(mgr)


def _refused(exc: type[SanvisorError], fn: object, *args: object, **kw: object) -> str:
    with pytest.raises(exc) as info:
        fn(*args, **kw)  # type: ignore[operator]
    msg = str(info.value)
    assert "\n" not in msg and msg  # one line
    return msg


def test_bad_input_is_refused_in_one_line_and_writes_nothing(
        three: tuple[list[str], Lvm2]) -> None:
    devs, lvm = three
    mgr = manager(devs)
    try:
        vgops.vgcreate(mgr, "vg0", devs[:2])
        lvops.lvcreate(mgr, "vg0", "lv1", parse_size("100M"))
        seq = _seqno(devs, "vg0")
        msg = _refused(VolumeSpaceError, lvops.lvcreate, mgr, "vg0", "big", parse_size("1G"))
        assert "256 extents (1.00g) needed" in msg and "only 5 (20.00m) available" in msg
        _refused(VolumeExistsError, lvops.lvcreate, mgr, "vg0", "lv1", parse_size("4M"))
        for bad in ("snapshot1", "pvmove0", "lv_mlog", "x_rimage_0", "a b", "-lv", "..", ".",
                    "a/b", "x" * 128, ""):
            _refused(VolumeNameError, lvops.lvcreate, mgr, "vg0", bad, parse_size("4M"))
        for bad in ("/", "..", "-vg", "vg#1", "y" * 128):
            _refused(VolumeNameError, vgops.vgcreate, mgr, bad, [devs[2]])
        _refused(VolumeExistsError, vgops.vgcreate, mgr, "vg0", [devs[2]])
        msg = _refused(VolumeInUseError, pvops.pvcreate, mgr, [devs[0]])
        assert 'of volume group "vg0" without -ff' in msg
        msg = _refused(VolumeInUseError, vgops.vgcreate, mgr, "vg1", [devs[2], devs[1]])
        assert 'already in volume group "vg0"' in msg
        assert _seqno(devs, "vg0") == seq  # nothing half-done...
        assert find_label(FileDevice(devs[2]).read(0, 2048)) is None  # ...nor a PV made
        assert lvm.warnings(lvm.run("vgck", "vg0")) == []
    finally:
        close(mgr)


def test_pvcreate_refuses_what_a_device_holds(three: tuple[list[str], Lvm2]) -> None:
    devs, _lvm = three
    subprocess.run(["mkfs.ext4", "-q", "-F", devs[0]], check=True, capture_output=True,
                   timeout=120)
    mbr = bytearray(512)
    mbr[446 + 4] = 0x83  # one Linux partition, sectors 2048..
    mbr[446 + 8:446 + 16] = (2048).to_bytes(4, "little") + (4096).to_bytes(4, "little")
    mbr[510:512] = b"\x55\xaa"
    dev = FileDevice(devs[1])
    dev.write(0, bytes(mbr))
    dev.close()
    before = [FileDevice(d).read(0, 1 << 17) for d in devs[:2]]
    mgr = manager(devs)
    try:
        msg = _refused(VolumeInUseError, pvops.pvcreate, mgr, [devs[0]])
        assert "ext2/ext3/ext4 filesystem" in msg and "--force" in msg
        msg = _refused(VolumeInUseError, vgops.vgcreate, mgr, "vg0", [devs[2], devs[1]])
        assert "DOS (MBR) partition table" in msg
        assert [FileDevice(d).read(0, 1 << 17) for d in devs[:2]] == before
        assert find_label(FileDevice(devs[2]).read(0, 2048)) is None  # vgcreate: nothing
        pvops.pvcreate(mgr, [devs[0]], force=1)  # --force: what was there goes
        assert find_label(FileDevice(devs[0]).read(0, 2048)) is not None
    finally:
        close(mgr)


def _flip(dev: str, offset: int) -> None:
    d = FileDevice(dev)
    byte = d.read(offset, 1)[0]
    d.write(offset, bytes([byte ^ 0x55]))
    d.close()


def test_a_bad_checksum_uses_the_other_copy_with_a_warning(
        three: tuple[list[str], Lvm2]) -> None:
    devs, lvm = three
    mgr = manager(devs)
    try:
        vgops.vgcreate(mgr, "vg0", devs[:2])
        lvops.lvcreate(mgr, "vg0", "lv1", parse_size("8M"))
        d0 = FileDevice(devs[0])
        label = find_label(d0.read(0, 2048))
        assert label is not None
        first, second = label.mdas
        hdr = parse_mda_header(d0.read(first.offset, 512), first.offset)
        d0.close()
        _flip(devs[0], first.offset + hdr.committed.offset + 10)  # the text of copy 1
        _flip(devs[0], second.offset + 20)  # the header of copy 2
        found = mgr.scan()
        assert [lv.name for lv in found.vg("vg0").vg.lvs] == ["lv1"]
        text = " ".join(mgr.warnings)
        assert f"{devs[0]}: metadata at" in text and "bad checksum" in text
        assert "header at" in text and "read from the copy with seqno" in text
        assert len(check.check_vg(found.vg("vg0"))) == 2
        # the next change writes every copy again
        lvops.lvcreate(mgr, "vg0", "lv2", parse_size("8M"))
        mgr.begin()
        found = mgr.scan()
        assert mgr.warnings == [] and check.check_vg(found.vg("vg0")) == []
        assert lvm.warnings(lvm.run("vgck", "vg0")) == []
    finally:
        close(mgr)


def test_a_missing_pv_is_reported_and_nothing_written_until_removemissing(
        three: tuple[list[str], Lvm2], tmp_path: Path) -> None:
    devs, _lvm = three
    full = manager(devs)
    try:
        vgops.vgcreate(full, "vg0", devs)
        lvops.lvcreate(full, "vg0", "lv1", parse_size("20M"), pvs=[devs[0]])
        lvops.lvcreate(full, "vg0", "lv2", parse_size("80M"), pvs=[devs[1], devs[2]])
        seq = _seqno(devs, "vg0")
    finally:
        close(full)
    part = manager(devs[:2])  # the third LUN is gone from this host's view
    try:
        found = part.scan()
        assert found.vg("vg0").missing and any("is missing PV" in w for w in part.warnings)
        msg = _refused(MissingPvError, lvops.lvcreate, part, "vg0", "lv3", parse_size("4M"))
        assert "vgreduce --removemissing vg0" in msg
        msg = _refused(VolumeInUseError, vgops.vgreduce, part, "vg0", [], removemissing=True)
        assert "lv2" in msg and "--force" in msg
        assert _seqno(devs[:2], "vg0") == seq
        vgops.vgreduce(part, "vg0", [], removemissing=True, force=True)
        st = part.scan().vg("vg0")
        assert [lv.name for lv in st.vg.lvs] == ["lv1"] and len(st.vg.pvs) == 2
        assert check.check_vg(st) == []
        lvm2 = Lvm2(devs[:2], tmp_path / "two")
        assert lvm2.warnings(lvm2.run("vgck", "vg0")) == []
    finally:
        close(part)
    back = manager(devs)  # the LUN comes back: its old copy is reported, then cleaned
    try:
        back.scan()
        assert any("not in it any more" in w for w in back.warnings)
        lvops.lvcreate(back, "vg0", "lv3", parse_size("4M"))
        back.begin()
        assert back.scan().vg("vg0").outdated == [] and back.warnings == []
    finally:
        close(back)


class Crash(BaseException):
    """The host dies (nothing catches it)."""


class Crashing:
    def __init__(self, dev: BlockDevice, budget: list[int]) -> None:
        self.dev, self.budget, self.name = dev, budget, dev.name

    @property
    def size(self) -> int:
        return self.dev.size

    def read(self, offset: int, length: int) -> bytes:
        return self.dev.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        if self.budget[0] <= 0:
            raise Crash
        self.budget[0] -= 1
        self.dev.write(offset, data)

    def flush(self) -> None:
        self.dev.flush()

    def close(self) -> None:
        self.dev.close()


def _regions(devs: list[str]) -> list[tuple[str, int, bytes]]:
    out = []
    for d in devs:
        dev = FileDevice(d)
        out += [(d, 0, dev.read(0, MIB)), (d, dev.size - MIB, dev.read(dev.size - MIB, MIB))]
        dev.close()
    return out


@pytest.mark.parametrize("pvs,copies", [(3, 2), (1, 1)], ids=["3pvs-6copies", "1pv-1copy"])
def test_a_host_killed_at_any_write_leaves_whole_metadata(
        three: tuple[list[str], Lvm2], tmp_path: Path, pvs: int, copies: int) -> None:
    devs = three[0][:pvs]
    lvm = Lvm2(devs, tmp_path / "kill")
    mgr = manager(devs, leases=False)
    try:
        vgops.vgcreate(mgr, "vg0", devs, metadatacopies=copies)
        lvops.lvcreate(mgr, "vg0", "lv1", parse_size("20M"), zero=False)
    finally:
        close(mgr)
    saved = _regions(devs)
    old = _seqno(devs, "vg0")
    outcomes = set()
    for k in range(40):
        for d, off, data in saved:  # the VG as it was before the change
            dev = FileDevice(d)
            dev.write(off, data)
            dev.close()
        budget = [k]
        refs = [DeviceRef(d, d, (lambda d=d, b=budget: Crashing(FileDevice(d), b)))
                for d in devs]
        killed = VolumeManager("hostA", lambda refs=refs: refs)
        try:
            lvops.lvresize(killed, "vg0", "lv1", parse_size("+32M"), verb="lvextend")
            done = True
        except Crash:
            done = False
        finally:
            close(killed)
        after = manager(devs, leases=False)
        try:
            st = after.scan().vg("vg0")
            size = st.vg.lv("lv1").extents  # type: ignore[union-attr]
            assert (st.vg.seqno, size) in ((old, 5), (old + 1, 13)), (k, st.vg.seqno, size)
            assert bool(st.lagging) == bool(after.warnings)  # never silent
            theirs = lvm.report("lv", "lv_name,seg_size_pe,vg_seqno")  # lvm2 agrees
            assert [(r["lv_name"], int(r["vg_seqno"])) for r in theirs] == [
                ("lv1", st.vg.seqno)] * len(theirs)
            assert sum(int(r["seg_size_pe"]) for r in theirs) == size
            outcomes.add(st.vg.seqno)
            lvops.lvchange(after, "vg0", ["lv1"], addtag=["checked"])  # repairs
            assert check.check_vg(after.scan().vg("vg0")) == []
            assert lvm.warnings(lvm.run("vgck", "vg0")) == []
        finally:
            close(after)
        if done:
            break
    assert done and outcomes == {old, old + 1}
