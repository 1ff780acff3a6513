"""One path to the array: an NBD connection through one HBA (asyncio Protocol).

A path forwards requests from its map and hands replies back. It fails when
its HBA's link goes down (checked every 50 ms, as an FC HBA reports a lost
link at once), its connection breaks, or a request waits too long for its
reply; its in-flight requests then go back to the map, which resends them on
another path (writes only once the array has fenced this path's session: see
fence.py): the guest sees no error. A request stays in flight until its reply
is complete (a read's data included).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
import time
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
    tries: int = 0  # paths it was in flight on when they failed
    queued_at: float = 0.0
    sent_at: float = 0.0  # when it was last sent on a path (I/O timeout)


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
        self.want: tuple[int, Request, int] | None = None  # a read's (cookie, req, left)
        self.chunks: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        """Replies, parsed without copying read payloads more than once: payload bytes
        are taken straight from what arrived (a 1 MiB read comes in many pieces). A
        read leaves the in-flight table only once all its data is here: a path that
        dies in the middle of it has it resent."""
        if self.path.link is not self:
            return  # a late callback of a connection already failed and replaced
        view = memoryview(data)
        pos = 0
        inflight = self.path.inflight
        while pos < len(view):
            if self.want is not None:
                cookie, req, left = self.want
                take = min(left, len(view) - pos)
                self.chunks.append(data if take == len(data) else bytes(view[pos:pos + take]))
                pos += take
                left -= take
                if left:
                    self.want = (cookie, req, left)
                    return
                self.want = None
                inflight.pop(cookie, None)
                self.path.stats.read_bytes += req.length
                chunks, self.chunks = self.chunks, []
                req.reply(0, chunks)
                if self.path.link is not self:
                    return  # the reply's consumer failed this path meanwhile
                continue
            need = 16 - len(self.buf)
            self.buf += view[pos:pos + need]
            pos += min(need, len(view) - pos)
            if len(self.buf) < 16:
                return
            magic, err, cookie = P.SIMPLE_REPLY.unpack(self.buf)
            self.buf.clear()
            done = inflight.get(cookie)
            if magic != P.SIMPLE_REPLY_MAGIC or done is None:
                self.path.fail("garbled reply from the array")
                return
            if done.cmd == P.CMD_READ and not err:
                self.want = (cookie, done, done.length)
                if done.length:
                    continue
                self.want = None  # a zero-length read: no data follows
            del inflight[cookie]
            if done.cmd == P.CMD_WRITE and not err:
                self.path.stats.written_bytes += done.length
            done.reply(err, [])
            if self.path.link is not self:
                return

    def connection_lost(self, exc: Exception | None) -> None:
        if self.path.link is self:
            self.path.fail(f"connection lost: {exc or 'closed by the array'}")


class Path:
    def __init__(self, scsi: ScsiPath, hba: HbaConf, on_change: Callable[[Path], None]) -> None:
        self.scsi = scsi
        self.hba = hba
        self.on_change = on_change
        self.state = "faulty"
        self.reason = "not connected yet"
        self.link: ArrayLink | None = None
        self.session: int | None = None  # the array's id of our session (fencing)
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
        return link_up(self.hba.ifname)

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
                session = await asyncio.wait_for(self._handshake(reader, writer), timeout)
            except BaseException:
                writer.transport.abort()
                raise
            link = ArrayLink(self)
            self._writer = writer  # a StreamWriter that is collected closes its transport
            transport = writer.transport
            assert isinstance(transport, asyncio.Transport)
            transport.set_protocol(link)
            link.connection_made(transport)
            self.link = link
            self.session = session
            self.state, self.reason = "ready", ""
            log.info("path %s (%s) is ready", self.scsi.hctl, self.scsi.dev)
            self.on_change(self)
            return True
        except (TimeoutError, OSError, ConnectionError, ValueError) as exc:
            self.reason = f"{type(exc).__name__}: {exc}"
            return False
        finally:
            self._connecting = False

    async def _handshake(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> int:
        """GO, asking for the session id the array fences by; returns it."""
        magic, opt, _flags = struct.unpack(">QQH", await r.readexactly(18))
        if magic != P.NBDMAGIC or opt != P.IHAVEOPT:
            raise ValueError("not an NBD array")
        data = P.go_request(self.scsi.wwid, (P.INFO_X_SESSION,))
        w.write(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
                + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_GO, len(data)) + data)
        session = None
        while True:
            _m, _o, rtype, length = P.OPT_REPLY.unpack(await r.readexactly(20))
            if length > 65536:
                raise ValueError("oversized option reply")
            data = await r.readexactly(length)
            if rtype == P.REP_INFO and len(data) == 10 and \
                    struct.unpack_from(">H", data)[0] == P.INFO_X_SESSION:
                (session,) = struct.unpack_from(">Q", data, 2)
            elif rtype == P.REP_ACK:
                if session is None:  # its writes could never be fenced: do not use it
                    raise ValueError("the array gives no session id: it cannot fence")
                return int(session)
            elif rtype & (1 << 31):
                raise ValueError(f"the array refused LUN {self.scsi.wwid}: {data!r}")

    def send(self, req: Request) -> None:
        assert self.link is not None and self.link.transport is not None
        cookie = next(self._cookies)
        self.inflight[cookie] = req
        req.sent_at = time.monotonic()
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

    def take_inflight(self) -> tuple[int | None, list[Request]]:
        """The failed session's id and what was in flight on it (the map's to resend)."""
        session, self.session = self.session, None
        reqs = list(self.inflight.values())
        self.inflight.clear()
        return session, reqs

    def oldest(self) -> float | None:
        """When the oldest request still in flight was sent (None if none is)."""
        for req in self.inflight.values():
            return req.sent_at
        return None

    def view(self) -> dict[str, Any]:
        return {"hctl": self.scsi.hctl, "dev": self.scsi.dev, "state": self.state,
                "reason": self.reason, "hba": self.hba.index, "inflight": len(self.inflight),
                "session": f"{self.session:016x}" if self.session is not None else None,
                **vars(self.stats)}


SYSFS_NET = FsPath("/sys/class/net")


def link_up(ifname: str, sysfs: FsPath = SYSFS_NET) -> bool:
    """An HBA's link is up when its operstate says so ("up", or "unknown" for drivers
    without one) and it has carrier: "down", "lowerlayerdown", "dormant",
    "notpresent" and "testing" are not up. The carrier is read too: a veth whose peer
    (the switch side) went down loses carrier at once, its operstate follows only
    up to a second later (the kernel's link watch)."""
    base = sysfs / ifname
    try:
        state = (base / "operstate").read_text().strip()
        carrier = (base / "carrier").read_text().strip()
    except OSError:  # no such interface, or carrier unreadable: the interface is down
        return False
    return state in ("up", "unknown") and carrier == "1"


