"""Fencing: a failed path's stale writes are never replayed over newer data.

The array's side is tested with raw NBD clients over sockets only (so any host
implementation, such as a native data-path engine, can be run against it); the
host's side with the real multipath daemon in front of the real array, the
array's timing held by its test hooks (a stalled fdatasync), the wire cut by a
relay that leaves the array's end half-open. No sleeps: every wait is on an
event, with a deadline.
"""

from __future__ import annotations

import concurrent.futures
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sanvisor.storage import nbdproto as P
from sanvisor.storage.nbdclient import NbdClient, NbdError
from tests.storage.harness import (
    DEADLINE,
    ArrayProc,
    Host,
    Replies,
    bench,
    hba_address,
    make_array,
)

BS = 4096
OLD, STALE, NEW = b"O" * BS, b"S" * BS, b"N" * BS
# the built-in hardware table makes a DF600F multibus, queueing: a device entry wins
FAILOVER = ("defaults {\n user_friendly_names yes\n polling_interval 0.2\n}\n"
            "devices {\n device {\n  vendor \"HITACHI\"\n  product \"DF600F\"\n"
            "  path_grouping_policy failover\n  no_path_retry %s\n }\n}\n")


@pytest.fixture
def array() -> Iterator[ArrayProc]:
    root = Path(tempfile.mkdtemp(prefix="svfa", dir="/tmp"))
    arr = None
    try:
        arr = make_array(root)
        yield arr
    finally:
        if arr is not None:
            arr.stop()
        shutil.rmtree(root, ignore_errors=True)


def _in_thread(fn: Callable[[], object]) -> concurrent.futures.Future[object]:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    fut: concurrent.futures.Future[object] = pool.submit(fn)
    pool.shutdown(wait=False)
    return fut


# ---- the array's side (host-independent) -------------------------------------------
def test_fence_discards_queued_requests_after_the_executing_one(array: ArrayProc) -> None:
    """Session A: a flush held in fdatasync, a write queued behind it, A's host silent
    (its connection half-open). A fence from the host's other HBA is acknowledged only
    once the flush finished, and the queued write is discarded, never executed."""
    a = array.client(hba_address(1, 0))
    assert a.session is not None
    a.pwrite(OLD, 0)
    array.control(f"stall {a.session:x} flush")
    a.send(P.CMD_FLUSH, 0, 0)
    a.send(P.CMD_WRITE, 0, BS, STALE)
    array.wait(a.session, "stalled")
    array.wait(a.session, "queued", 1)
    b = array.client(hba_address(1, 1), lun=None)
    token = a.session
    fence = _in_thread(lambda: b.fence([token]))
    view = array.wait(a.session, "fences", 1)
    assert view["discarded"] == 1 and view["executing"], view  # dropped at once
    assert not fence.done(), "fence acknowledged while A's flush was still running"
    array.control(f"release {a.session:x}")
    fence.result(DEADLINE)
    assert array.session(a.session).get("gone"), "A's session outlived its fence"
    b.abort()
    with array.client(hba_address(1, 1)) as c:
        assert c.pread(BS, 0) == OLD  # the stale write never reached the LUN
        c.pwrite(NEW, 0)
        c.flush()
        assert c.pread(BS, 0) == NEW
    a.sock.settimeout(DEADLINE)
    with pytest.raises((NbdError, OSError)):
        a.receive()  # the array cut A: no reply will ever come on it
    a.close()


def test_a_broken_connection_discards_what_it_queued(array: ArrayProc) -> None:
    """Not a guarantee (a half-open connection is not seen to break: that is what the
    fence is for), but when the array does see a session's connection reset, what it
    had queued is dropped, not executed for nobody."""
    a = array.client(hba_address(1, 0))
    assert a.session is not None
    a.pwrite(OLD, 0)
    array.control(f"stall {a.session:x} flush")
    a.send(P.CMD_FLUSH, 0, 0)
    a.send(P.CMD_WRITE, 0, BS, STALE)
    array.wait(a.session, "queued", 1)
    a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a.close()  # a reset
    view = array.wait(a.session, "discarded", 1)
    assert view["executing"], view
    array.control(f"release {a.session:x}")
    array.wait(a.session, "ended")
    with array.client(hba_address(1, 1)) as b:
        assert b.pread(BS, 0) == OLD


