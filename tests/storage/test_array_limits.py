"""The array's bounds, over real sockets against the real daemon: a handshake that
does not end is dropped (a pending fence excepted: it waits for the fenced session's
request, with its own bound, and ends when its client leaves), connections are
limited per initiator address and in all, options are bounded in size and number,
and ``--listen :PORT`` does not listen on every address. Every wait is on an event
(the array's test hooks, a socket's end), with a deadline; no sleeps.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sanvisor.errors import UsageError
from sanvisor.storage import nbdproto as P
from sanvisor.storage.array import ArrayStore
from sanvisor.storage.nbdclient import NbdClient
from tests.storage.harness import DEADLINE, ArrayProc, hba_address, sv, wwpn

HELLO = struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
GREETING = 18  # NBDMAGIC, IHAVEOPT, handshake flags


class LimitedArray(ArrayProc):
    """ArrayProc with options of `array serve` of the test's choosing."""

    def __init__(self, home: Path, *options: str, host: str = "127.0.0.1") -> None:
        super().__init__(home)
        self.options = options
        self.listen = f"{host}:{self.port}"

    def start(self) -> None:
        super().start()
        self.conns("*", 0)  # the probes above are gone: every count starts at 0

    def conns(self, peer: str, n: int) -> dict[str, Any]:
        """Block until ``peer`` (``*``: all) has exactly ``n`` connections open."""
        reply = self.control(f"wait-conns {peer} {n} {DEADLINE}")
        assert "error" not in reply, f"{peer}: {n} connections: {reply}"
        return reply


@pytest.fixture
def start() -> Iterator[Any]:
    """``start(*serve_options)``: an array with host1's and host2's HBAs, LUN sys zoned
    to host1; stopped and removed after the test."""
    arrays: list[LimitedArray] = []
    roots: list[Path] = []

    def make(*options: str, host: str = "127.0.0.1") -> LimitedArray:
        root = Path(tempfile.mkdtemp(prefix="svlim", dir="/tmp"))
        roots.append(root)
        store = ArrayStore(root)
        with store.edit() as cfg:
            for n in (1, 2):
                for k in (0, 1):
                    cfg.add_initiator(wwpn(n, k), f"host{n}", hba_address(n, k))
            lun = cfg.add_lun("sys", 16 << 20, Path("/pending"))
            lun.backing = str(store.backing_path(lun.wwid))
            with open(lun.backing, "wb") as fh:
                fh.truncate(lun.size)
            for k in (0, 1):
                cfg.zone_add("sys", wwpn(1, k))
        arr = LimitedArray(root, *options, host=host)
        arrays.append(arr)
        arr.start()
        return arr

    try:
        yield make
    finally:
        for arr in arrays:
            arr.stop()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


def _connect(arr: ArrayProc, source: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", arr.port), timeout=DEADLINE,
                                 source_address=(source, 0))
    return s


def _greeted(s: socket.socket) -> bool:
    """Whether the array greets this connection (False: it closed it at once)."""
    try:
        data = b""
        while len(data) < GREETING:
            chunk = s.recv(GREETING - len(data))
            if not chunk:
                return False
            data += chunk
    except ConnectionResetError:
        return False
    assert struct.unpack(">QQ", data[:16]) == (P.NBDMAGIC, P.IHAVEOPT)
    return True


def _closed_by_array(s: socket.socket, timeout: float = DEADLINE) -> bytes:
    """Wait (at most ``timeout``) until the array closes ``s``; what it sent meanwhile."""
    s.settimeout(timeout)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the array kept the connection open ({len(got)} bytes "
                             "received)") from None
    return got


def _still_open(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True  # nothing to read, not closed
    except ConnectionResetError:
        return False
    finally:
        s.setblocking(True)


# ---- the handshake's deadline -------------------------------------------------------
def test_a_handshake_that_does_not_end_is_dropped(start: Any) -> None:
    arr = start("--handshake-timeout", "1")
    with arr.client(hba_address(1, 0)) as opened:  # GO: transmission has no such bound
        idle = _connect(arr, hba_address(1, 0))
        assert _greeted(idle)
        haggling = _connect(arr, hba_address(1, 1))  # options, but never a GO
        assert _greeted(haggling)
        haggling.sendall(HELLO + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_LIST, 0))
        assert _closed_by_array(idle) == b""
        listing = _closed_by_array(haggling)
        assert P.OPT_REPLY.unpack_from(listing)[2] == P.REP_SERVER  # it was answered
        idle.close()
        haggling.close()
        opened.pwrite(b"x" * 512, 0)  # the session opened before is not touched
        assert opened.pread(512, 0) == b"x" * 512
    assert "no handshake within 1 s" in arr.log.read_text()


