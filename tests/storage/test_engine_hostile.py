"""Hostile NBD from QEMU's side, against the engine (its sanitizer build).

Every case gets the error the NBD spec prescribes or its own connection closed;
never a crash of the engine (a sanitizer report or a restart fails the test),
never a failed path, never harm to another client's I/O.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator

import pytest

from sanvisor.storage import engineproto as E
from sanvisor.storage import nbdproto as P
from tests.storage.enginekit import (
    check_alive,
    closed,
    engine_bench,
    raw,
    recv_exactly,
    reply,
    request,
    rss_kib,
)
from tests.storage.harness import Host

MIB = 1 << 20
U64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def host() -> Iterator[Host]:
    with pytest.MonkeyPatch.context() as mp, engine_bench(mp) as (_arr, h):
        yield h


def good_io(host: Host, offset: int = 8192) -> None:
    """Another client's I/O works, and no path failed."""
    s = raw(host)
    try:
        s.sendall(request(s, P.CMD_WRITE, offset, 4096, b"g" * 4096, cookie=7))
        assert reply(s) == (7, 0, b"")
        s.sendall(request(s, P.CMD_READ, offset, 4096, cookie=8))
        assert reply(s, 4096) == (8, 0, b"g" * 4096)
    finally:
        s.close()
    paths = host.view()["paths"]
    assert all(p["failures"] == 0 and p["state"] == "ready" for p in paths), paths


def test_requests_beyond_the_export_get_the_spec_errors(host: Host) -> None:
    """Past the end: EINVAL, writes ENOSPC (the spec's errors); overflowing
    offset + length the same; the connection stays usable."""
    size = host.map().size
    s = raw(host)
    cases = [(P.CMD_READ, size - 4096, 8192, P.EINVAL), (P.CMD_READ, size, 1, P.EINVAL),
             (P.CMD_READ, U64, 4096, P.EINVAL), (P.CMD_READ, 1 << 63, (1 << 32) - 1, P.EINVAL),
             (P.CMD_READ, U64 - 4095, 8192, P.EINVAL), (P.CMD_READ, 0, P.MAX_REQUEST + 1,
                                                        P.EINVAL),
             (P.CMD_WRITE, size - 4096, 8192, P.ENOSPC), (P.CMD_WRITE, U64 - 4095, 8192, P.ENOSPC),
             (P.CMD_WRITE_ZEROES, size, 1, P.ENOSPC), (P.CMD_WRITE_ZEROES, U64, U64 >> 32,
                                                       P.ENOSPC),
             (P.CMD_TRIM, U64, 2, P.EINVAL), (P.CMD_TRIM, size - 1, 2, P.EINVAL)]
    for i, (cmd, offset, length, err) in enumerate(cases, 1):
        payload = bytes(length) if cmd == P.CMD_WRITE else b""
        s.sendall(request(s, cmd, offset, length, payload, cookie=i))
        assert reply(s) == (i, err, b""), (cmd, offset, length)
    s.sendall(request(s, P.CMD_READ, size - 4096, 4096, cookie=99))  # the last block: fine
    assert reply(s, 4096)[:2] == (99, 0)
    s.close()
    good_io(host)


def test_unknown_commands_and_flags_get_einval(host: Host) -> None:
    s = raw(host)
    for i, (cmd, flags) in enumerate([(P.CMD_CACHE, 0), (7, 0), (8, 0), (0x1234, 0),
                                      (0xFFFF, 0xFFFF), (P.CMD_READ, 1 << 5),
                                      (P.CMD_WRITE, P.CMD_FLAG_NO_HOLE), (P.CMD_FLUSH, 1 << 9)],
                                     1):
        payload = b"w" * 4096 if cmd == P.CMD_WRITE else b""
        s.sendall(request(s, cmd, 0, 4096, payload, flags=flags, cookie=i))
        assert reply(s) == (i, P.EINVAL, b""), (cmd, flags)
    s.sendall(request(s, P.CMD_READ, 0, 4096, flags=P.CMD_FLAG_FUA, cookie=50))  # a no-op
    assert reply(s, 4096)[:2] == (50, 0)
    s.close()
    good_io(host)


def test_a_write_over_the_maximum_closes_only_that_connection(host: Host) -> None:
    other = raw(host)
    s = raw(host)
    s.sendall(request(s, P.CMD_WRITE, 0, P.MAX_REQUEST + 1) + b"x" * 4096)
    assert closed(s), "the connection stays open after an oversized write"
    s.close()
    other.sendall(request(other, P.CMD_READ, 0, 4096, cookie=3))
    assert reply(other, 4096)[:2] == (3, 0)
    other.close()
    good_io(host)


