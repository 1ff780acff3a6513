"""One path to the array: an NBD connection through one HBA (asyncio Protocol).

A path forwards requests from its map and hands replies back. It fails when
its HBA's link goes down (checked every 50 ms, as an FC HBA reports a lost
link at once) or its connection breaks; its in-flight requests then go back to
the map, which resends them on another path: the guest sees no error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any

from sanvisor.storage import nbdproto as P
from sanvisor.storage.scsi import HbaConf, ScsiPath

log = logging.getLogger("sanvisor.multipath")


@dataclass
class Request:
    """A guest's request, kept until answered so it can be resent on another path."""

    reply: Callable[[int, list[bytes]], None]  # (error, data chunks) -> to the guest
    cmd: int
    flags: int
    offset: int
    length: int
    payload: bytes = b""
    tries: int = 0
    queued_at: float = 0.0


@dataclass
class PathStats:
    read_bytes: int = 0
    written_bytes: int = 0
    requests: int = 0
    failures: int = 0


class ArrayLink(asyncio.Protocol):
    """The transmission phase on one path: send requests, parse simple replies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.buf = bytearray()
        self.want: tuple[Request, int, int] | None = None  # (req, err, bytes left)
        self.chunks: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        """Replies, parsed without copying read payloads more than once: payload bytes
        are taken straight from what arrived (a 1 MiB read comes in many pieces)."""
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            if self.want is not None:
                req, err, left = self.want
                take = min(left, len(view) - pos)
                self.chunks.append(data if take == len(data) else bytes(view[pos:pos + take]))
                pos += take
                left -= take
                if left:
                    self.want = (req, err, left)
                    return
                self.want = None
                self.path.stats.read_bytes += req.length
                req.reply(0, self.chunks)
                self.chunks = []
                continue
            need = 16 - len(self.buf)
            self.buf += view[pos:pos + need]
            pos += min(need, len(view) - pos)
            if len(self.buf) < 16:
                return
            magic, err, cookie = P.SIMPLE_REPLY.unpack(self.buf)
            self.buf.clear()
            done = self.path.inflight.pop(cookie, None)
            if magic != P.SIMPLE_REPLY_MAGIC or done is None:
                self.path.fail("garbled reply from the array")
                return
            if done.cmd == P.CMD_READ and not err:
                self.want = (done, err, done.length)
                continue
            if done.cmd == P.CMD_WRITE and not err:
                self.path.stats.written_bytes += done.length
            done.reply(err, [])

    def connection_lost(self, exc: Exception | None) -> None:
        self.path.fail(f"connection lost: {exc or 'closed by the array'}")


class Path:
    def __init__(self, scsi: ScsiPath, hba: HbaConf, on_change: Callable[[Path], None]) -> None:
        self.scsi = scsi
        self.hba = hba
        self.on_change = on_change
        self.state = "faulty"
        self.reason = "not connected yet"
        self.link: ArrayLink | None = None
        self.inflight: dict[int, Request] = {}
        self.stats = PathStats()
        self._cookies = itertools.count(1)
        self._connecting = False
        self._writer: asyncio.StreamWriter | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def link_up(self) -> bool:
        if self.hba.fault_file:  # a loopback lab has no link to look at
            return not FsPath(self.hba.fault_file).exists()
        try:
            state = (FsPath("/sys/class/net") / self.hba.ifname / "operstate").read_text()
        except OSError:
            return False
        return state.strip() != "down"

    async def connect(self, timeout: float = 2.0) -> bool:
        """(Re)open the path: handshake through this HBA's address, then transmission."""
        if self._connecting or self.ready:
            return self.ready
        self._connecting = True
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                self.hba.target_host, self.hba.target_port,
                local_addr=(self.hba.address, 0)), timeout)
            try:
                await asyncio.wait_for(self._handshake(reader, writer), timeout)
            except BaseException:
                writer.close()
                raise
            link = ArrayLink(self)
            self._writer = writer  # a StreamWriter that is collected closes its transport
            transport = writer.transport
            assert isinstance(transport, asyncio.Transport)
            transport.set_protocol(link)
            link.connection_made(transport)
            self.link = link
            self.state, self.reason = "ready", ""
            log.info("path %s (%s) is ready", self.scsi.hctl, self.scsi.dev)
            self.on_change(self)
            return True
        except (TimeoutError, OSError, ConnectionError, ValueError) as exc:
            self.reason = f"{type(exc).__name__}: {exc}"
            return False
        finally:
            self._connecting = False

    async def _handshake(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        magic, opt, _flags = struct.unpack(">QQH", await r.readexactly(18))
        if magic != P.NBDMAGIC or opt != P.IHAVEOPT:
            raise ValueError("not an NBD array")
        name = self.scsi.wwid.encode()
        w.write(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
                + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 4 + len(name) + 2)
                + struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        while True:
            _m, _o, rtype, length = P.OPT_REPLY.unpack(await r.readexactly(20))
            data = await r.readexactly(length)
            if rtype == P.REP_ACK:
                return
            if rtype & (1 << 31):
                raise ValueError(f"the array refused LUN {self.scsi.wwid}: {data!r}")

    def send(self, req: Request) -> None:
        assert self.link is not None and self.link.transport is not None
        cookie = next(self._cookies)
        self.inflight[cookie] = req
        self.stats.requests += 1
        hdr = P.REQUEST.pack(P.REQUEST_MAGIC, req.flags, req.cmd, cookie, req.offset,
                             req.length if req.cmd != P.CMD_FLUSH else 0)
        if req.cmd == P.CMD_WRITE:
            self.link.transport.writelines([hdr, req.payload])
        else:
            self.link.transport.write(hdr)

    def fail(self, why: str) -> None:
        if self.state == "faulty":
            return
        log.warning("path %s (%s) failed: %s", self.scsi.hctl, self.scsi.dev, why)
        self.state, self.reason = "faulty", why
        self.stats.failures += 1
        link, self.link = self.link, None
        if link is not None and link.transport is not None:
            with contextlib.suppress(Exception):
                # Reset, do not close: a closed socket keeps retransmitting what it had
                # queued once the link returns, and the array would then apply a write
                # we already resent elsewhere, over newer data (seen: blocks lost).
                sock = link.transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                link.transport.abort()
        self.on_change(self)

    def set_reading(self, on: bool) -> None:
        link = self.link
        if link is not None and link.transport is not None:
            with contextlib.suppress(RuntimeError):
                (link.transport.resume_reading if on else link.transport.pause_reading)()

    def take_inflight(self) -> list[Request]:
        reqs = list(self.inflight.values())
        self.inflight.clear()
        return reqs

    def view(self) -> dict[str, Any]:
        return {"hctl": self.scsi.hctl, "dev": self.scsi.dev, "state": self.state,
                "reason": self.reason, "hba": self.hba.index, "inflight": len(self.inflight),
                **vars(self.stats)}


