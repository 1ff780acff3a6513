"""One control connection to the data-path engine (docs/dataplane.md, "The control
protocol"): requests answered in order, events to a callback, and the watchdog's
ping (storage/engine.py supervises the engine with it).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import select
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from sanvisor.errors import DeviceError
from sanvisor.storage import engineproto as E

log = logging.getLogger("sanvisor.multipath")
REQUEST_TIMEOUT = 10.0  # seconds for the engine to answer a request


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
                self._loop.add_writer(fd, wake, ready)
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

    async def ping(self, deadline: float) -> bool:
        """Whether the engine answers ``hello`` within ``deadline`` seconds. A reply
        already in the socket when the deadline passes counts (the agent's own loop
        may have been the slow one)."""
        assert self._loop is not None
        fut: asyncio.Future[E.Reply] = self._loop.create_future()
        self._pending.append(fut)
        start = self._loop.time()
        try:
            await asyncio.wait_for(self._send(E.line("hello"), []), deadline)
        except TimeoutError:  # it does not even read its control socket
            fut.cancel()
            return False
        left = max(0.0, deadline - (self._loop.time() - start))
        done, _ = await asyncio.wait({fut}, timeout=left)
        sock = self.sock
        if not done and sock is not None and select.select([sock], [], [], 0)[0]:
            self._readable()  # what arrived while this loop was busy
        if not fut.done():
            fut.cancel()  # its reply, if it ever comes, is skipped in order
            return False
        return not fut.cancelled() and fut.exception() is None

    async def request(self, raw: bytes, fds: list[int] | None = None,
                      timeout: float = REQUEST_TIMEOUT) -> E.Reply:
        assert self._loop is not None
        fut: asyncio.Future[E.Reply] = self._loop.create_future()
        self._pending.append(fut)
        await self._send(raw, fds or [])
        reply = await asyncio.wait_for(fut, timeout)
        if reply.kind == "error":
            raise DeviceError(f"the data-path engine refused {raw.split()[0].decode()}: "
                              f"{reply.message}", request=raw.decode(errors="replace")[:200])
        return reply


def wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _log_refusal(fut: asyncio.Future[E.Reply]) -> None:
    if not fut.cancelled() and fut.exception() is None and fut.result().kind == "error":
        log.warning("engine refused a request: %s", fut.result().message)
