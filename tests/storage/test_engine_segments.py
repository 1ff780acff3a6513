"""Devices as lists of segments, and the control protocol that sets them.

A device is a list of segments, each a range mapped onto a map at an offset: a
multipath map is the one-segment case, an LV (the volumes issue) linear segments
over several maps. Tested: the splitting itself (the C unit test of seg.c), a
two-segment device over two LUNs whose requests cross the boundary (each half
lands on its LUN at its offset, flushes reach both, an HBA failure under it is
survived), and the control protocol's refusals (a bad line changes nothing).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanvisor.storage import engineproto as E
from sanvisor.storage import nbdproto as P
from sanvisor.storage.nbdclient import NbdClient
from tests.storage.enginekit import BUILD, ROOT, engine_bench
from tests.storage.harness import DEADLINE, Host

MIB = 1 << 20


def test_segment_splitting_unit() -> None:
    """engine/test_seg.c under ASan and UBSan: requests crossing boundaries are split
    there, in order, each span at its map offset; holes and overflows refused."""
    out = subprocess.run(["make", "-s", "-C", str(ROOT / "engine"), "check", f"OUT={BUILD}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed, 0 failed" in out.stdout


@pytest.fixture
def two_luns(monkeypatch: pytest.MonkeyPatch) -> Iterator[Host]:
    with engine_bench(monkeypatch, luns=(("a", "16M"), ("b", "16M"))) as (_arr, host):
        yield host


def _maps(host: Host) -> tuple[object, object]:
    maps = sorted(host.mpd.maps.values(), key=lambda m: m.dm)
    return maps[0], maps[1]


def _lv(host: Host, segs: list[E.Segment], size: int, name: str = "lv") -> socket.socket:
    """A device over the maps, as the volumes code will set one up."""
    path = host.home / "mapper" / f"{name}.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.listen(16)
    host.call(lambda: host.engine.request(E.device_line(name, size, segs, True),
                                          [sock.fileno()]))
    return sock


def _client(host: Host, name: str) -> NbdClient:
    c = NbdClient(str(host.home / "mapper" / f"{name}.sock"), timeout=DEADLINE)
    c.go(name)
    host.guests.append(c)
    return c


def test_a_device_of_two_segments_on_two_maps(two_luns: Host) -> None:
    host = two_luns
    a, b = _maps(host)
    # [0, 8M) is map A at 4M, [8M, 16M) map B at 0
    lsock = _lv(host, [E.Segment(0, 8 * MIB, a.wwid, 4 * MIB),  # type: ignore[attr-defined]
                       E.Segment(8 * MIB, 8 * MIB, b.wwid, 0)], 16 * MIB)  # type: ignore
    try:
        lv = _client(host, "lv")
        assert lv.size == 16 * MIB
        data = bytes(range(256)) * 32  # 8 KiB across the boundary
        lv.pwrite(data, 8 * MIB - 4096)
        assert lv.pread(8192, 8 * MIB - 4096) == data
        ma, mb = _client(host, a.name), _client(host, b.name)  # type: ignore[attr-defined]
        assert ma.pread(4096, 12 * MIB - 4096) == data[:4096]
        assert mb.pread(4096, 0) == data[4096:]
        big = bytes((i * 7) & 0xFF for i in range(3 * MIB))  # 3 MiB: 1 on A, 2 on B
        lv.pwrite(big, 7 * MIB)
        assert lv.pread(3 * MIB, 7 * MIB) == big
        assert mb.pread(2 * MIB, 0) == big[MIB:]
        assert ma.pread(MIB, 11 * MIB) == big[:MIB]
        lv.flush()  # a FLUSH goes to both maps
        before = {m["name"]: sum(p["requests"] for p in m["paths"])
                  for m in host.call(host.mpd.view)["maps"]}
        lv.flush()
        after = {m["name"]: sum(p["requests"] for p in m["paths"])
                 for m in host.call(host.mpd.view)["maps"]}
        assert all(after[n] == before[n] + 1 for n in before), (before, after)
        assert lv.request(P.CMD_READ, 16 * MIB - 4096, 8192)[0] == P.EINVAL  # past its end
        host.hba_down(0)  # a path of both maps dies under it
        host.until("HBA 0's paths faulty", lambda: not any(
            p.ready for m in host.mpd.maps.values() for p in m.paths if p.hba.index == 0))
        lv.pwrite(data[::-1], 8 * MIB - 4096)
        assert lv.pread(8192, 8 * MIB - 4096) == data[::-1]
        host.hba_up(0)
        view = host.call(host.mpd.view)
        assert all(m["io_errors"] == 0 for m in view["maps"])
        # a sync names only the maps' own devices: the LV goes (the volumes code will
        # name its devices in the sync)
        host.call(host.mpd.reload)
        stats = host.engine.query(E.line("stats")).data
        assert sorted(d["name"] for d in stats["devices"]) == sorted([a.name, b.name])  # type: ignore
    finally:
        lsock.close()


@pytest.mark.parametrize("line", [
    b"nonsense\n", b"\n", b"map\n", b"map id=x size=abc\n", b"map id=x no_path_retry=soon\n",
    b"map id=x polling_interval=-1\n", b"map id=x hold=99\n", b"path id=p map=nosuch\n",
    b"link id=nosuch up=1\n", b"map id=%zz\n", b"map id=%00\n", b"device name=d size=10\n",
    b"device name=d size=10 seg=0:5:0:x\n", b"device name=d size=10 seg=0:10:0\n",
    b"device name=d size=10 seg=0:10:18446744073709551615:x\n",
    b"device name=d size=10 seg=0:10:0:x fd=1\n", b"set handshake_timeout=nan\n",
    b"fail-path id=nosuch\n", b"map id=x " + b"k=v " * 400 + b"\n",
])
def test_the_control_protocol_refuses_bad_lines(monkeypatch: pytest.MonkeyPatch,
                                                line: bytes) -> None:
    with engine_bench(monkeypatch) as (_arr, host):
        before = host.engine.query(E.line("stats")).data
        reply = host.engine.query(line)
        assert reply is not None and reply.kind == "error", reply
        assert reply.message
        after = host.engine.query(E.line("stats")).data
        assert [m["id"] for m in after["maps"]] == [m["id"] for m in before["maps"]]
        assert [d["name"] for d in after["devices"]] == [d["name"] for d in before["devices"]]
        g = host.guest()
        g.pwrite(b"k" * 4096, 0)
        assert g.pread(4096, 0) == b"k" * 4096


def test_a_control_line_too_long_closes_only_that_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with engine_bench(monkeypatch) as (_arr, host):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(host.home / "engine" / "control.sock"))
        s.settimeout(10)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"x" * 70000)
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(100) == b""
        s.close()
        assert host.engine.query(E.line("hello")).data["version"] == 1
        assert Path(host.home / "engine" / "control.sock").exists()


def test_a_name_given_to_other_data_fails_its_open_clients(two_luns: Host) -> None:
    """The seed's trap inside one host: a device name given to another mapping (an
    alias moved to another WWID) never moves an open client to other data under its
    feet: its requests fail with EIO; a new client gets
    the new mapping. The same mapping grown keeps its clients."""
    host = two_luns
    a, b = _maps(host)
    ma, mb = _client(host, a.name), _client(host, b.name)  # type: ignore[attr-defined]
    ma.pwrite(b"A" * 4096, 0)
    mb.pwrite(b"B" * 4096, 0)
    s1 = _lv(host, [E.Segment(0, MIB, a.wwid, 0)], MIB, "alias")  # type: ignore[attr-defined]
    old = _client(host, "alias")
    assert old.pread(4096, 0) == b"A" * 4096
    grown = [E.Segment(0, 2 * MIB, a.wwid, 0)]  # type: ignore[attr-defined]
    host.call(lambda: host.engine.request(E.device_line("alias", 2 * MIB, grown, False)))
    assert old.pread(4096, 0) == b"A" * 4096  # the same data, grown: nothing changes
    s1.close()
    (host.home / "mapper" / "alias.sock").unlink()
    s2 = _lv(host, [E.Segment(0, MIB, b.wwid, 0)], MIB, "alias")  # type: ignore[attr-defined]
    try:
        assert old.request(P.CMD_READ, 0, 4096)[0] == P.EIO
        assert old.request(P.CMD_WRITE, 0, 4096, b"X" * 4096)[0] == P.EIO
        assert _client(host, "alias").pread(4096, 0) == b"B" * 4096
        assert ma.pread(4096, 0) == b"A" * 4096
    finally:
        s2.close()