def test_fence_rules(array: ArrayProc) -> None:
    a = array.client(hba_address(1, 0))
    token = a.session
    assert token is not None
    # another host's initiator may not fence host1's sessions
    other = array.client(hba_address(2, 0), lun=None)
    with pytest.raises(NbdError, match="not a session of host"):
        other.fence([token])
    other.abort()
    assert not array.session(token).get("gone")
    # a session that does not exist (any more, or since an array restart): done
    with array.client(hba_address(1, 1), lun=None) as b:
        b.fence([0x1234])
        # malformed: refused, the connection stays usable
        b._option(P.OPT_X_FENCE, b"\0\0\0\2" + b"x" * 8)
        rtype, _ = b._reply()
        assert rtype == P.REP_ERR_INVALID
        # an idle session: fenced at once, its connection cut by the array
        b.fence([token])
        assert array.session(token).get("gone")
        b.abort()
    with pytest.raises((NbdError, OSError)):
        a.pread(BS, 0)
    a.close()
    # an address the array does not know may not fence anything
    stranger = NbdClient("127.0.0.1", array.port, source="127.0.0.99", timeout=DEADLINE)
    with pytest.raises(NbdError, match="unknown initiator"):
        stranger.fence([0x1234])
    stranger.close()


# ---- the host's side: the multipath daemon in front of the array --------------------
def _stale_write_scenario(arr: ArrayProc, host: Host) -> tuple[bytes, dict[str, object]]:
    """The issue's scenario; returns what block 0 finally holds, and the map's view."""
    g = Replies(host.guest())
    assert g.io(P.CMD_WRITE, 0, BS, OLD)[0] == 0
    assert g.io(P.CMD_FLUSH, 0, 0)[0] == 0
    token_a = host.call(lambda: host.path(0).session)
    arr.control(f"stall {token_a:x} flush")  # a slow fdatasync on path A...
    flush = g.send(P.CMD_FLUSH, 0, 0)
    stale = g.send(P.CMD_WRITE, 0, BS, STALE)  # ...and a write queued behind it
    arr.wait(token_a, "stalled")
    arr.wait(token_a, "queued", 1)
    host.call(host.fabrics[0].blackhole)  # A fails: the array's end stays half-open
    host.hba_down(0)
    host.until("path A faulty", lambda: not host.path(0).ready)
    assert g.wait(flush)[0] == 0  # the flush is resent on B at once
    # either the stale write is acknowledged (resent unfenced), or A is being fenced
    decided = threading.Event()
    _in_thread(lambda: arr.wait(token_a, "fences", 1)).add_done_callback(
        lambda _: decided.set())
    _in_thread(lambda: g.events[stale].wait(DEADLINE)).add_done_callback(
        lambda _: decided.set())
    assert decided.wait(DEADLINE), "neither a fence nor a reply to the write"
    if g.events[stale].is_set():  # resent without a fence: the guest moves on
        assert g.wait(stale)[0] == 0
        assert g.io(P.CMD_WRITE, 0, BS, NEW)[0] == 0  # the same block rewritten on B
        assert g.io(P.CMD_FLUSH, 0, 0)[0] == 0
        arr.control(f"release {token_a:x}")
        arr.wait(token_a, "executed", 4)  # A runs what it had: OLD, flush, flush, STALE
    else:
        assert not g.events[stale].is_set(), "the stale write was acknowledged unfenced"
        view = arr.session(token_a)
        assert view["discarded"] == 1 and view["executing"], view
        arr.control(f"release {token_a:x}")  # the running flush ends, then the fence
        assert g.wait(stale)[0] == 0  # resent on B after the fence: no error
        assert arr.session(token_a).get("gone")
        assert g.io(P.CMD_WRITE, 0, BS, NEW)[0] == 0
        assert g.io(P.CMD_FLUSH, 0, 0)[0] == 0
    err, data = g.io(P.CMD_READ, 0, BS)
    assert err == 0
    g.guest.close()
    return data, host.view()


