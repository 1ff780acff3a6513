"""LVM2's on-disk format without a disk: checksums, label and metadata-area headers,
the metadata text (lvm2's own, read and written back byte for byte), the circular
buffer, dm-snapshot's exception store, names, sizes, and the parser fuzzed: any bytes
in a metadata area give a VG or a MetadataError, never a traceback."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sanvisor.errors import MetadataError, VolumeNameError
from sanvisor.storage.lvm import cfgtext, cowstore, names
from sanvisor.storage.lvm.model import vg_from_text, vg_to_text
from sanvisor.storage.lvm.ondisk import (
    INITIAL_CRC,
    MdaHeader,
    MdaLocation,
    PvLabel,
    RawLocn,
    calc_crc,
    find_label,
    next_offset,
    parse_mda_header,
)
from sanvisor.storage.lvm.pvdisk import PvDisk, init_mdas, layout, read_pv, write_label
from sanvisor.storage.lvm.pvdisk import write_metadata as write_md
from sanvisor.storage.lvm.report import human, human_long, resolve, table

SAMPLE = (Path(__file__).parent / "data" / "lvm2-metadata.txt").read_text()
MIB = 1 << 20


class MemDevice:
    """A device in memory."""

    def __init__(self, size: int, name: str = "/dev/mem0") -> None:
        self.buf, self.name = bytearray(size), name

    @property
    def size(self) -> int:
        return len(self.buf)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset:offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self.buf[offset:offset + len(data)] = data

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


_TAB = [0x00000000, 0x1DB71064, 0x3B6E20C8, 0x26D930AC, 0x76DC4190, 0x6B6B51F4, 0x4DB26158,
        0x5005713C, 0xEDB88320, 0xF00F9344, 0xD6D6A3E8, 0xCB61B38C, 0x9B64C2B0, 0x86D3D2D4,
        0xA00AE278, 0xBDBDF21C]


def _lvm2_crc(data: bytes) -> int:
    """lvm2's lib/misc/crc.c, nibble by nibble."""
    crc = INITIAL_CRC
    for b in data:
        crc ^= b
        crc = (crc >> 4) ^ _TAB[crc & 0xF]
        crc = (crc >> 4) ^ _TAB[crc & 0xF]
    return crc


@given(st.binary(max_size=600))
def test_the_checksum_is_lvm2s(data: bytes) -> None:
    assert calc_crc(data) == _lvm2_crc(data)


def test_label_and_header_round_trip_and_damage_is_seen() -> None:
    mdas, pe_start = layout(64 * MIB, 2)
    assert (mdas[0].offset, mdas[0].size, pe_start) == (4096, 1044480, MIB)  # lvm2's
    assert (mdas[1].offset, mdas[1].size) == (63 * MIB, MIB)
    label = PvLabel("DekS9mB9b2UOa9vUqkLnQcyke3mc6uqp", 64 * MIB, pe_start, mdas, used=True)
    head = bytes(512) + label.pack() + bytes(1024)
    assert find_label(head) == label
    for at in (528, 532, 560, 700):  # the checksum, and anything it covers
        bad = bytearray(head)
        bad[at] ^= 1
        with pytest.raises(MetadataError, match="bad checksum"):
            find_label(bytes(bad))
    assert find_label(bytes(2048)) is None
    hdr = MdaHeader(4096, 1044480, [RawLocn(512, 1026, 0x75F92257, 0), RawLocn()])
    raw = hdr.pack()
    assert parse_mda_header(raw, 4096) == hdr
    with pytest.raises(MetadataError, match="says it starts at 4096"):
        parse_mda_header(raw, 8192)
    with pytest.raises(MetadataError, match="bad checksum"):
        parse_mda_header(raw[:100] + b"x" + raw[101:], 4096)


def test_lvm2s_metadata_text_is_read_and_written_back_the_same() -> None:
    vg = vg_from_text(SAMPLE)
    assert vg.name == "vgvirtualdebian" and [lv.name for lv in vg.lvs] == ["lvsysteme", "lvswap"]
    sysv = vg.lv("lvsysteme")
    assert sysv is not None and [s.stripes[0][1] for s in sysv.segments] == [0, 2]
    assert sysv.tags == ["role=root"] and vg.free_count == vg.extent_count - 22
    body = SAMPLE.split("\n}\n")[0]
    assert vg_to_text(vg, "x", "h").split("\n}\n")[0] == body