def test_a_handshake_that_never_ends_is_closed(host: Host) -> None:
    """A client that says nothing, one that haggles forever, one that stalls in the
    middle of an option: each is closed at the handshake's deadline."""
    host.call(lambda: host.engine.request(E.line("set", handshake_timeout=1)))
    try:
        silent = raw(host, go=False)
        haggler = raw(host, go=False)
        haggler.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE))
        half = raw(host, go=False)
        half.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE) + P.OPT_HEADER.pack(
            P.IHAVEOPT, P.OPT_GO, 100) + b"\0" * 10)
        t0 = time.monotonic()
        haggler.settimeout(0.5)
        cut = False
        while time.monotonic() - t0 < 5 and not cut:
            try:
                haggler.sendall(P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_LIST, 0))
                while haggler.recv(1 << 16):  # its replies, until it stops haggling
                    pass
                cut = True
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                cut = True
        assert cut and time.monotonic() - t0 < 3, "endless option haggling was not cut"
        assert closed(silent, 3) and closed(half, 3)
        for s in (silent, haggler, half):
            s.close()
        good_io(host)
    finally:
        host.call(lambda: host.engine.request(E.line("set", handshake_timeout=10)))


@pytest.mark.parametrize("garbage", [
    b"\xff\xff\xff\xff",  # unknown client flags
    struct.pack(">I", 1) + b"NOTANOPT" + b"\0" * 8,  # bad option magic
    struct.pack(">I", 1) + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 65537),  # option too long
    struct.pack(">I", 1) + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, 5) + b"other",
    struct.pack(">I", 1) + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_ABORT, 0) + b"more" * 10,
])
def test_garbage_in_the_handshake_closes_the_connection(host: Host, garbage: bytes) -> None:
    s = raw(host, go=False)
    s.sendall(garbage)
    assert closed(s)
    s.close()
    good_io(host)


@pytest.mark.parametrize("garbage", [
    b"\0" * 28,  # a request with a zero magic
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 8,
    P.REQUEST.pack(P.REQUEST_MAGIC ^ 1, 0, P.CMD_READ, 1, 0, 4096),
])
def test_garbage_in_transmission_closes_the_connection(host: Host, garbage: bytes) -> None:
    s = raw(host)
    s.sendall(garbage)
    assert closed(s)
    s.close()
    good_io(host)


def test_malformed_options_get_their_errors_and_haggling_goes_on(host: Host) -> None:
    s = raw(host, go=False)
    s.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES))
    for opt, data, want in [(P.OPT_GO, b"\0\0", P.REP_ERR_INVALID),
                            (P.OPT_GO, b"\xff\xff\xff\xff\0\0", P.REP_ERR_INVALID),
                            (P.OPT_INFO, P.go_request("nosuchmap"), P.REP_ERR_UNKNOWN),
                            (P.OPT_STARTTLS, b"", P.REP_ERR_UNSUP),
                            (P.OPT_X_FENCE, b"\0\0\0\1" + b"\0" * 8, P.REP_ERR_UNSUP),
                            (0xDEADBEEF, b"x" * 100, P.REP_ERR_UNSUP)]:
        s.sendall(P.OPT_HEADER.pack(P.IHAVEOPT, opt, len(data)) + data)
        _m, ropt, rtype, length = P.OPT_REPLY.unpack(recv_exactly(s, 20))
        recv_exactly(s, length)
        assert (ropt, rtype) == (opt, want)
    data = P.go_request("")  # the default export: still there
    s.sendall(P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_GO, len(data)) + data)
    while True:
        _m, _o, rtype, length = P.OPT_REPLY.unpack(recv_exactly(s, 20))
        recv_exactly(s, length)
        if rtype == P.REP_ACK:
            break
    s.sendall(request(s, P.CMD_READ, 0, 512, cookie=5))
    assert reply(s, 512)[:2] == (5, 0)
    s.close()


def test_a_client_that_never_reads_its_replies_costs_only_its_connection(host: Host) -> None:
    """Tens of thousands of 1 MiB reads whose replies are never read: the engine stops reading
    that client (its outstanding requests are bounded), memory stays bounded, and
    another client's I/O goes on."""
    greedy = raw(host)
    greedy.setblocking(False)
    burst = b"".join(request(greedy, P.CMD_READ, (i % 60) * MIB, MIB, cookie=i)
                     for i in range(40000))
    sent = 0
    deadline = time.monotonic() + 10
    while sent < len(burst) and time.monotonic() < deadline:
        try:
            sent += greedy.send(burst[sent:])
        except BlockingIOError:
            time.sleep(0.01)
    assert sent < len(burst), "the engine read every request of a client that reads nothing"
    good_io(host)
    assert rss_kib(host.engine.pid) < 600 * 1024
    greedy.close()
    good_io(host)


def test_hundreds_of_idle_connections(host: Host) -> None:
    conns = []
    try:
        for _ in range(300):
            conns.append(raw(host, go=len(conns) % 2 == 0))
        good_io(host)
    finally:
        for c in conns:
            c.close()
    good_io(host)
    check_alive(host)


def test_disconnect_with_requests_in_flight(host: Host) -> None:
    """A client that goes away with reads and writes in flight: their replies are
    dropped, nothing else notices. (The vanished client's write lands in a region of
    its own: a write nobody acknowledged may reach the array at any later time.)"""
    for _ in range(20):
        s = raw(host)
        s.sendall(b"".join(request(s, P.CMD_READ, i * MIB, MIB, cookie=i) for i in range(8))
                  + request(s, P.CMD_WRITE, 4 * MIB, 65536, b"d" * 65536, cookie=9))
        s.shutdown(socket.SHUT_RDWR)
        s.close()
    good_io(host)
