"""Property-based fuzzing of the NBD state machines of the data path (hypothesis).

- the map's front (what QEMU talks to): any bytes, in any chunks, never raise out
  of it; a valid handshake followed by arbitrary requests gets exactly one
  well-formed reply per request (the error a model of the spec predicts), or a
  closed connection at the first request the spec lets it refuse that way; the
  result does not depend on how the bytes were chunked;
- a path's reply parser (ArrayLink): any chunking of a valid reply stream, in any
  reply order, gives the same replies; garbage fails the path, never raises;
- the array daemon, over real sockets: garbage in the handshake or in
  transmission costs that connection only.

The inputs that crashed earlier versions are kept as explicit examples (the
regression corpus). Runs are derandomized (repeatable); set
SANVISOR_FUZZ=explore for a random, longer search.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sanvisor.storage import nbdproto as P
from sanvisor.storage.mpconf import Settings
from sanvisor.storage.mpfront import Front
from sanvisor.storage.mpmap import Map
from sanvisor.storage.paths import ArrayLink, PathStats, Request
from tests.storage.harness import ArrayProc, Host, bench, hba_address, make_array

EXPLORE = os.environ.get("SANVISOR_FUZZ") == "explore"
FUZZ = settings(max_examples=2000 if EXPLORE else 300, derandomize=not EXPLORE,
                database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SIZE = 1 << 20  # the fuzzed map's size


# ---- the front --------------------------------------------------------------------
class Wire(asyncio.Transport):
    """The socket the front writes to: every write kept, close/abort recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        self.out.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def run_front(chunks: list[bytes]) -> tuple[bytes, bool]:
    """Feed a front (its map has no path and fails requests at once: EIO)."""
    mp = Map("fuzz", "3600", 0, "HITACHI", "DF600F", SIZE, Settings(no_path_retry="fail"))
    front = Front(mp)
    wire = Wire()
    front.connection_made(wire)
    for chunk in chunks:
        if wire.closed:
            break
        front.data_received(chunk)
    return b"".join(wire.out), wire.closed


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a] or [b""]


HELLO = struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
GO = P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_GO, len(P.go_request("fuzz"))) + \
    P.go_request("fuzz")

CORPUS_RAW = [  # inputs that crashed or hung earlier versions of the front
    HELLO + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 2) + b"\0\0",  # short GO
    HELLO + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 6) + b"\xff\xff\xff\xff\0\0",
    HELLO + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, 2) + b"\xff\xfe",
    HELLO + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_ABORT, 0) + GO,  # options after ABORT
    b"\xff\xff\xff\xff" + GO,  # unknown client flags
]


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(0, 600), max_size=8))
@example(CORPUS_RAW[0], [])
@example(CORPUS_RAW[1], [])
@example(CORPUS_RAW[2], [])
@example(CORPUS_RAW[3], [])
@example(CORPUS_RAW[4], [])
def test_front_survives_any_bytes(data: bytes, cuts: list[int]) -> None:
    whole = run_front([data])
    assert run_front(split(data, cuts)) == whole  # chunking does not matter


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6))
def test_front_survives_any_bytes_after_a_valid_handshake(data: bytes,
                                                          cuts: list[int]) -> None:
    stream = HELLO + GO + data
    whole = run_front([stream])
    assert run_front(split(stream, cuts)) == whole


OPTION = st.tuples(
    st.one_of(st.sampled_from([P.OPT_EXPORT_NAME, P.OPT_ABORT, P.OPT_LIST, P.OPT_STARTTLS,
                               P.OPT_INFO, P.OPT_GO, P.OPT_STRUCTURED_REPLY, P.OPT_X_FENCE]),
              st.integers(0, (1 << 32) - 1)),
    st.one_of(st.binary(max_size=40), st.sampled_from([P.go_request("fuzz"), P.go_request(""),
                                                       P.go_request("fuzz", (3, 0x5356)),
                                                       b"\0\0\0\x04fuz"])))


