"""What the engine's own tests share: the sanitizer build, a host on the engine,
raw NBD sockets on a map, and the checks that the engine lived through a test.

The hostile-input tests run the engine built with -fsanitize=address,undefined
(``make -C engine asan``): a memory error or undefined behaviour aborts it, and
the test then fails on the dead engine and the sanitizer's report in its log.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sanvisor.storage import nbdproto as P
from tests.storage.harness import DEADLINE, ArrayProc, Host, bench

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "engine"
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")


def sanitizer_build() -> Path:
    """The engine built with ASan and UBSan (made if missing or older than its sources)."""
    out = BUILD / "sanvisor-engine-asan"
    proc = subprocess.run(["make", "-s", "-C", str(ROOT / "engine"), "asan", f"OUT={BUILD}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot build the sanitizer engine: {proc.stderr.strip()[-300:]}")
    return out


@contextlib.contextmanager
def engine_bench(monkeypatch: pytest.MonkeyPatch, sanitized: bool = True,
                 restarts: bool = False, **kw: Any) -> Iterator[tuple[ArrayProc, Host]]:
    """The harness's array and host, on the engine (the sanitizer build by default);
    at the end the engine must be alive, and never restarted unless ``restarts``."""
    if sanitized:
        monkeypatch.setenv("SANVISOR_ENGINE", str(sanitizer_build()))
        monkeypatch.setenv("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=1")
    with bench(**kw) as (arr, host):
        try:
            yield arr, host
        finally:
            check_alive(host, restarts=restarts)


def engine_log(host: Host) -> str:
    return (host.home / "engine" / "engine.log").read_text(errors="replace")


def check_alive(host: Host, restarts: bool = False) -> None:
    """The engine runs, was never restarted (unless ``restarts``), and its log has no
    sanitizer report."""
    eng = host.engine
    log = engine_log(host)
    bad = [m for m in SANITIZER_MARKS if m in log]
    assert not bad, f"the engine's sanitizers reported:\n{log[-4000:]}"
    assert restarts or eng.restarts == 0, f"the engine died and was restarted:\n{log[-2000:]}"
    alive = eng.proc.poll() is None if eng.proc is not None else Path(f"/proc/{eng.pid}").exists()
    assert alive, f"the engine died:\n{log[-2000:]}"


def map_socket(host: Host) -> str:
    return str(host.home / "mapper" / f"{host.map().name}.sock")


def raw(host: Host, go: bool = True, timeout: float = DEADLINE) -> socket.socket:
    """A raw connection to the map's socket, the handshake done (GO) if ``go``."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(map_socket(host))
    hello = recv_exactly(s, 18)
    assert struct.unpack(">QQH", hello)[:2] == (P.NBDMAGIC, P.IHAVEOPT)
    if go:
        data = P.go_request(host.map().name)
        s.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
                  + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_GO, len(data)) + data)
        while True:
            _m, _o, rtype, length = P.OPT_REPLY.unpack(recv_exactly(s, 20))
            recv_exactly(s, length)
            if rtype == P.REP_ACK:
                break
            assert not rtype & (1 << 31), f"GO refused: {rtype:#x}"
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def request(s: socket.socket, cmd: int, offset: int, length: int, data: bytes = b"",
            flags: int = 0, cookie: int = 1) -> bytes:
    return P.REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data


def reply(s: socket.socket, read_length: int = 0) -> tuple[int, int, bytes]:
    """(cookie, error, data) of one simple reply; a read's data if it succeeded."""
    magic, err, cookie = P.SIMPLE_REPLY.unpack(recv_exactly(s, 16))
    assert magic == P.SIMPLE_REPLY_MAGIC
    return cookie, err, recv_exactly(s, read_length) if read_length and not err else b""


def closed(s: socket.socket, timeout: float = 10.0) -> bool:
    """Whether the peer closed the connection (within ``timeout``), what was sent
    before the close being read and dropped."""
    s.settimeout(timeout)
    try:
        while s.recv(1 << 16):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_pid_gone(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
