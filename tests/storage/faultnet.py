"""Fault injection on the wire: a TCP relay between a host's HBA and the array.

It connects to the array from the HBA's own address (so zoning sees the real
initiator) and injects faults on demand: ``blackhole()`` (a cut link: nothing
passes and nobody is told, so the array's end stays half-open), ``reset()``,
``cut_replies_after(n)`` (a link dying in the middle of a reply, silently or
with a reset), ``chunk_replies(sizes)`` (the array's bytes delivered in small
pieces). Runs in the host's event loop (harness.Host.call).
"""

from __future__ import annotations

import asyncio


class _Link:
    def __init__(self, hw: asyncio.StreamWriter, aw: asyncio.StreamWriter) -> None:
        self.hw, self.aw = hw, aw
        self.dead = False  # blackholed: nothing passes, nobody is told
        self.reply_budget: int | None = None  # array->host bytes left before the cut
        self.cut_mode = "blackhole"
        self.chunks: list[int] = []


class Fabric:
    """A relay from one HBA address to the array, with faults on demand."""

    def __init__(self, array_port: int, source: str) -> None:
        self.array = ("127.0.0.1", array_port)
        self.source = source
        self.links: list[_Link] = []
        self.dead = False
        self.port = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in self.links:
            link.hw.transport.abort()
            link.aw.transport.abort()

    # faults (call in the host's loop: Host.call)
    def blackhole(self) -> None:
        """The link is cut: new connections go nowhere, open ones carry nothing more,
        and neither end is told (the array's side stays half-open)."""
        self.dead = True
        for link in self.links:
            link.dead = True

    def heal(self) -> None:
        self.dead = False

    def reset(self) -> None:
        for link in self.links:
            link.hw.transport.abort()
            link.aw.transport.abort()

    def cut_replies_after(self, n: int, mode: str = "blackhole") -> None:
        """Open links pass ``n`` more bytes from the array, then are cut (blackhole, or
        reset: both ends see a reset)."""
        for link in self.links:
            link.reply_budget, link.cut_mode = n, mode

    def chunk_replies(self, sizes: list[int]) -> None:
        """Open links deliver the array's bytes in pieces of these sizes (cycled)."""
        for link in self.links:
            link.chunks = list(sizes)

    async def _conn(self, hr: asyncio.StreamReader, hw: asyncio.StreamWriter) -> None:
        if self.dead:
            await hr.read()  # a cut link: the SYN went nowhere; the host's timeout ends it
            hw.transport.abort()
            return
        try:
            ar, aw = await asyncio.open_connection(*self.array, local_addr=(self.source, 0))
        except OSError:
            hw.transport.abort()
            return
        link = _Link(hw, aw)
        self.links.append(link)
        try:
            await asyncio.gather(self._pump(link, hr, aw, up=True),
                                 self._pump(link, ar, hw, up=False))
        finally:
            self.links.remove(link)

    async def _pump(self, link: _Link, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                    up: bool) -> None:
        try:
            while data := await r.read(1 << 16):
                if link.dead:
                    continue
                if not up and link.reply_budget is not None:
                    data = data[:link.reply_budget]
                    link.reply_budget -= len(data)
                    self._write(link, w, data, up)
                    if link.reply_budget == 0:
                        await w.drain()
                        link.dead = True
                        if link.cut_mode == "reset":
                            link.hw.transport.abort()
                            link.aw.transport.abort()
                    continue
                self._write(link, w, data, up)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        if not link.dead:  # an end closed or reset: the other end sees it (a live link)
            w.transport.abort()

    @staticmethod
    def _write(link: _Link, w: asyncio.StreamWriter, data: bytes, up: bool) -> None:
        if up or not link.chunks:
            w.write(data)
            return
        i = 0
        pos = 0
        while pos < len(data):
            n = max(1, link.chunks[i % len(link.chunks)])
            w.write(data[pos:pos + n])
            pos += n
            i += 1