def test_a_stale_write_is_not_replayed_over_newer_data() -> None:
    with bench(conf=FAILOVER % "queue") as (arr, host):
        data, view = _stale_write_scenario(arr, host)
        assert data == NEW, f"block 0 holds {data[:8]!r}...: a stale write was replayed"
        assert view["fences"] == 1 and view["io_errors"] == 0, view


def test_the_scenario_loses_data_without_fencing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same scenario with the host resending writes unfenced (as before the fix):
    the array replays the stale write. This is what makes the test above a test."""
    monkeypatch.setattr("sanvisor.storage.enginemap.WRITES", ())
    with bench(conf=FAILOVER % "queue") as (arr, host):
        data, _ = _stale_write_scenario(arr, host)
        assert data == STALE


def test_no_path_left_writes_wait_for_a_path_to_fence_through() -> None:
    """Both HBAs die while A's write is queued at the array: the write is held (not
    failed, not resent); when B returns, A is fenced through it, then the write runs."""
    with bench(conf=FAILOVER % "queue") as (arr, host):
        g = Replies(host.guest())
        token_a = host.call(lambda: host.path(0).session)
        arr.control(f"stall {token_a:x} flush")
        g.send(P.CMD_FLUSH, 0, 0)
        w = g.send(P.CMD_WRITE, BS, BS, NEW)
        arr.wait(token_a, "queued", 1)
        for k in (0, 1):
            host.call(host.fabrics[k].blackhole)
            host.hba_down(k)
        host.until("the write held", lambda: host.map().view()["held"] == 1
                   and not any(p.ready for p in host.map().paths))
        host.call(host.fabrics[1].heal)
        host.hba_up(1)
        arr.wait(token_a, "fences", 1)  # B is back: A is being fenced through it
        assert not g.events[w].is_set()
        arr.control(f"release {token_a:x}")
        assert g.wait(w)[0] == 0
        assert g.io(P.CMD_READ, BS, BS) == (0, NEW)
        assert host.view()["io_errors"] == 0


def test_no_path_fail_policy_fails_then_fences_before_new_io() -> None:
    """no_path_retry fail: with no path, the held write fails (EIO) but its session is
    still to fence; new I/O waits for that fence when a path returns, so the failed
    write cannot land after the guest rewrote the block."""
    with bench(conf=FAILOVER % "fail") as (arr, host):
        g = Replies(host.guest())
        token_a = host.call(lambda: host.path(0).session)
        arr.control(f"stall {token_a:x} flush")
        g.send(P.CMD_FLUSH, 0, 0)
        stale = g.send(P.CMD_WRITE, 0, BS, STALE)
        arr.wait(token_a, "queued", 1)
        for k in (0, 1):
            host.call(host.fabrics[k].blackhole)
            host.hba_down(k)
        assert g.wait(stale)[0] == P.EIO
        host.call(host.fabrics[1].heal)
        host.hba_up(1)
        host.until("path B back", lambda: host.path(1).ready)
        new = g.send(P.CMD_WRITE, 0, BS, NEW)  # the guest rewrites the failed block
        arr.wait(token_a, "fences", 1)
        assert not g.events[new].is_set(), "new I/O went out before the fence"
        arr.control(f"release {token_a:x}")
        assert g.wait(new)[0] == 0
        assert g.io(P.CMD_FLUSH, 0, 0)[0] == 0
        assert g.io(P.CMD_READ, 0, BS) == (0, NEW)
        assert arr.session(token_a).get("gone")