def test_the_circular_buffer_wraps_and_the_committed_copy_always_reads() -> None:
    dev = MemDevice(4 * MIB)
    loc = MdaLocation(4096, 8192)  # a small area: wraps every other write
    label = PvLabel("a" * 32, dev.size, MIB, [loc])
    write_label(dev, label)
    init_mdas(dev, label)
    vg = vg_from_text(SAMPLE)
    for seq in range(1, 40):
        vg.seqno = seq
        vg.tags = ["x" * (seq * 37 % 900)]  # sizes that do and do not wrap
        write_md([PvDisk(dev, label)], vg_to_text(vg, f"write {seq}", "h"))
        disk = read_pv(dev)
        assert disk is not None and disk.copies[0].error == ""
        assert disk.copies[0].seqno == seq
        hdr = disk.copies[0].header
        assert hdr is not None and hdr.committed.offset % 512 == 0
        assert next_offset(hdr) >= 512


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=3000))
def test_any_bytes_parse_to_a_tree_or_a_metadata_error(data: bytes) -> None:
    for fn in (cfgtext.parse, vg_from_text):
        with contextlib.suppress(MetadataError):
            fn(data)
    with pytest.raises(MetadataError, match="5000 digits"):  # int() would refuse it
        cfgtext.parse("a = " + "1" * 5000)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_damaged_lvm2_text_gives_a_vg_or_a_metadata_error(data: st.DataObject) -> None:
    text = bytearray(SAMPLE.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text) - 1))
        what = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if what == "flip":
            text[at] = data.draw(st.integers(0, 255))
        elif what == "cut":
            del text[at:at + data.draw(st.integers(1, 40))]
        else:
            text[at:at] = data.draw(st.sampled_from([b"{", b"}", b"[", b'"', b"=", b"#",
                                                     b"-1", b"pv9", b"\0", b"\n"]))
    try:
        vg = vg_from_text(bytes(text))
    except MetadataError:
        return
    vg_to_text(vg, "again", "h")  # what reads also writes


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=1536), st.integers(0, 8191 - 1536))
def test_any_bytes_in_a_metadata_area_give_a_vg_or_an_error(junk: bytes, at: int) -> None:
    """A device with a sound label and header, and random bytes over its metadata area
    (the header included): read_pv reports each copy as a VG or an error."""
    dev = MemDevice(2 * MIB)
    loc = MdaLocation(4096, 8192)
    label = PvLabel("b" * 32, dev.size, MIB, [loc])
    write_label(dev, label)
    init_mdas(dev, label)
    write_md([PvDisk(dev, label)], SAMPLE)
    dev.write(4096 + at, junk)
    disk = read_pv(dev)
    assert disk is not None
    copy = disk.copies[0]
    assert (copy.vg is not None) != bool(copy.error) or (copy.vg is None and not copy.text)


def test_the_exception_store_is_dm_snapshots() -> None:
    chunk = 8  # 4 KiB: 256 exceptions per area
    assert cowstore.per_area(chunk) == 256
    assert [cowstore.area_chunk(chunk, a) for a in range(3)] == [1, 258, 515]
    size = 600 * 4096
    dev = MemDevice(size)
    cowstore.init_store(dev.write, chunk)
    head = dev.read(0, 16)
    assert head == bytes.fromhex("536e4170" "01000000" "01000000" "08000000")  # SnAp 1 1 8
    store = cowstore.read_store(dev.read, size)
    assert store is not None and store.valid and store.next_free == 2
    for old in range(300):
        assert cowstore.add_exception(store, dev.read, dev.write, size, old * 3,
                                      bytes([old % 256]) * 4096)
    again = cowstore.read_store(dev.read, size)
    assert again is not None and again.exceptions == store.exceptions
    assert 258 not in again.exceptions.values()  # area 1's chunk is never data
    assert again.next_free == store.next_free == 2 + 300 + 1
    assert dev.read(again.exceptions[3 * 7] * 4096, 4096) == bytes([7]) * 4096
    # a full store is invalidated, as the kernel does
    while cowstore.add_exception(store, dev.read, dev.write, size, 10**6, bytes(4096)):
        pass
    assert cowstore.read_store(dev.read, size).valid is False  # type: ignore[union-attr]
    assert cowstore.read_store(MemDevice(8192).read, 8192) is None  # never initialised
    with pytest.raises(MetadataError, match="bad magic"):
        cowstore.read_store(lambda o, n: b"\x01" * n, 8192)
    assert cowstore.max_cow_sectors(64 * 2048, 8) == (1 + 64 + 16384) * 8


def test_names_and_sizes_as_lvm_takes_them() -> None:
    for good in ("lvsysteme", "vg.0+a_b-c", "x" * 127):
        assert names.check_lv_name(good) == good
    for bad, why in (("snapshot0", "reserved"), ("pvmove", "reserved"), ("a_mlog", "reserved"),
                     ("-a", 'start with "-"'), ("..", "invalid"), ("a b", "invalid char"),
                     ("x" * 128, "too long"), ("", "empty")):
        with pytest.raises(VolumeNameError, match=why):
            names.check_lv_name(bad)
    assert names.parse_size("64").value == 64 * MIB
    assert names.parse_size("1.5g") == names.Amount("", 3 * 512 * MIB)
    assert names.parse_size("+32M").sign == "+" and names.parse_size("512b").value == 512
    assert names.parse_extents("100%FREE") == names.Amount("", 100, True, "FREE")
    assert names.split_vg_lv("/dev/mapper/vg--a-lv--b") == ("vg-a", "lv-b")
    assert names.split_vg_lv("/dev/vg/lv") == ("vg", "lv")
    for bad in ("1x", "-", "0", "%5"):
        with pytest.raises(VolumeNameError):
            names.parse_size(bad)


def test_sizes_print_as_lvm2_prints_them() -> None:
    assert [human(n) for n in (0, 8 * MIB, 60 * MIB, 1044480, 1536 * MIB, 2043 * MIB)] == [
        "0 ", "8.00m", "60.00m", "1020.00k", "1.50g", "<2.00g"]
    assert human(8 * MIB, "b") == "8388608B" and human(8 * MIB, "m", suffix=False) == "8.00"
    assert human_long(8 * MIB) == "8.00 MiB"
    fields = resolve("vg", [])
    row = {"vg_name": "vg1", "pv_count": 1, "lv_count": 1, "snap_count": 0,
           "vg_attr": "wz--n-", "vg_size": 60 * MIB, "vg_free": 52 * MIB}
    assert table("vg", fields, [row]) == (  # byte for byte what lvm2 printed
        "  VG  #PV #LV #SN Attr   VSize  VFree \n  vg1   1   1   0 wz--n- 60.00m 52.00m")
    assert resolve("lv", ["+seg_pe_ranges", "-origin"])[-1] == "seg_pe_ranges"
    assert resolve("lv", ["name,size"]) == ["lv_name", "lv_size"]