def test_a_pending_fence_is_not_cut_by_the_handshake_timeout(start: Any) -> None:
    """A fence waits, in the handshake, for the request the fenced session executes:
    connections that came later are dropped by the handshake's deadline meanwhile,
    the fence's is not, and gets its ack once the request is done (then the option
    its client sent meanwhile is answered: nothing it sent is lost)."""
    arr = start("--handshake-timeout", "1")
    a = arr.client(hba_address(1, 0))
    token = a.session
    assert token is not None
    arr.control(f"stall {token:x} flush")
    a.send(P.CMD_FLUSH, 0, 0)
    arr.wait(token, "stalled")
    fencer = NbdClient("127.0.0.1", arr.port, source=hba_address(1, 1), timeout=DEADLINE)
    fencer._option(P.OPT_X_FENCE, P.fence_request([token]))
    arr.wait(token, "fences")
    later = _connect(arr, hba_address(1, 1))
    assert _greeted(later)
    assert _closed_by_array(later) == b""  # its deadline passed: so did the fence's
    later.close()
    assert _still_open(fencer.sock), "the fence's connection was dropped while it waited"
    fencer._option(P.OPT_LIST)  # sent before the fence's reply
    arr.control(f"release {token:x}")
    rtype, _ = fencer._reply()
    assert rtype == P.REP_ACK
    assert arr.session(token).get("gone")
    lun = arr.lun("sys")
    name = lun.wwid.encode()
    assert fencer._reply() == (P.REP_SERVER, struct.pack(">I", len(name)) + name
                               + lun.description().encode())
    assert fencer._reply()[0] == P.REP_ACK
    fencer.abort()
    a.close()


def test_a_fence_wait_ends_when_its_client_leaves(start: Any) -> None:
    arr = start()
    a = arr.client(hba_address(1, 0))
    token = a.session
    assert token is not None
    arr.control(f"stall {token:x} flush")
    a.send(P.CMD_FLUSH, 0, 0)
    arr.wait(token, "stalled")
    fencer = NbdClient("127.0.0.1", arr.port, source=hba_address(1, 1), timeout=DEADLINE)
    fencer._option(P.OPT_X_FENCE, P.fence_request([token]))
    arr.wait(token, "fences")
    fencer.close()  # gave up (as the host does after fence.FENCE_TIMEOUT)
    arr.conns(hba_address(1, 1), 0)  # its connection is gone from the array too
    view = arr.session(token)
    assert view["fences"] == 0 and view["fenced"], view  # fenced all the same
    arr.control(f"release {token:x}")
    arr.wait(token, "ended")
    a.close()


def test_a_fence_wait_has_its_own_bound(start: Any) -> None:
    arr = start("--fence-wait", "0.5")
    a = arr.client(hba_address(1, 0))
    token = a.session
    assert token is not None
    arr.control(f"stall {token:x} flush")
    a.send(P.CMD_FLUSH, 0, 0)
    arr.wait(token, "stalled")
    fencer = NbdClient("127.0.0.1", arr.port, source=hba_address(1, 1), timeout=DEADLINE)
    fencer._option(P.OPT_X_FENCE, P.fence_request([token]))
    assert _closed_by_array(fencer.sock) == b""  # no ack: the session still executes
    fencer.close()
    assert arr.session(token)["fenced"]
    assert "fence not done within 0.5 s" in arr.log.read_text()
    arr.control(f"release {token:x}")
    arr.wait(token, "ended")
    a.close()


