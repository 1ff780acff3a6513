"""The data-path engine's process: found, started, adopted, watched, restarted.

The engine (``sanvisor-engine``, built from ``engine/`` by scripts/setup.sh) runs
per host beside the agent, in the host's network namespace, with its files under
HOME/engine/ (control.sock, engine.pid, engine.log, sessions). It outlives the
agent (guests keep their I/O while the agent restarts): a new agent adopts the
running engine through its control socket. If the engine dies, the agent starts
another and gives it the whole configuration again (``on_restart``); QEMU's
connections wait in the listening sockets' backlog meanwhile (the agent owns
those sockets), and the new engine fences the old one's sessions at the array
before it sends anything (docs/dataplane.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from sanvisor.errors import DeviceError, ResourceError
from sanvisor.storage import engineproto as E

log = logging.getLogger("sanvisor.multipath")
START_TIMEOUT = 5.0  # seconds for a new engine to answer on its control socket
REQUEST_TIMEOUT = 10.0
IDLE_EXIT = 5.0  # an engine without agent and without client ends after this long


SOURCE_BUILD = Path(__file__).resolve().parents[3] / "build" / "engine" / "sanvisor-engine"


def engine_binary() -> Path:
    """$SANVISOR_ENGINE if set (it must be there), else the source tree's build
    (scripts/setup.sh makes it), else beside this Python (an installed one). There is
    no other data path: without it, a ResourceError that says how to build it."""
    env = os.environ.get("SANVISOR_ENGINE")
    if env:
        if not (Path(env).is_file() and os.access(env, os.X_OK)):
            raise ResourceError(f"SANVISOR_ENGINE={env}: no such executable (build the "
                                "data-path engine with scripts/setup.sh or make -C engine)")
        return Path(env)
    candidates = [SOURCE_BUILD, Path(sys.executable).parent / "sanvisor-engine"]
    found = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
    if found is None:
        raise ResourceError(f"the data-path engine is not built ({SOURCE_BUILD} is missing): "
                            "run scripts/setup.sh, or make -C engine OUT=$PWD/build/engine "
                            "in the source tree")
    return found


class Link:
    """One control connection: requests answered in order, events to a callback."""

    def __init__(self, path: Path, on_event: Callable[[dict[str, object]], None],
                 on_lost: Callable[[], None]) -> None:
        self.path = path
        self.on_event, self.on_lost = on_event, on_lost
        self.sock: socket.socket | None = None
        self._buf = b""
        self._pending: collections.deque[asyncio.Future[E.Reply]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await self._loop.sock_connect(sock, str(self.path))
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self._loop.add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(sock.fileno())
            sock.close()
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(ConnectionError("the engine went away"))

    def _readable(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            self.on_lost()
            return
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for raw in lines:
            try:
                reply = E.parse(raw)
            except ValueError as exc:
                log.warning("engine: %s", exc)
                continue
            if reply.kind == "event":
                self.on_event(reply.data)
            elif self._pending:
                fut = self._pending.popleft()
                if not fut.done():
                    fut.set_result(reply)

    async def _send(self, data: bytes, fds: list[int]) -> None:
        assert self._loop is not None
        view = memoryview(data)
        while view:
            if self.sock is None:
                raise ConnectionError("the engine went away")
            try:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                        b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds))] if fds else []
                n = self.sock.sendmsg([view], anc)
                fds = []  # sent with the first byte
                view = view[n:]
            except BlockingIOError:
                ready: asyncio.Future[None] = self._loop.create_future()
                fd = self.sock.fileno()
                self._loop.add_writer(fd, _wake, ready)
                try:
                    await asyncio.wait_for(ready, REQUEST_TIMEOUT)
                finally:
                    self._loop.remove_writer(fd)

    def send_nowait(self, raw: bytes) -> asyncio.Future[E.Reply]:
        """Queue a request whose reply nobody awaits (logged if refused)."""
        assert self._loop is not None
        fut: asyncio.Future[E.Reply] = self._loop.create_future()
        self._pending.append(fut)
        task = asyncio.ensure_future(self._send(raw, []))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        fut.add_done_callback(_log_refusal)
        return fut

    async def request(self, raw: bytes, fds: list[int] | None = None) -> E.Reply:
        assert self._loop is not None
        fut: asyncio.Future[E.Reply] = self._loop.create_future()
        self._pending.append(fut)
        await self._send(raw, fds or [])
        reply = await asyncio.wait_for(fut, REQUEST_TIMEOUT)
        if reply.kind == "error":
            raise DeviceError(f"the data-path engine refused {raw.split()[0].decode()}: "
                              f"{reply.message}", request=raw.decode(errors="replace")[:200])
        return reply


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _log_refusal(fut: asyncio.Future[E.Reply]) -> None:
    if not fut.cancelled() and fut.exception() is None and fut.result().kind == "error":
        log.warning("engine refused a request: %s", fut.result().message)


class Engine:
    """The engine of one host: start or adopt it, talk to it, restart it if it dies."""

    def __init__(self, home: Path, on_event: Callable[[dict[str, object]], None],
                 on_restart: Callable[[], Awaitable[None]]) -> None:
        self.dir = home / "engine"
        self.control = self.dir / "control.sock"
        self.pidfile = self.dir / "engine.pid"
        self.on_event, self.on_restart = on_event, on_restart
        self.link: Link | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.restarts = 0
        self._stopping = False
        self._sync: socket.socket | None = None
        self._query_lock = threading.Lock()
        self._restarter: asyncio.Task[None] | None = None

    # ---- life -----------------------------------------------------------------------
    async def start(self) -> None:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        if not await self._adopt():
            await self._spawn()

    def _alive(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return b"sanvisor-engine" in cmdline and str(self.control).encode() in cmdline

    async def _adopt(self) -> bool:
        """A running engine of this home (a previous agent's): take it over."""
        try:
            pid = int(self.pidfile.read_text())
        except (OSError, ValueError):
            return False
        if not self._alive(pid):
            return False
        try:
            await self._connect()
        except OSError:
            return False
        self.pid = pid
        log.info("data-path engine %d adopted", pid)
        return True

    async def _spawn(self) -> None:
        binary = engine_binary()
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()
        with open(self.dir / "engine.log", "ab") as out:
            self.proc = subprocess.Popen(
                [str(binary), "--control", str(self.control), "--state", str(self.dir),
                 "--idle-exit", str(IDLE_EXIT)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        self.pid = self.proc.pid
        self.pidfile.write_text(f"{self.pid}\n")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                await self._connect()
                break
            except OSError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise ResourceError(f"the data-path engine did not start: {exc}",
                                        log=str(self.dir / "engine.log")) from None
                await asyncio.sleep(0.005)
        log.info("data-path engine %d started (%s)", self.pid, binary)

    async def _connect(self) -> None:
        link = Link(self.control, self.on_event, self._lost)
        await link.open()
        try:
            hello = await link.request(E.line("hello"))
            if hello.data.get("version") != E.VERSION:
                raise OSError(f"engine protocol version {hello.data.get('version')}")
            await link.request(E.line("watch"))
        except (OSError, DeviceError, TimeoutError):
            link.close()
            raise
        if self._sync is not None:
            self._sync.close()
        sync = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sync.settimeout(2.0)
        sync.connect(str(self.control))
        self.link, self._sync = link, sync

    def _lost(self) -> None:
        if self._stopping:
            return
        code = self.proc.poll() if self.proc is not None else None
        log.warning("data-path engine %d is gone (%s): starting another", self.pid,
                    f"exit status {code}" if code is not None else "control connection lost")
        if self._restarter is None or self._restarter.done():
            self._restarter = asyncio.ensure_future(self._restart())

    async def _restart(self) -> None:
        delay = 0.05
        while not self._stopping:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()  # the control connection broke but it lives: replace it
                self.proc.wait()
            try:
                await self._spawn()
                self.restarts += 1
                await self.on_restart()
                return
            except (ResourceError, DeviceError, OSError, TimeoutError) as exc:
                log.warning("data-path engine restart failed: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def stop(self) -> None:
        """End the engine (the data path of this host stops with it)."""
        self._stopping = True
        if self._restarter is not None:
            self._restarter.cancel()
        if self.link is not None:
            self.link.close()
        if self._sync is not None:
            self._sync.close()
        if self.pid and (self.proc is not None or self._alive(self.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            if self.proc is not None:
                try:
                    await asyncio.to_thread(self.proc.wait, 5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()

    # ---- requests -------------------------------------------------------------------
    async def request(self, raw: bytes, fds: list[int] | None = None) -> E.Reply:
        if self.link is None or self.link.sock is None:
            raise ConnectionError("the engine is not connected")
        return await self.link.request(raw, fds)

    def query(self, raw: bytes) -> E.Reply | None:
        """A request answered at once, from synchronous code (views, and the volumes'
        worker thread: one at a time); None if the engine does not answer (it is being
        restarted)."""
        with self._query_lock:
            return self._query(raw)

    def _query(self, raw: bytes) -> E.Reply | None:
        sock = self._sync
        if sock is None:
            return None
        try:
            sock.sendall(raw)
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("closed")
                buf += chunk
            return E.parse(buf.rstrip(b"\n"))
        except (OSError, ValueError):
            self._sync = None
            sock.close()
            return None
