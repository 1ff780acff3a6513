"""Fuzzing the engine's NBD server over real sockets (hypothesis), against its
sanitizer build with the real array behind it.

- any request stream after a valid handshake gets exactly one well-formed reply
  per request, with the error a model of the spec predicts (0 for a valid one,
  and a read's data), or the connection closed at the first request the spec
  lets a server refuse that way; the chunking of the stream does not matter;
- any bytes, before or after the handshake, cost that connection only: the
  engine lives (no sanitizer report), another client's I/O goes on, no path fails.

Inputs that crashed or hung earlier versions of the engine are kept as explicit
examples (the regression corpus). Runs are derandomized (repeatable); set
SANVISOR_FUZZ=explore for a random, longer search.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sanvisor.storage import nbdproto as P
from tests.storage.enginekit import check_alive, closed, engine_bench, raw, recv_exactly
from tests.storage.harness import Host

EXPLORE = os.environ.get("SANVISOR_FUZZ") == "explore"
FUZZ = settings(max_examples=1500 if EXPLORE else 150, derandomize=not EXPLORE,
                database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
SIZE = 64 << 20  # the harness's LUN
U64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    with pytest.MonkeyPatch.context() as mp, engine_bench(mp) as (_arr, h):
        yield h


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
    return 0


REQUEST = st.tuples(
    st.sampled_from([P.CMD_READ, P.CMD_WRITE, P.CMD_FLUSH, P.CMD_TRIM, P.CMD_WRITE_ZEROES,
                     P.CMD_CACHE, P.CMD_DISC, 7, 0x7FFF, 0xFFFF]),
    st.sampled_from([0, P.CMD_FLAG_FUA, P.CMD_FLAG_NO_HOLE, 1 << 7, 0xFFFF]),
    st.one_of(st.integers(0, SIZE), st.sampled_from([SIZE - 1, SIZE - 4096, 1 << 63, U64,
                                                     U64 - 4095])),
    st.one_of(st.integers(0, 70000), st.sampled_from([P.MAX_REQUEST, P.MAX_REQUEST + 1,
                                                      SIZE, (1 << 32) - 1])))


def _stream(reqs: list[tuple[int, int, int, int]]
            ) -> tuple[bytes, dict[int, tuple[int, int]], bool]:
    """The bytes, the expected (error, read length) per cookie, whether it closes."""
    out = bytearray()
    want: dict[int, tuple[int, int]] = {}
    for cookie, (cmd, flags, offset, length) in enumerate(reqs, 1):
        out += P.REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        if cmd == P.CMD_DISC:
            return bytes(out), want, True
        err = expected(cmd, flags, offset, length)
        if err is None:
            return bytes(out), want, True
        if cmd == P.CMD_WRITE:
            out += bytes([cookie & 0xFF]) * length
        want[cookie] = (err, length if cmd == P.CMD_READ and not err else 0)
    return bytes(out), want, False


def _good(host: Host) -> None:
    s = raw(host)
    try:
        s.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 77, 0, 512))
        magic, err, cookie = P.SIMPLE_REPLY.unpack(recv_exactly(s, 16))
        assert (magic, err, cookie) == (P.SIMPLE_REPLY_MAGIC, 0, 77)
        recv_exactly(s, 512)
    finally:
        s.close()


@FUZZ
@given(st.lists(REQUEST, max_size=10), st.lists(st.integers(0, 1 << 17), max_size=4))
@example([(P.CMD_READ, 0, U64, 4096)], [])  # offset + length overflows u64
@example([(P.CMD_WRITE, 0, U64 - 4095, 8192)], [])  # a write whose end wraps to 4096
@example([(P.CMD_WRITE, 0, 0, P.MAX_REQUEST + 1)], [])  # closed, never buffered
@example([(P.CMD_READ, 0, 0, P.MAX_REQUEST + 1), (P.CMD_CACHE, 0, 0, 1)], [])
@example([(P.CMD_READ, 0, 0, 0), (P.CMD_WRITE, 0, 0, 0), (P.CMD_FLUSH, 1, 5, 9)], [])
@example([(P.CMD_WRITE, 0, 0, 70000)] * 3, [1, 28, 29, 70028])  # payloads split anywhere
# found by this test: a violation closed the connection before the replies of the
# requests sent before it were written (they are answered first now)
@example([(P.CMD_FLUSH, 0, 469539, 82), (0xFFFF, 0, 0, 0),
          (P.CMD_WRITE, 1 << 7, 1 << 63, P.MAX_REQUEST + 1)], [32876, 42083, 25876])
def test_any_request_stream_gets_the_model_replies(host: Host, reqs: list[tuple[int, ...]],
                                                   cuts: list[int]) -> None:
    stream, want, closes = _stream(reqs)  # type: ignore[arg-type]
    s = raw(host)
    try:
        points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
        for a, b in itertools.pairwise(points):
            s.sendall(stream[a:b])
            time.sleep(0.0005)
        got: dict[int, int] = {}
        while len(got) < len(want):
            magic, err, cookie = P.SIMPLE_REPLY.unpack(recv_exactly(s, 16))
            assert magic == P.SIMPLE_REPLY_MAGIC and cookie in want and cookie not in got
            got[cookie] = err
            recv_exactly(s, want[cookie][1] if not err else 0)
        assert got == {c: e for c, (e, _n) in want.items()}
        if closes:
            assert closed(s), "the connection stays open"
    finally:
        s.close()


@FUZZ
@given(st.binary(max_size=400), st.booleans())
@example(b"\0\0\0\3" + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 6) + b"\xff\xff\xff\xfa\0\0",
         False)  # a name length that runs past the option
@example(b"\0\0\0\3" + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_INFO, 6) + b"\0\0\0\0\xff\xff",
         False)  # an info count that runs past the option
@example(b"\0\0\0\1" + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, 0), False)
@example(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, 1, 0, 0) + b"\xff" * 100, True)
def test_any_bytes_cost_only_their_connection(host: Host, data: bytes, after_go: bool
                                              ) -> None:
    s = raw(host, go=after_go)
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        closed(s, 10)
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        s.close()
    _good(host)


def test_the_engine_lived_through_the_fuzzing(host: Host) -> None:
    check_alive(host)
    paths = host.view()["paths"]
    assert all(p["failures"] == 0 and p["state"] == "ready" for p in paths), paths
    assert struct.calcsize(">I") == 4