# ---- connections ------------------------------------------------------------------
def test_connections_are_limited_per_initiator_and_in_all(start: Any) -> None:
    arr = start("--max-connections", "3", "--max-connections-per-initiator", "2")
    first = [_connect(arr, hba_address(1, 0)) for _ in range(2)]
    assert all(_greeted(s) for s in first)
    one_more = _connect(arr, hba_address(1, 0))
    assert not _greeted(one_more), "a third connection from one address was served"
    other = _connect(arr, hba_address(1, 1))  # another address: its own count
    assert _greeted(other)
    beyond = _connect(arr, hba_address(2, 0))
    assert not _greeted(beyond), "a fourth connection in all was served"
    first[0].close()
    arr.conns(hba_address(1, 0), 1)
    again = _connect(arr, hba_address(1, 0))
    assert _greeted(again)  # a connection that ended frees its place
    for s in [*first, one_more, other, beyond, again]:
        s.close()
    assert "connection refused: 2 open from this address" in arr.log.read_text()


# ---- options --------------------------------------------------------------------------
def test_option_data_is_refused_before_it_is_read(start: Any) -> None:
    from sanvisor.storage.arrayd import MAX_OPTION_DATA

    arr = start()
    s = _connect(arr, hba_address(1, 0))
    assert _greeted(s)
    size = MAX_OPTION_DATA + 1
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # closed already
        s.sendall(HELLO + P.OPT_HEADER.pack(P.IHAVEOPT, 0x1234, size) + b"x" * size)
    assert _closed_by_array(s) == b"", "an oversized option was read and answered"
    s.close()
    with NbdClient("127.0.0.1", arr.port, source=hba_address(1, 0)) as c:  # the largest
        c._option(P.OPT_INFO, P.go_request("n" * 4096))  # an option may be: answered
        assert c._reply()[0] == P.REP_ERR_UNKNOWN


def test_options_are_counted(start: Any) -> None:
    from sanvisor.storage.arrayd import MAX_OPTIONS

    arr = start()
    s = _connect(arr, hba_address(1, 0))
    assert _greeted(s)
    unsupported = P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_STRUCTURED_REPLY, 0)
    s.sendall(HELLO + unsupported * (MAX_OPTIONS + 1))
    replies = _closed_by_array(s)
    assert len(replies) == MAX_OPTIONS * P.OPT_REPLY.size, len(replies)
    assert P.OPT_REPLY.unpack_from(replies, len(replies) - P.OPT_REPLY.size)[2] == \
        P.REP_ERR_UNSUP
    s.close()


# ---- where it listens -----------------------------------------------------------------
def test_listen_addresses() -> None:
    from sanvisor.cli.array_verbs import parse_listen

    assert parse_listen(":10810") == ("127.0.0.1", 10810)
    assert parse_listen("10810") == ("127.0.0.1", 10810)
    assert parse_listen("10.250.1.1:10809") == ("10.250.1.1", 10809)
    assert parse_listen("10.250.1.1") == ("10.250.1.1", 10809)
    assert parse_listen("[::1]:7") == ("::1", 7)
    assert parse_listen("0.0.0.0:7") == ("0.0.0.0", 7)  # every address: when asked
    for bad in (":0", ":65536", "h:x", "h:", "a:b:c", "[::1]x", ":\u0661"):
        with pytest.raises(UsageError):
            parse_listen(bad)


def test_listen_on_a_port_alone_is_loopback_only(start: Any) -> None:
    arr = start(host="")  # --listen :PORT
    assert arr.listen == f":{arr.port}"
    with pytest.raises(ConnectionRefusedError):  # another address of this machine
        socket.create_connection(("127.0.0.2", arr.port), timeout=DEADLINE).close()
    with NbdClient("127.0.0.1", arr.port, source=hba_address(1, 0)) as c:
        assert [e.name for e in c.exports()] == [arr.lun("sys").wwid]


def test_serve_help_names_the_limits_defaults(tmp_path: Path) -> None:
    from sanvisor.storage.arrayd import Limits

    text = " ".join(sv(tmp_path, "array", "serve", "--help").stdout.split())
    lim = Limits()
    for default in (lim.handshake, lim.fence_wait, lim.connections, lim.per_initiator):
        assert f"default {default:g})" in text, (default, text)
    assert "127.0.0.1" in text and "0.0.0.0:PORT" in text
