"""Property-based fuzzing of the NBD ends of the data path (hypothesis), over real
sockets:

- the array daemon: garbage in the handshake or in transmission costs that
  connection only;
- a map's socket (/dev/mapper/NAME, served by the engine) in front of the real
  array: whatever a client sends, its own connection at most is closed, another
  client's I/O goes on and no path fails.

The engine's NBD state machine itself is fuzzed request by request against a model
of the spec in test_engine_fuzz.py. The inputs that crashed earlier versions are
kept as explicit examples (the regression corpus). Runs are derandomized
(repeatable); set SANVISOR_FUZZ=explore for a random, longer search.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sanvisor.storage import nbdproto as P
from tests.storage.harness import ArrayProc, Host, bench, hba_address, make_array

EXPLORE = os.environ.get("SANVISOR_FUZZ") == "explore"
FUZZ = settings(max_examples=2000 if EXPLORE else 300, derandomize=not EXPLORE,
                database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HELLO = struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)


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
