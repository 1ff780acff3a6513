"""The data-path engine's process: found, started, adopted, watched, restarted.

The engine (``sanvisor-engine``, built from ``engine/`` by scripts/setup.sh) runs
per host beside the agent, in the host's network namespace, with its files under
HOME/engine/ (control.sock, engine.pid, engine.log, sessions). It outlives the
agent (guests keep their I/O while the agent restarts): a new agent adopts the
running engine through its control socket. If the engine dies, the agent starts
another and gives it the whole configuration again (``on_restart``); QEMU's
connections wait in the listening sockets' backlog meanwhile (the agent owns
those sockets), and the new engine fences the old one's sessions at the array
before it sends anything (docs/dataplane.md). An engine that lives but stopped
answering (SIGSTOP, a loop that never ends) is found by the watchdog: a ping on
its control socket every PING_EVERY seconds that must be answered within
SANVISOR_ENGINE_WATCHDOG seconds (2; 0: no watchdog); after a miss the engine is
killed (SIGKILL) and replaced as a dead one is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from sanvisor.errors import ConfigError, DeviceError, ResourceError
from sanvisor.storage import engineproto as E
from sanvisor.storage.enginelink import REQUEST_TIMEOUT, Link, wake

log = logging.getLogger("sanvisor.multipath")
START_TIMEOUT = 5.0  # seconds for a new engine to answer on its control socket
IDLE_EXIT = 5.0  # an engine without agent and without client ends after this long
WATCHDOG = 2.0  # seconds the engine has to answer a ping (SANVISOR_ENGINE_WATCHDOG)
PING_EVERY = 0.5  # seconds between two pings
REAP_TIMEOUT = 5.0  # seconds for a killed engine to be gone before another starts


def watchdog_setting(environ: dict[str, str] | None = None) -> float:
    """SANVISOR_ENGINE_WATCHDOG: seconds a live engine has to answer a ping before it
    is killed and replaced (default 2; 0 turns the watchdog off)."""
    raw = (os.environ if environ is None else environ).get("SANVISOR_ENGINE_WATCHDOG", "")
    if not raw.strip():
        return WATCHDOG
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"SANVISOR_ENGINE_WATCHDOG={raw!r}: seconds (a number >= 0; "
                          "0 turns the watchdog off)", variable="SANVISOR_ENGINE_WATCHDOG")
    return value


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
        self.hangs = 0  # engines killed by the watchdog
        self.watchdog = watchdog_setting()  # seconds; 0: off
        self._stopping = False
        self._sync: socket.socket | None = None
        self._query_lock = threading.Lock()
        self._restarter: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    # ---- life -----------------------------------------------------------------------
    async def start(self) -> None:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        if not await self._adopt():
            await self._spawn()
        if self.watchdog > 0:
            self._watcher = asyncio.create_task(self._watch(), name="engine-watchdog")

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
        deadline = self.watchdog or REQUEST_TIMEOUT
        try:
            await self._connect(deadline)
        except (OSError, DeviceError) as exc:  # alive, silent: not to run beside another
            log.warning("data-path engine %d does not answer (%s): killing it (SIGKILL)",
                        pid, str(exc) or f"nothing within {deadline:g} s")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await self._reap(pid)
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

    async def _connect(self, timeout: float = REQUEST_TIMEOUT) -> None:
        link = Link(self.control, self.on_event, self._lost)
        await link.open()
        try:
            hello = await link.request(E.line("hello"), timeout=timeout)
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

    async def _watch(self) -> None:
        """The watchdog: ping the engine; one that does not answer within ``watchdog``
        seconds is killed and replaced."""
        while not self._stopping:
            await asyncio.sleep(PING_EVERY)
            link, pid = self.link, self.pid
            if link is None or link.sock is None or \
                    (self._restarter is not None and not self._restarter.done()):
                continue  # being restarted
            try:
                answered = await link.ping(self.watchdog)
            except (ConnectionError, OSError):
                continue  # it went away: _lost restarts it
            if answered or self._stopping or link is not self.link:
                continue
            self.hangs += 1
            log.warning("data-path engine %d did not answer a ping within %g s (hung): "
                        "killing it (SIGKILL) and starting another", pid, self.watchdog)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            link.close()
            if self._restarter is None or self._restarter.done():
                self._restarter = asyncio.ensure_future(self._restart())

    async def _reap(self, pid: int) -> None:
        """Wait (REAP_TIMEOUT at most) for a killed engine to be gone: none may run
        beside the next one."""
        if self.proc is not None and self.proc.pid == pid:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.proc.wait, REAP_TIMEOUT)
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return  # gone already
        if not self._alive(pid):  # a zombie, or the number is another process's now
            os.close(fd)
            return
        loop = asyncio.get_running_loop()
        gone: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, wake, gone)
        try:
            await asyncio.wait_for(gone, REAP_TIMEOUT)
        except TimeoutError:
            log.warning("data-path engine %d still there %g s after SIGKILL", pid,
                        REAP_TIMEOUT)
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    async def _restart(self) -> None:
        delay = 0.05
        while not self._stopping:
            if self.pid and self._alive(self.pid):
                # the control connection broke but it lives (ours or adopted): replace it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            if self.pid:
                await self._reap(self.pid)
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
        for task in (self._restarter, self._watcher):
            if task is not None:
                task.cancel()
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
