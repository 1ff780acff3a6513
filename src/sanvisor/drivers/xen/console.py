"""A Xen domain's console on the agent's host, as for a QEMU guest: ``console.sock``
(any number of clients; what they type goes to the guest) and ``console.log``.

Behind it runs ``xl console -t pv NAME`` in dom0 on a pseudo-terminal, through the
command channel. It is started while the domain is still paused after
``xl create -p``/``xl restore -p``, so the log holds the boot from its first line.
When it ends (the domain rebooted under a new domid, or the channel broke) it is
started again as long as the relay is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)
RESTART_DELAY = 0.5  # between two `xl console` runs, should one end at once


class DomProc(Protocol):
    err: bytearray

    def write(self, data: bytes, deadline: float | None = None) -> None: ...
    def close_stdin(self) -> None: ...
    def kill(self, signum: int = 9) -> None: ...
    def wait(self, timeout: float | None = None) -> int: ...


Spawn = Callable[..., DomProc]


class ConsoleRelay:
    def __init__(self, spawn: Spawn, name: str, rundir: Path) -> None:
        self.spawn = spawn
        self.name = name
        self.sock_path = rundir / "console.sock"
        self.log_path = rundir / "console.log"
        self._clients: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None
        self._proc: DomProc | None = None
        self._task: asyncio.Task[None] | None = None
        self._log_fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._started = asyncio.Event()

    async def start(self) -> None:
        """Listen on console.sock and attach to the domain's console."""
        self._loop = asyncio.get_running_loop()
        self.sock_path.parent.mkdir(parents=True, exist_ok=True)
        self.sock_path.unlink(missing_ok=True)
        self._log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND
                               | os.O_CLOEXEC, 0o600)
        self._server = await asyncio.start_unix_server(self._client, path=str(self.sock_path))
        os.chmod(self.sock_path, 0o600)
        self._task = asyncio.create_task(self._run(), name=f"xl-console-{self.name}")
        await self._started.wait()

    async def _run(self) -> None:
        while not self._closed:
            try:
                self._proc = await asyncio.to_thread(
                    self.spawn, ["xl", "console", "-t", "pv", self.name], pty=True,
                    on_out=self._from_thread)
            except Exception as exc:  # the channel is down: try again later
                log.warning("%s: xl console: %s", self.name, exc)
                self._started.set()
                await asyncio.sleep(RESTART_DELAY * 4)
                continue
            self._started.set()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._proc.wait)
            self._proc = None
            if not self._closed:
                await asyncio.sleep(RESTART_DELAY)

    def _from_thread(self, data: bytes) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is shutting down
                loop.call_soon_threadsafe(self._deliver, data)

    def _deliver(self, data: bytes) -> None:
        if self._log_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self._log_fd, data)
        for w in list(self._clients):
            if w.is_closing():
                self._clients.discard(w)
            else:
                w.write(data)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        self._clients.add(writer)
        try:
            while data := await reader.read(4096):
                proc = self._proc
                if proc is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(proc.write, data)
        finally:
            self._clients.discard(writer)
            writer.close()

    async def close(self) -> None:
        self._closed = True
        if self._proc is not None:
            with contextlib.suppress(Exception):
                self._proc.kill()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._server is not None:
            self._server.close()
        for w in list(self._clients):
            w.close()
        self._clients.clear()
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
        self.sock_path.unlink(missing_ok=True)
