"""Copy-on-write in the engine: snapshots in dm-snapshot's persistent layout.

An origin LV over two LUNs (its segments cross them), its snapshots' exception
stores on the LUNs, served by the engine (sanitizer build) as a real volume would
be: the devices and stores named in the backend's sync. Checked against the
Python reference of the format (storage/lvm/cowstore.py reads each store from the
LUNs, the way a kernel with device-mapper would): the snapshot reads as the frozen
image while the origin is rewritten; what the store holds is exactly the old data
of the chunks written since; writes to a snapshot land in its store only; a full
store is invalidated (header valid=0, its I/O fails) and the origin is unharmed;
several snapshots of one origin each keep their own instant.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from sanvisor.storage import engineproto as E
from sanvisor.storage import nbdproto as P
from sanvisor.storage.lvm import cowstore
from sanvisor.storage.lvm.blockdev import BlockDevice, NbdDevice
from sanvisor.storage.lvm.segments import LvIo, Seg
from sanvisor.storage.nbdclient import NbdClient
from tests.storage.enginekit import engine_bench
from tests.storage.harness import DEADLINE, Host

MIB = 1 << 20
CHUNK = 4096


@dataclass
class Vol:
    """An origin of 8 MiB: 6 MiB on LUN a at 1 MiB, 2 MiB on LUN b at 1 MiB; snapshot
    stores further on b."""

    host: Host
    a: str = ""
    b: str = ""
    stores: list[E.StoreSpec] = field(default_factory=list)
    devices: list[E.DeviceSpec] = field(default_factory=list)
    devs: dict[str, BlockDevice] = field(default_factory=dict)

    def __post_init__(self) -> None:
        maps = sorted(self.host.mpd.maps.values(), key=lambda m: m.dm)
        self.a, self.b = maps[0].wwid, maps[1].wwid
        self.reopen()
        self.origin = (E.Segment(0, 6 * MIB, self.a, MIB), E.Segment(6 * MIB, 2 * MIB, self.b, MIB))

    def reopen(self) -> None:
        """The LUNs opened (again: after an engine restart) for the reference reader."""
        for d in self.devs.values():
            d.close()
        for m in self.host.mpd.maps.values():
            self.devs[m.wwid] = NbdDevice(str(self.host.home / "mapper" / f"{m.name}.sock"),
                                          m.name, export=m.name)

    def cow(self, index: int, size: int) -> tuple[E.Segment, ...]:
        return (E.Segment(0, size, self.b, (4 + 4 * index) * MIB),)

    def io(self, segs: tuple[E.Segment, ...]) -> LvIo:
        return LvIo(tuple(Seg(s.start, s.length, s.map_id, s.map_offset) for s in segs),
                    self.devs)

    def sync(self) -> None:
        backend = self.host.mpd.backend
        backend.volume_specs = lambda: (list(self.stores), list(self.devices))
        self.host.call(backend.sync)

    def serve(self, snaps: dict[str, int], init: bool = True) -> None:
        """The origin ``vg-lv`` and a snapshot ``vg-NAME`` per store of ``snaps`` (its
        COW size in bytes), stores initialised as lvcreate -s does (or left zeroed)."""
        known = {s.ident for s in self.stores}
        self.stores, cows = [], []
        for i, (name, size) in enumerate(snaps.items()):
            cow = self.cow(i, size)
            if init and f"vg/{name}" not in known:
                io = self.io(cow)
                io.write(0, bytes(2 * CHUNK))
                cowstore.init_store(io.write, CHUNK // 512)
                io.flush()
            self.stores.append(E.StoreSpec(f"vg/{name}", size, CHUNK, cow, self.origin))
            cows.append(f"vg/{name}")
        self.devices = [E.DeviceSpec("vg-lv", 8 * MIB, self.origin, tuple(cows))]
        self.devices += [E.DeviceSpec(f"vg-{n}", 8 * MIB, self.origin, snap=f"vg/{n}")
                         for n in snaps]
        self.sync()
        self.host.until("the stores loaded", lambda: all(
            s["state"] != "loading" for s in self.stats()["stores"]))

    def stats(self) -> dict:  # type: ignore[type-arg]
        reply = self.host.engine.query(E.line("stats"))
        assert reply is not None
        return reply.data

    def store(self, name: str) -> dict:  # type: ignore[type-arg]
        return next(s for s in self.stats()["stores"] if s["id"] == f"vg/{name}")

    def client(self, name: str) -> NbdClient:
        c = NbdClient(str(self.host.home / "mapper" / f"{name}.sock"), timeout=DEADLINE)
        c.go(name)
        self.host.guests.append(c)
        return c

    def snapshotted(self, seed: int) -> bytes:
        """The origin filled with a pattern of its own, then a 4 MiB snapshot of it
        taken: the pattern (the snapshot's frozen image)."""
        self.serve({})
        before = _pattern(seed, 8 * MIB)
        self.client("vg-lv").pwrite(before, 0)
        self.serve({"snap": 4 * MIB})
        return before

    def on_disk(self, index: int, size: int) -> cowstore.Store | None:
        io = self.io(self.cow(index, size))
        return cowstore.read_store(io.read, io.size)


@pytest.fixture
def vol(monkeypatch: pytest.MonkeyPatch) -> Iterator[Vol]:
    with engine_bench(monkeypatch, luns=(("a", "16M"), ("b", "16M"))) as (_arr, host):
        v = Vol(host)
        try:
            yield v
        finally:
            for d in v.devs.values():
                d.close()


def _pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_a_snapshot_reads_as_the_frozen_image(vol: Vol) -> None:
    vol.serve({})
    origin = vol.client("vg-lv")
    before = _pattern(1, 8 * MIB)
    origin.pwrite(before, 0)
    vol.serve({"snap": 2 * MIB})
    origin = vol.client("vg-lv")
    snap = vol.client("vg-snap")
    kinds = {d["name"]: d["kind"] for d in vol.stats()["devices"]}
    assert kinds["vg-lv"] == "origin" and kinds["vg-snap"] == "snapshot"
    now = bytearray(before)
    rng = random.Random(7)
    writes = [(6 * MIB - 6000, 12000),  # across the LUNs, partial chunks at both ends
              (0, 100), (4096 * 10 + 17, 5), (MIB, 3 * CHUNK), (8 * MIB - 4096, 4096)]
    writes += [(rng.randrange(0, 8 * MIB - 70000), rng.randrange(1, 70000)) for _ in range(30)]
    for off, n in writes:
        data = rng.randbytes(n)
        origin.pwrite(data, off)
        now[off:off + n] = data
    origin.flush()
    assert origin.pread(8 * MIB, 0) == bytes(now)
    assert snap.pread(8 * MIB, 0) == before  # the frozen image
    for off in range(0, 8 * MIB, MIB):  # and in pieces (store and origin mixed)
        assert snap.pread(MIB, off) == before[off:off + MIB]
    chunks = {c for off, n in writes for c in range(off // CHUNK, (off + n - 1) // CHUNK + 1)}
    st = vol.on_disk(0, 2 * MIB)  # the reference reader: dm-snap-persistent's layout
    assert st is not None and st.valid and set(st.exceptions) == chunks
    cow = vol.io(vol.cow(0, 2 * MIB))
    for old, new in st.exceptions.items():
        assert cow.read(new * CHUNK, CHUNK) == before[old * CHUNK:(old + 1) * CHUNK]
    assert vol.store("snap")["exceptions"] == len(chunks)
    # rewriting the same chunks copies nothing more
    origin.pwrite(b"z" * 4096, MIB)
    assert vol.store("snap")["copies"] == len(chunks)


def test_writes_to_a_snapshot_stay_in_its_store(vol: Vol) -> None:
    vol.serve({})
    origin = vol.client("vg-lv")
    before = _pattern(2, 8 * MIB)
    origin.pwrite(before, 0)
    vol.serve({"snap": 2 * MIB}, init=False)  # a zeroed store: the engine makes it new
    snap, origin = vol.client("vg-snap"), vol.client("vg-lv")
    snap.pwrite(b"S" * 10000, 6 * MIB - 5000)
    assert snap.pread(10000, 6 * MIB - 5000) == b"S" * 10000
    assert snap.pread(4096, 6 * MIB - 8192)[:3192] == before[6 * MIB - 8192:6 * MIB - 5000]
    assert origin.pread(8 * MIB, 0) == before
    origin.pwrite(b"O" * 4096, 6 * MIB - 4096)  # a chunk the snapshot already holds
    assert snap.pread(10000, 6 * MIB - 5000) == b"S" * 10000
    st = vol.on_disk(0, 2 * MIB)
    assert st is not None and sorted(st.exceptions) == list(range((6 * MIB - 5000) // CHUNK,
                                                                   (6 * MIB + 5000) // CHUNK + 1))


def test_a_full_snapshot_is_invalidated_and_the_origin_unharmed(vol: Vol) -> None:
    vol.serve({})
    origin = vol.client("vg-lv")
    before = _pattern(3, 8 * MIB)
    origin.pwrite(before, 0)
    size = 64 * 1024  # header, area 0, 14 data chunks
    vol.serve({"small": size})
    origin, snap = vol.client("vg-lv"), vol.client("vg-small")
    assert snap.pread(CHUNK, 0) == before[:CHUNK]
    after = _pattern(4, MIB)
    origin.pwrite(after, 0)  # 256 chunks: the store fills on the 15th
    assert origin.pread(MIB, 0) == after
    assert origin.pread(7 * MIB, MIB) == before[MIB:]
    assert vol.store("small")["state"] == "invalid"
    assert snap.request(P.CMD_READ, 0, CHUNK)[0] == P.EIO
    assert snap.request(P.CMD_WRITE, 0, CHUNK, b"x" * CHUNK)[0] == P.EIO
    st = vol.on_disk(0, size)
    assert st is not None and not st.valid  # as dm-snapshot leaves it: lvs shows it I
    origin.pwrite(b"still" * 100, 5 * MIB)
    assert origin.pread(500, 5 * MIB) == b"still" * 100


def test_several_snapshots_each_keep_their_instant(vol: Vol) -> None:
    vol.serve({})
    origin = vol.client("vg-lv")
    v0 = _pattern(5, 8 * MIB)
    origin.pwrite(v0, 0)
    vol.serve({"s1": 3 * MIB})
    origin = vol.client("vg-lv")
    v1 = bytearray(v0)
    v1[MIB:2 * MIB] = _pattern(6, MIB)
    origin.pwrite(bytes(v1[MIB:2 * MIB]), MIB)
    vol.serve({"s1": 3 * MIB, "s2": 3 * MIB})
    origin = vol.client("vg-lv")
    v2 = bytearray(v1)
    v2[MIB + 4096:3 * MIB] = _pattern(8, 2 * MIB - 4096)
    origin.pwrite(bytes(v2[MIB + 4096:3 * MIB]), MIB + 4096)
    s1, s2 = vol.client("vg-s1"), vol.client("vg-s2")
    assert origin.pread(8 * MIB, 0) == bytes(v2)
    assert s1.pread(8 * MIB, 0) == v0
    assert s2.pread(8 * MIB, 0) == bytes(v1)
    one, two = vol.on_disk(0, 3 * MIB), vol.on_disk(1, 3 * MIB)
    assert one is not None and two is not None
    assert set(one.exceptions) == set(range(MIB // CHUNK, 3 * MIB // CHUNK))
    assert set(two.exceptions) == set(range((MIB + 4096) // CHUNK, 3 * MIB // CHUNK))


def test_concurrent_writes_to_one_chunk_copy_it_once(vol: Vol) -> None:
    """Writes in flight together on the same chunks, and snapshot reads beside them:
    each chunk is copied once, before any of them overwrites it."""
    before = vol.snapshotted(9)
    origin, snap = vol.client("vg-lv"), vol.client("vg-snap")
    rng = random.Random(11)
    cookies = []
    for i in range(64):
        off = rng.randrange(0, 64) * 2048
        data = bytes([i]) * 6000
        cookies.append(origin.send(P.CMD_WRITE, off, len(data), data))
        snap.send(P.CMD_READ, off, 6000)
    got = {}
    for _ in cookies:
        cookie, err, _ = origin.receive()
        got[cookie] = err
    assert set(got.values()) == {0}
    for _ in cookies:
        _cookie, err, data = snap.receive()
        assert err == 0
    # requests in flight together may complete in any order; each chunk's old data
    # is what the snapshot shows, whatever their order
    assert snap.pread(MIB, 0) == before[:MIB]
    st = vol.on_disk(0, 4 * MIB)
    assert st is not None
    assert len(st.exceptions) == len(set(st.exceptions.values()))  # one copy per chunk


def test_a_first_write_copies_its_chunks_in_one_read_one_write_one_commit(vol: Vol) -> None:
    """The chunks a write needs copied are read together, written together into the
    store and named in one commit (copy.c), not chunk by chunk."""
    before = vol.snapshotted(12)
    origin, snap = vol.client("vg-lv"), vol.client("vg-snap")
    new = _pattern(13, MIB)
    origin.pwrite(new, MIB)  # 256 chunks of 4 KiB, none copied yet
    st = vol.store("snap")
    assert (st["copies"], st["copy_reads"], st["copy_writes"], st["commits"]) == (256, 1, 1, 1)
    # 16 adjacent 64 KiB writes in flight together (how they share reads, writes and
    # commits depends on when they arrive): each chunk copied once, before its write
    batch = _pattern(14, MIB)
    cookies = [origin.send(P.CMD_WRITE, 3 * MIB + i * 65536, 65536,
                           batch[i * 65536:(i + 1) * 65536]) for i in range(16)]
    assert {origin.receive()[1] for _ in cookies} == {0}
    after = vol.store("snap")
    assert after["copies"] == 512 and after["copy_writes"] <= after["copy_reads"] <= 17
    assert origin.pread(MIB, MIB) == new and origin.pread(MIB, 3 * MIB) == batch
    assert snap.pread(8 * MIB, 0) == before
    disk = vol.on_disk(0, 4 * MIB)
    assert disk is not None and disk.valid and len(disk.exceptions) == 512
    cow = vol.io(vol.cow(0, 4 * MIB))
    for old, n in disk.exceptions.items():
        assert cow.read(n * CHUNK, CHUNK) == before[old * CHUNK:(old + 1) * CHUNK]