@FUZZ
@given(st.lists(OPTION, max_size=8), st.lists(st.integers(0, 2000), max_size=6))
def test_front_option_haggling(opts: list[tuple[int, bytes]], cuts: list[int]) -> None:
    """Any options: each gets its replies (the last one ACK or an error), until one
    enters transmission or ends the session; chunking does not matter."""
    stream = HELLO + b"".join(P.OPT_HEADER.pack(P.IHAVEOPT, o, len(d)) + d for o, d in opts)
    out, closed = run_front(split(stream, cuts))
    assert (out, closed) == run_front([stream])
    pos, answered = 18, 0
    while pos + 20 <= len(out) and struct.unpack_from(">Q", out, pos)[0] == P.REPLY_MAGIC:
        _m, opt, rtype, length = P.OPT_REPLY.unpack_from(out, pos)
        pos += 20 + length
        if rtype == P.REP_ACK or rtype & (1 << 31):
            assert opt == opts[answered][0]
            answered += 1
    assert answered <= len(opts)
    if answered < len(opts) and not closed:  # stopped answering: it went to transmission
        assert opts[answered][0] in (P.OPT_EXPORT_NAME, P.OPT_GO) or \
            opts[answered - 1][0] == P.OPT_GO


REQUEST = st.tuples(
    st.sampled_from([P.CMD_READ, P.CMD_WRITE, P.CMD_FLUSH, P.CMD_TRIM, P.CMD_WRITE_ZEROES,
                     P.CMD_CACHE, P.CMD_DISC, 7, 0x7FFF]),
    st.sampled_from([0, P.CMD_FLAG_FUA, P.CMD_FLAG_NO_HOLE, 1 << 7, 0xFFFF]),
    st.one_of(st.integers(0, SIZE), st.sampled_from([SIZE - 1, 1 << 63, (1 << 64) - 1])),
    st.one_of(st.integers(0, 8192), st.sampled_from([P.MAX_REQUEST, P.MAX_REQUEST + 1,
                                                      SIZE, (1 << 32) - 1])))


def expected(cmd: int, flags: int, offset: int, length: int) -> int | None:
    """The model: the reply's error, or None when the connection must close."""
    if cmd == P.CMD_WRITE and length > P.MAX_REQUEST:
        return None
    allowed = {P.CMD_READ: 1, P.CMD_WRITE: 1, P.CMD_FLUSH: 1, P.CMD_TRIM: 1,
               P.CMD_WRITE_ZEROES: 3}.get(cmd)
    if allowed is None or flags & ~allowed:
        return P.EINVAL
    if cmd == P.CMD_READ and length > P.MAX_REQUEST:
        return P.EINVAL
    if cmd != P.CMD_FLUSH and offset + length > SIZE:
        return P.ENOSPC if cmd in (P.CMD_WRITE, P.CMD_WRITE_ZEROES) else P.EINVAL
    return P.EIO  # a valid request: the fuzzed map has no path (no_path_retry fail)


@FUZZ
@given(st.lists(REQUEST, max_size=12), st.lists(st.integers(0, 1 << 16), max_size=6))
@example([(P.CMD_WRITE, 0, 0, P.MAX_REQUEST + 1)], [])  # hung, then killed every path
@example([(P.CMD_READ, 0, 0, P.MAX_REQUEST + 1)], [])  # sent to the array, which refused
@example([(P.CMD_READ, 0, (1 << 64) - 1, 4096)], [])  # offset + length overflows u64
@example([(P.CMD_CACHE, 0, 0, 4096), (7, 0, 0, 1)], [])  # not offered: reached the array
def test_front_answers_every_request_as_the_spec_says(
        reqs: list[tuple[int, int, int, int]], cuts: list[int]) -> None:
    stream = bytearray(HELLO + GO)
    want: list[tuple[int, int]] = []  # (cookie, error)
    closes = False
    for cookie, (cmd, flags, offset, length) in enumerate(reqs, 1):
        stream += P.REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        if cmd == P.CMD_DISC:
            closes = True
            break
        err = expected(cmd, flags, offset, length)
        if err is None:
            closes = True
            break
        if cmd == P.CMD_WRITE:
            stream += bytes(length)
        want.append((cookie, err))
    out, closed = run_front(split(bytes(stream), cuts))
    assert closed is closes
    pos = 18  # greeting
    while pos < len(out) and struct.unpack_from(">Q", out, pos)[0] == P.REPLY_MAGIC:
        pos += 20 + struct.unpack_from(">I", out, pos + 16)[0]  # option replies
    got = []
    while pos < len(out):
        magic, err, cookie = P.SIMPLE_REPLY.unpack_from(out, pos)
        assert magic == P.SIMPLE_REPLY_MAGIC
        got.append((cookie, err))
        pos += 16  # no data: the map fails every valid read
    assert got == want


