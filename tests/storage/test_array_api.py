"""The array daemon's management API (storage/arrayapi.py): `sanvisor array ...` is one
client of it while the daemon runs, any other client gets the same behaviour and the
same error codes, bad requests never hurt the daemon, and with no daemon the CLI
applies the same operations itself. A real daemon, real NBD sessions."""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sanvisor.errors import ConflictError
from sanvisor.storage.arrayapi import call, socket_path
from sanvisor.storage.nbdclient import NbdError
from tests.guest.helpers import wait_until
from tests.storage.harness import ArrayProc, hba_address, make_array, wwpn


@pytest.fixture(scope="module")
def array() -> Iterator[ArrayProc]:
    home = Path(tempfile.mkdtemp(prefix="svarrapi"))
    arr = make_array(home)
    try:
        yield arr
    finally:
        arr.stop()
        import shutil

        shutil.rmtree(home, ignore_errors=True)


def raw(arr: ArrayProc, line: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(20)
        s.connect(str(socket_path(arr.home)))
        s.sendall(line + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            assert chunk, f"the management socket closed on {line[:80]!r}"
            buf += chunk
    reply: dict[str, Any] = json.loads(buf)
    return reply


def test_the_socket_is_the_daemons_alone(array: ArrayProc) -> None:
    st_ = socket_path(array.home).stat()
    assert st_.st_mode & 0o777 == 0o600 and st_.st_uid == os.getuid()


def test_a_lun_in_use_is_not_deleted_and_force_cuts_its_sessions(array: ArrayProc) -> None:
    """Only the running daemon knows who has a LUN open: the CLI's delete goes through
    it, is refused naming the session's host, and --force fences the session (its
    next request fails) before the LUN and its file go."""
    array.cli("lun", "create", "busy", "--size", "8M")
    array.cli("zone", "add", "busy", wwpn(1, 0))
    client = array.client(hba_address(1, 0), "busy")
    try:
        client.pwrite(b"x" * 4096, 0)
        array.cli("zone", "remove", "busy", wwpn(1, 0))
        proc = array.cli("lun", "delete", "busy", check=False)
        assert proc.returncode == 1, proc.stderr
        assert "in use: 1 session(s) open from 127.0.1.11 (host1)" in proc.stderr, \
            proc.stderr
        backing = Path(array.lun("busy").backing)
        assert backing.exists()
        out = array.js("lun", "delete", "busy", "--force")
        assert out == {"lun": "busy", "deleted": True, "sessions_cut": 1}
        with pytest.raises((NbdError, OSError)):
            client.pread(4096, 0)
        assert not backing.exists()
        assert "busy" not in [x["name"] for x in array.js("lun", "list")]
    finally:
        client.close()


def test_any_client_gets_the_same_operations_and_error_codes(array: ArrayProc) -> None:
    made = call(array.home, "lun-create", {"name": "api1", "size": 1 << 20})
    assert made is not None and made.data["name"] == "api1"
    assert made.text.startswith(f"LUN {made.data['id']} api1 created: 1 MiB, thin")
    with pytest.raises(ConflictError, match="a LUN named api1 already exists"):
        call(array.home, "lun-create", {"name": "api1", "size": 1 << 20})
    assert raw(array, b'{"op": "lun-create", "args": {"name": "api1", "size": 1048576}}'
               )["error"]["code"] == "conflict"
    assert raw(array, b'{"op": "lun-list"}')["data"][-1]["name"] == "api1"
    for bad, says in ((b"not json", "malformed request"),
                      (b'{"op": "format-everything"}', "unknown array operation"),
                      (b'{"op": "lun-create", "args": {"name": "x", "size": "8M"}}',
                       "size has the wrong type"),
                      (b'{"op": "lun-resize", "args": {"lun": "api1", "size": true}}',
                       "size has the wrong type"),
                      (b'{"op": "lun-delete", "args": {"nope": 1}}', "unexpected keyword"),
                      (b"[1, 2]", "expected")):
        err = raw(array, bad)["error"]
        assert err["code"] == "usage" and says in err["message"], (bad, err)
    assert call(array.home, "lun-delete", {"lun": "api1"}) is not None


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats()
                     | st.text(max_size=20),
                     lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                     max_leaves=12)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from(["lun-create", "lun-delete", "lun-resize", "lun-list",
                           "zone-add", "zone-remove", "initiator-add", "initiator-list",
                           "nope"]),
       args=st.dictionaries(st.sampled_from(["name", "size", "lun", "wwpn", "address",
                                             "host", "force", "id", "thick", "backing"]),
                            _json, max_size=5))
def test_no_request_hurts_the_daemon(array: ArrayProc, op: str, args: dict[str, Any]
                                     ) -> None:
    """Whatever a client sends, the reply is data or an error with a code, and the
    daemon serves on (a backing path is only ever an existing file's: none here)."""
    args.pop("backing", None)
    reply = raw(array, json.dumps({"op": op, "args": args}).encode())
    assert ("data" in reply) != ("error" in reply), reply
    if "error" in reply:
        assert reply["error"]["code"] and reply["error"]["message"], reply
    else:  # it did something: undo it for the next example
        if op == "lun-create":
            call(array.home, "lun-delete", {"lun": reply["data"]["name"], "force": True})
        if op == "initiator-add":
            from sanvisor.storage.array import ArrayStore

            with ArrayStore(array.home).edit() as cfg:
                cfg.initiators = [i for i in cfg.initiators
                                  if i.wwpn != reply["data"]["wwpn"]]
    assert array.proc is not None and array.proc.poll() is None


def test_with_no_daemon_the_cli_applies_the_same_operations(tmp_path: Path) -> None:
    """Killed, the daemon leaves its socket behind: the CLI notices nobody answers and
    edits the array's home itself (a lab registers its HBAs before the array runs)."""
    arr = make_array(tmp_path / "a")
    try:
        arr.stop(signal.SIGKILL)
        assert socket_path(arr.home).exists()
        arr.cli("lun", "create", "offline", "--size", "4M")
        assert "offline" in [x["name"] for x in arr.js("lun", "list")]
        arr.start()
        wait_until("the management socket", lambda: call(arr.home, "lun-list", {}), 20)
        assert "offline" in [x["name"] for x in arr.js("lun", "list")]
        arr.stop()
        assert not socket_path(arr.home).exists()  # a clean stop removes it
    finally:
        arr.stop(signal.SIGKILL)
