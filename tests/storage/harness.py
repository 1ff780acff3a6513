"""A data-path test bench with real sockets and a real array daemon, and fault injection.

- ``ArrayProc``: the array daemon (`sanvisor array serve`) in a process of its own,
  with its test control socket (storage/arrayhooks.py): stall a session's flush or
  its next request, kill a session, wait for a session's state (events, not sleeps).
- ``Fabric`` (faultnet.py): a TCP relay between an HBA and the array that injects
  faults on the wire.
- ``Host``: the host side for real (storage/multipathd.py, its maps and paths, and
  the data-path engine it starts) in an event loop on a thread of its own, its HBAs
  behind fabrics; ``hba_down(k)`` makes HBA k's link look down (a fault file).

Everything runs on loopback addresses (no root needed): the array on 127.0.0.1,
HBA k of host n at 127.0.(k+1).(10+n) [WWPN 10:00:00:00:c9:00:0n:0k].
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sanvisor.storage.nbdclient import NbdClient
from tests.storage.faultnet import Fabric

DEADLINE = 20.0  # seconds any single wait of a test may take before it fails


def wwpn(host: int, hba: int) -> str:
    return f"10:00:00:00:c9:00:{host:02x}:{hba:02x}"


def hba_address(host: int, hba: int) -> str:
    return f"127.0.{hba + 1}.{10 + host}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def sv(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "sanvisor", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


class ArrayProc:
    """The array daemon with its control socket; LUNs and initiators through the CLI."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.ctl = home / "ctl.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "array.log"
        self.listen = f"127.0.0.1:{self.port}"
        self.options: tuple[str, ...] = ()  # more options of `array serve`

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sv(self.home, "array", "--array-home", str(self.home), *args, check=check)

    def js(self, *args: str) -> Any:
        return json.loads(sv(self.home, "--json", "array", "--array-home", str(self.home),
                             *args).stdout)

    def start(self) -> None:
        self.ctl.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sanvisor", "--home", str(self.home), "array",
                 "--array-home", str(self.home), "serve", "--listen", self.listen,
                 "--control", str(self.ctl), *self.options],
                stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + DEADLINE
        while True:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                if self.ctl.exists():
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, "the array did not start"
            time.sleep(0.02)  # start-up: nothing to wait on but the port

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def control(self, command: str, timeout: float = DEADLINE) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout + 5)
            s.connect(str(self.ctl))
            s.sendall(command.encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                assert chunk, f"the array's control socket closed on {command!r}"
                buf += chunk
        reply: dict[str, Any] = json.loads(buf)
        return reply

    def wait(self, token: int, field: str, n: int = 1,
             timeout: float = DEADLINE) -> dict[str, Any]:
        """Block until session ``token``'s FIELD >= n (an event in the array)."""
        reply = self.control(f"wait {token:x} {field} {n} {timeout}", timeout)
        assert "error" not in reply, f"session {token:016x}: {field} >= {n}: {reply}"
        return reply

    def session(self, token: int) -> dict[str, Any]:
        for s in self.control("sessions")["sessions"]:
            if int(s["token"], 16) == token:
                return dict(s)
        return {"token": f"{token:016x}", "gone": True}

    def client(self, source: str, lun: str | None = "sys") -> NbdClient:
        """A raw NBD client from an initiator address, LUN ``lun`` opened (GO)."""
        c = NbdClient("127.0.0.1", self.port, source=source, timeout=DEADLINE)
        if lun is not None:
            c.go(self.lun(lun).wwid)
        return c

    def lun(self, name: str) -> Any:
        from sanvisor.storage.array import ArrayStore

        return ArrayStore(self.home).load().lun(name)


def make_array(home: Path, hosts: int = 2, luns: tuple[tuple[str, str], ...] = (
        ("sys", "64M"),)) -> ArrayProc:
    """An array with hosts' HBAs registered, LUNs zoned to host1, started."""
    from sanvisor.cli.array_verbs import parse_size
    from sanvisor.storage.array import ArrayStore

    arr = ArrayProc(home)
    store = ArrayStore(home)
    with store.edit() as cfg:
        for n in range(1, hosts + 1):
            for k in (0, 1):
                cfg.add_initiator(wwpn(n, k), f"host{n}", hba_address(n, k))
        for name, size in luns:
            lun = cfg.add_lun(name, parse_size(size), Path("/pending"))
            lun.backing = str(store.backing_path(lun.wwid))
            with open(lun.backing, "wb") as fh:
                fh.truncate(lun.size)
            for k in (0, 1):
                cfg.zone_add(name, wwpn(1, k))
    arr.start()
    return arr


# ---- the host side -------------------------------------------------------------------
class Host:
    """A host's multipath daemon in its own event loop thread, HBAs behind fabrics."""

    def __init__(self, home: Path, array: ArrayProc, n: int = 1, conf: str = "") -> None:
        self.home, self.array, self.n = home, array, n
        self.conf = conf or ("defaults {\n user_friendly_names yes\n polling_interval 0.2\n"
                             " no_path_retry queue\n}\n")
        self.faults = home / "faults"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.fabrics: list[Fabric] = []
        self.mpd: Any = None
        self.guests: list[NbdClient] = []

    def call(self, fn: Callable[[], Any], timeout: float = DEADLINE) -> Any:
        """Run ``fn`` in the host's loop (a coroutine function or a plain one)."""
        async def run() -> Any:
            out = fn()
            return await out if asyncio.iscoroutine(out) else out

        fut = asyncio.run_coroutine_threadsafe(run(), self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise AssertionError(f"the host did not answer within {timeout} s") from None

    def until(self, what: str, pred: Callable[[], Any], timeout: float = DEADLINE) -> Any:
        """Wait (in the host's loop, checked on every turn of it) for ``pred``."""
        async def watch() -> Any:
            deadline = self.loop.time() + timeout
            while not (got := pred()):
                if self.loop.time() > deadline:
                    raise AssertionError(f"timed out waiting for {what}")
                await asyncio.sleep(0.002)
            return got

        return self.call(watch, timeout + 5)

    def start(self, io_timeout: float | None = None, fence_timeout: float | None = None
              ) -> None:
        from sanvisor.storage.multipathd import Multipathd
        from sanvisor.storage.scsi import ScsiTable

        self.thread.start()
        self.faults.mkdir(parents=True, exist_ok=True)
        for k in (0, 1):
            fab = Fabric(self.array.port, hba_address(self.n, k))
            self.call(fab.start)
            self.fabrics.append(fab)
        hbas = [{"index": k, "wwpn": wwpn(self.n, k), "address": hba_address(self.n, k),
                 "ifname": "", "target": f"127.0.0.1:{self.fabrics[k].port}",
                 "fault_file": str(self.faults / hba_address(self.n, k))} for k in (0, 1)]
        (self.home / "host.json").write_text(json.dumps({"hbas": hbas}))
        (self.home / "multipath.conf").write_text(self.conf)
        ScsiTable(self.home).rescan()
        self.mpd = Multipathd(self.home)
        if io_timeout is not None:
            self.mpd.io_timeout = io_timeout
        if fence_timeout is not None:
            self.mpd.fence_timeout = fence_timeout
        self.call(self.mpd.start)
        self.until("every path ready", lambda: self.mpd.paths and all(
            p.ready for p in self.mpd.paths.values()))

    def stop(self) -> None:
        for g in self.guests:
            g.close()
        if self.thread.is_alive():
            with contextlib.suppress(Exception):
                if self.mpd is not None:
                    self.call(self.mpd.stop)
            for fab in self.fabrics:
                with contextlib.suppress(Exception):
                    self.call(fab.close)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        self.loop.close()

    # views and faults
    def map(self) -> Any:
        return next(iter(self.mpd.maps.values()))

    def path(self, k: int) -> Any:
        return next(p for p in self.map().paths if p.hba.index == k)

    def view(self) -> dict[str, Any]:
        return dict(self.call(lambda: self.map().view()))

    @property
    def engine(self) -> Any:
        """The engine's supervisor (storage/engine.py)."""
        return self.mpd.backend.engine

    def hba_down(self, k: int) -> None:
        (self.faults / hba_address(self.n, k)).touch()

    def hba_up(self, k: int) -> None:
        (self.faults / hba_address(self.n, k)).unlink(missing_ok=True)

    def guest(self) -> NbdClient:
        """QEMU's place: an NBD client on /dev/mapper/NAME's socket."""
        m = self.map()
        c = NbdClient(str(self.home / "mapper" / f"{m.name}.sock"), timeout=DEADLINE)
        self.guests.append(c)
        c.go(m.name)
        return c


class Replies:
    """Reads a guest connection's replies on a thread; an event per reply."""

    def __init__(self, guest: NbdClient) -> None:
        self.guest = guest
        guest.sock.settimeout(None)  # each wait has its own deadline
        self.got: dict[int, tuple[int, bytes]] = {}
        self.events: dict[int, threading.Event] = {}
        self.any = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def event(self, cookie: int) -> threading.Event:
        with self._lock:
            return self.events.setdefault(cookie, threading.Event())

    def send(self, cmd: int, offset: int, length: int, data: bytes = b"") -> int:
        cookie = self.guest.send(cmd, offset, length, data)
        self.event(cookie)
        return cookie

    def _run(self) -> None:
        try:
            while True:
                cookie, err, data = self.guest.receive()
                self.got[cookie] = (err, data)
                self.event(cookie).set()
                self.any.set()
        except BaseException as exc:  # the connection closed: the test is over
            self.error = exc
            self.any.set()

    def wait(self, cookie: int, timeout: float = DEADLINE) -> tuple[int, bytes]:
        assert self.events[cookie].wait(timeout), f"no reply to request {cookie}"
        return self.got[cookie]

    def io(self, cmd: int, offset: int, length: int, data: bytes = b"") -> tuple[int, bytes]:
        return self.wait(self.send(cmd, offset, length, data))


@contextlib.contextmanager
def bench(hosts: int = 2, conf: str = "", io_timeout: float | None = None,
          fence_timeout: float | None = None,
          luns: tuple[tuple[str, str], ...] = (("sys", "64M"),)
          ) -> Iterator[tuple[ArrayProc, Host]]:
    """An array and host1's multipath daemon (two HBAs, each behind a fabric)."""
    root = Path(tempfile.mkdtemp(prefix="svdp", dir="/tmp"))
    arr = host = None
    try:
        (root / "array").mkdir()
        (root / "host1").mkdir()
        arr = make_array(root / "array", hosts, luns)
        host = Host(root / "host1", arr, 1, conf)
        host.start(io_timeout, fence_timeout)
        yield arr, host
    finally:
        if host is not None:
            host.stop()
        if arr is not None:
            arr.stop()
        shutil.rmtree(root, ignore_errors=True)