# ---- a path's reply parser ----------------------------------------------------------
class StubPath:
    def __init__(self) -> None:
        self.inflight: dict[int, Request] = {}
        self.stats = PathStats()
        self.failed: list[str] = []
        self.link: Any = None

    def fail(self, why: str) -> None:
        self.failed.append(why)
        self.link = None


def parse_replies(reqs: list[tuple[int, int, int]], order: list[int],
                  chunks: list[bytes]) -> tuple[dict[int, tuple[int, bytes]], StubPath]:
    path = StubPath()
    got: dict[int, tuple[int, bytes]] = {}
    for cookie, (cmd, length, _err) in enumerate(reqs, 1):
        def reply(err: int, data: list[bytes], cookie: int = cookie) -> None:
            assert cookie not in got, f"request {cookie} answered twice"
            got[cookie] = (err, b"".join(data))
        path.inflight[cookie] = Request(reply=reply, cmd=cmd, flags=0, offset=0,
                                        length=length)
    link = ArrayLink(path)  # type: ignore[arg-type]
    path.link = link
    for chunk in chunks:
        link.data_received(chunk)
    return got, path


def reply_stream(reqs: list[tuple[int, int, int]], order: list[int]) -> bytes:
    out = bytearray()
    for i in order:
        cmd, length, err = reqs[i]
        out += P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, err, i + 1)
        if cmd == P.CMD_READ and not err:
            out += bytes((i + j) & 0xFF for j in range(length))
    return bytes(out)


REPLY = st.tuples(st.sampled_from([P.CMD_READ, P.CMD_WRITE, P.CMD_FLUSH]),
                  st.integers(0, 5000), st.sampled_from([0, 0, 0, P.EIO, P.ENOSPC]))


@FUZZ
@given(st.lists(REPLY, min_size=1, max_size=10).flatmap(
    lambda reqs: st.tuples(st.just(reqs), st.permutations(range(len(reqs))))),
    st.lists(st.integers(0, 60000), max_size=20))
def test_any_chunking_of_a_reply_stream_parses_the_same(
        reqs_order: tuple[list[tuple[int, int, int]], list[int]], cuts: list[int]) -> None:
    reqs, order = reqs_order
    stream = reply_stream(reqs, order)
    whole, path = parse_replies(reqs, order, [stream])
    assert not path.failed and not path.inflight
    for i, (cmd, length, err) in enumerate(reqs):
        data = bytes((i + j) & 0xFF for j in range(length)) if cmd == P.CMD_READ \
            and not err else b""
        assert whole[i + 1] == (err, data)
    got, path = parse_replies(reqs, order, split(stream, cuts))
    assert got == whole and not path.failed


