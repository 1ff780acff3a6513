"""Faults under copy-on-write: the engine killed (kill -9) while an origin with a
snapshot is written, and an HBA cut under an LV that spans two LUNs.

- Killed three times under a client that writes sequence-numbered blocks and
  resends what was not answered (as QEMU does): every acknowledged block is on the
  origin; the snapshot still reads as the image of its instant; the store, read by
  the Python reference of dm-snapshot's format, is valid, each exception holding the
  old data of its chunk (a copy whose area write was lost is simply not there: its
  write was not acknowledged, so it was resent and copied again).
- Killed three times under writes of 16 chunks each, 8 in flight: copies made of
  adjacent chunks, several in one store write, committed together (copy.c); a kill
  mid-batch loses only copies whose writes were not acknowledged.
- HBA 0 cut while the origin and the snapshot are written: both LUNs lose a path;
  nothing fails, the snapshot is intact.
"""

from __future__ import annotations

import random

import pytest

from sanvisor.storage import nbdproto as P
from tests.storage.enginekit import engine_bench
from tests.storage.harness import DEADLINE, Host
from tests.storage.test_engine_cow import CHUNK, MIB, Vol
from tests.storage.test_engine_restart import BS, EngineKiller, Resender, _block

assert BS == CHUNK


class DevResender(Resender):
    """The resending client of test_engine_restart, on an LV's device."""

    def __init__(self, host: Host, name: str) -> None:
        super().__init__(host)
        self.path = str(host.home / "mapper" / f"{name}.sock")
        self.name = name


@pytest.mark.parametrize(("span", "seed"), [(1, 5), (16, 6)], ids=["1-chunk", "16-chunk"])
def test_engine_killed_under_copy_on_write(monkeypatch: pytest.MonkeyPatch, span: int,
                                           seed: int) -> None:
    """Writes of ``span`` chunks, 8 in flight, resent when unanswered; 16 chunks make
    the engine copy adjacent chunks in one batch (copy.c), so a kill lands mid-batch."""
    with engine_bench(monkeypatch, sanitized=False, restarts=True,
                      luns=(("a", "16M"), ("b", "16M"))) as (_arr, host):
        vol = Vol(host)
        try:
            frozen = vol.snapshotted(16 + seed)
            c = DevResender(host, "vg-lv")
            c.connect()
            acked: dict[int, bytes] = {}
            busy: dict[int, tuple[int, int]] = {}  # cookie -> (first block, version)
            version = 0
            rng = random.Random(seed)
            killer = EngineKiller(host)
            killer.start()
            try:
                while not killer.done.is_set() or busy:
                    while len(busy) < 8 and not killer.done.is_set():
                        start = rng.randrange(0, 769 - span)  # 3 MiB: the store holds them
                        if any(abs(start - b) < span for b, _v in busy.values()):
                            continue  # two writes in flight on one block have no order
                        version += 1
                        data = b"".join(_block(start + i, version) for i in range(span))
                        busy[c.send(P.CMD_WRITE, start * BS, data)] = (start, version)
                    cookie, err, _ = c.receive()
                    assert err == 0, f"a write failed: {err}"
                    start, v = busy.pop(cookie)
                    for i in range(span):
                        acked[start + i] = _block(start + i, v)
            finally:
                killer.join(DEADLINE * 4)
            assert killer.kills == 3 and c.reconnects >= 1
            _every_ack_kept(host, vol, acked, frozen)
        finally:
            for d in vol.devs.values():
                d.close()


def _every_ack_kept(host: Host, vol: Vol, acked: dict[int, bytes], frozen: bytes) -> None:
    """After the kills: every acknowledged block on the origin, the snapshot still its
    instant, and the store on disk valid, naming only acknowledged blocks, each copy
    holding the pre-write data in a chunk of its own."""
    host.until("the store loaded again", lambda: all(
        s["state"] == "ready" for s in vol.stats()["stores"]))
    origin, snap = vol.client("vg-lv"), vol.client("vg-snap")
    now = origin.pread(8 * MIB, 0)
    for block, data in acked.items():
        assert now[block * BS:(block + 1) * BS] == data, f"block {block} lost"
    assert snap.pread(8 * MIB, 0) == frozen
    vol.reopen()
    st = vol.on_disk(0, 4 * MIB)
    assert st is not None and st.valid
    assert set(st.exceptions) <= set(acked)
    cow = vol.io(vol.cow(0, 4 * MIB))
    for old, new in st.exceptions.items():
        assert cow.read(new * BS, BS) == frozen[old * BS:(old + 1) * BS]
    assert len(set(st.exceptions.values())) == len(st.exceptions)


def test_an_hba_cut_under_a_snapshotted_lv_on_two_luns(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    with engine_bench(monkeypatch, luns=(("a", "16M"), ("b", "16M"))) as (_arr, host):
        vol = Vol(host)
        try:
            frozen = vol.snapshotted(31)
            origin, snap = vol.client("vg-lv"), vol.client("vg-snap")
            now = bytearray(frozen)
            rng = random.Random(3)
            for i in range(120):
                if i == 40:
                    host.hba_down(0)
                    host.until("HBA 0's paths faulty", lambda: not any(
                        p.ready for m in host.mpd.maps.values() for p in m.paths
                        if p.hba.index == 0))
                if i == 90:
                    host.hba_up(0)
                off = rng.randrange(0, 8 * MIB - 20000)
                data = rng.randbytes(rng.randrange(1, 20000))
                origin.pwrite(data, off)
                now[off:off + len(data)] = data
                snap.pwrite(b"s" * 512, 6 * MIB + i * 512)  # snapshot writes too
            assert origin.pread(8 * MIB, 0) == bytes(now)
            got = snap.pread(8 * MIB, 0)
            assert got[6 * MIB:6 * MIB + 120 * 512] == b"s" * (120 * 512)
            assert got[:6 * MIB] == frozen[:6 * MIB]
            assert got[6 * MIB + 120 * 512:] == frozen[6 * MIB + 120 * 512:]
            view = host.call(host.mpd.view)
            assert all(m["io_errors"] == 0 for m in view["maps"])
        finally:
            for d in vol.devs.values():
                d.close()