@FUZZ
@given(st.lists(REPLY, min_size=1, max_size=6), st.integers(0, 200))
def test_a_reply_cut_short_leaves_its_request_in_flight(
        reqs: list[tuple[int, int, int]], cut: int) -> None:
    """A stream that stops anywhere: whatever did not arrive whole stays in flight (the
    map resends it when the path fails), nothing is answered with partial data."""
    stream = reply_stream(reqs, list(range(len(reqs))))
    cut = cut % len(stream)
    got, path = parse_replies(reqs, [], [stream[:cut]])
    assert set(got) | set(path.inflight) == set(range(1, len(reqs) + 1))
    assert not set(got) & set(path.inflight)
    for cookie, (err, data) in got.items():
        cmd, length, _ = reqs[cookie - 1]
        assert len(data) == (length if cmd == P.CMD_READ and not err else 0)


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6))
def test_garbage_from_the_array_fails_the_path_without_raising(
        data: bytes, cuts: list[int]) -> None:
    reqs = [(P.CMD_READ, 64, 0), (P.CMD_WRITE, 64, 0)]
    got, path = parse_replies(reqs, [], split(data, cuts))
    assert len(path.failed) <= 1
    assert not set(got) & set(path.inflight)


# ---- the array daemon, over sockets --------------------------------------------------
@pytest.fixture(scope="module")
def live_array() -> Iterator[ArrayProc]:
    root = Path(tempfile.mkdtemp(prefix="svfz", dir="/tmp"))
    arr = None
    try:
        arr = make_array(root)
        yield arr
    finally:
        if arr is not None:
            arr.stop()
        shutil.rmtree(root, ignore_errors=True)


def _blast(arr: ArrayProc, data: bytes, after_go: bool) -> None:
    with socket.create_connection(("127.0.0.1", arr.port), timeout=10,
                                  source_address=(hba_address(1, 0), 0)) as s:
        s.recv(18)
        if after_go:
            name = P.go_request(arr.lun("sys").wwid)
            s.sendall(HELLO + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_GO, len(name)) + name)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        try:
            while s.recv(1 << 16):
                pass
        except ConnectionResetError:
            pass


ARRAY_FUZZ = settings(FUZZ, max_examples=200 if EXPLORE else 40)


@ARRAY_FUZZ
@given(st.binary(max_size=200), st.booleans())
@example(HELLO + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 6) + b"\0\0\0\xff\0\0", False)
@example(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 1 << 31), True)
@example(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE_ZEROES, 1, 1 << 63, 1), True)
@example(HELLO + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_X_FENCE, 4) + b"\xff" * 4, False)
def test_the_array_survives_any_bytes(live_array: ArrayProc, data: bytes,
                                      after_go: bool) -> None:
    good = live_array.client(hba_address(1, 1))
    try:
        _blast(live_array, data, after_go)
        good.pwrite(b"g" * 512, 4096)
        assert good.pread(512, 4096) == b"g" * 512
    finally:
        good.close()


# ---- the map's front, over its socket, in front of the real array ---------------------
@pytest.fixture(scope="module")
def live_host() -> Iterator[Host]:
    with bench() as (_arr, host):
        yield host


@ARRAY_FUZZ
@given(st.binary(max_size=300), st.booleans())
@example(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, P.MAX_REQUEST + 1), True)
@example(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 1, 0, P.MAX_REQUEST + 1), True)
@example(P.REQUEST.pack(P.REQUEST_MAGIC, 0, 7, 1, 0, 512), True)
def test_the_front_survives_any_bytes(live_host: Host, data: bytes, after_go: bool) -> None:
    """Whatever a client sends /dev/mapper/NAME: its own connection at most is closed;
    another client's I/O goes on and no path fails."""
    sock = str(live_host.home / "mapper" / f"{live_host.map().name}.sock")
    good = live_host.guest()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(sock)
            s.recv(18)
            s.sendall((HELLO + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_GO,
                                                 len(P.go_request(""))) + P.go_request("")
                       if after_go else b"") + data)
            s.shutdown(socket.SHUT_WR)
            try:
                while s.recv(1 << 16):
                    pass
            except ConnectionResetError:
                pass
        good.pwrite(b"f" * 4096, 8192)
        assert good.pread(4096, 8192) == b"f" * 4096
    finally:
        good.close()
    paths = live_host.view()["paths"]
    assert all(p["failures"] == 0 and p["state"] == "ready" for p in paths), paths
