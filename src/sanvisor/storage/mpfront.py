"""The map's NBD server for the guest's QEMU (unix socket): the /dev/mapper/NAME device.

QEMU connects here as to any NBD server; each request it sends becomes a
Request the map routes to a path, and each reply goes back as it arrives
(NBD lets replies come in any order). What the spec forbids is refused here,
never passed to the paths (where the array would cut the path's connection):
a read longer than the advertised maximum payload, an unknown command or flag
get EINVAL; a write whose payload exceeds the maximum (more than 2^25 bytes,
which the spec lets a server treat as denial of service) closes the
connection, as does any malformed request or option. Nothing a client sends
raises out of here: the worst it gets is its own connection closed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct

from sanvisor.storage import nbdproto as P
from sanvisor.storage.mpmap import Map
from sanvisor.storage.paths import Request

log = logging.getLogger("sanvisor.multipath")
TFLAGS = (P.TF_HAS_FLAGS | P.TF_SEND_FLUSH | P.TF_SEND_FUA | P.TF_SEND_TRIM
          | P.TF_SEND_WRITE_ZEROES)
# command -> the flags it may carry (the spec: FUA is valid on every command once
# SEND_FUA is offered, a no-op where nothing is written)
_FLAGS = {P.CMD_READ: P.CMD_FLAG_FUA, P.CMD_WRITE: P.CMD_FLAG_FUA,
          P.CMD_FLUSH: P.CMD_FLAG_FUA, P.CMD_TRIM: P.CMD_FLAG_FUA,
          P.CMD_WRITE_ZEROES: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE}
_CLIENT_FLAGS = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES
MAX_OPTION = 65536  # option data longer than this closes the connection


class Violation(Exception):
    """The client broke a MUST of the protocol: its connection is closed."""


class Front(asyncio.Protocol):
    def __init__(self, mp: Map) -> None:
        self.map = mp
        self.buf = bytearray()
        self.phase = "flags"
        self.no_zeroes = False
        self.transport: asyncio.Transport | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=4 << 20, low=1 << 20)
        transport.write(struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT,
                                    P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.paused:
            self.paused = False
            self.map.throttle(-1)
        self.transport = None

    # Backpressure: when QEMU reads replies slower than the array sends them, stop
    # reading from the paths instead of growing our send buffer (asyncio moves that
    # whole buffer on every send: quadratic for many 1 MiB reads in flight).
    def pause_writing(self) -> None:
        if not self.paused:
            self.paused = True
            self.map.throttle(+1)

    def resume_writing(self) -> None:
        if self.paused:
            self.paused = False
            self.map.throttle(-1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            while self.transport is not None and not self.transport.is_closing() \
                    and self._step():
                pass
        except Exception as exc:  # any bad input ends this connection, and only it
            if not isinstance(exc, Violation):
                log.warning("%s: request parser error (connection closed): %r",
                            self.map.name, exc)
            self.buf.clear()
            if self.transport is not None:
                self.transport.abort()

    def _step(self) -> bool:
        b = self.buf
        if self.phase == "flags":
            if len(b) < 4:
                return False
            (flags,) = struct.unpack_from(">I", b)
            if flags & ~_CLIENT_FLAGS:
                raise Violation(f"unknown client flags {flags:#x}")
            self.no_zeroes = bool(flags & P.FLAG_C_NO_ZEROES)
            del b[:4]
            self.phase = "options"
            return True
        if self.phase == "options":
            if len(b) < 16:
                return False
            magic, opt, length = P.OPT_HEADER.unpack_from(b)
            if magic != P.IHAVEOPT or length > MAX_OPTION:
                raise Violation("bad option")
            if len(b) < 16 + length:
                return False
            data = bytes(b[16:16 + length])
            del b[:16 + length]
            self._option(opt, data)
            return True
        if len(b) < 28:
            return False
        magic, flags, cmd, cookie, offset, length = P.REQUEST.unpack_from(b)
        if magic != P.REQUEST_MAGIC:
            raise Violation("bad request magic")
        if cmd == P.CMD_WRITE and length > P.MAX_REQUEST:
            raise Violation("write payload over the maximum")  # never buffered
        need = 28 + (length if cmd == P.CMD_WRITE else 0)
        if len(b) < need:
            return False
        payload = bytes(b[28:need]) if cmd == P.CMD_WRITE else b""
        del b[:need]
        if cmd == P.CMD_DISC:
            assert self.transport is not None
            self.transport.close()
            return False
        err = self._check(cmd, flags, offset, length)
        if err:
            self._reply(cookie, err, [])
            return True
        self.map.submit(Request(reply=functools.partial(self._reply, cookie), cmd=cmd,
                                flags=flags, offset=offset, length=length, payload=payload))
        return True

    def _check(self, cmd: int, flags: int, offset: int, length: int) -> int:
        """The NBD error for a request the array must not see, else 0."""
        allowed = _FLAGS.get(cmd)
        if allowed is None or flags & ~allowed:
            return P.EINVAL  # a command or flag this export does not offer
        if cmd == P.CMD_READ and length > P.MAX_REQUEST:
            return P.EINVAL
        if cmd != P.CMD_FLUSH and offset + length > self.map.size:
            return P.ENOSPC if cmd in (P.CMD_WRITE, P.CMD_WRITE_ZEROES) else P.EINVAL
        return 0

    def _reply(self, cookie: int, err: int, chunks: list[bytes]) -> None:
        if self.transport is None:
            return
        # one write per chunk: Python 3.11's writelines joins them (a copy of 1 MiB reads)
        write = self.transport.write
        write(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, err, cookie))
        for chunk in chunks:
            write(chunk)

    def _option(self, opt: int, data: bytes) -> None:
        assert self.transport is not None
        w = self.transport.write
        mp = self.map
        if opt == P.OPT_EXPORT_NAME:
            if data.decode(errors="replace") not in ("", mp.name):
                raise Violation("unknown export")  # the spec: no error reply possible
            w(struct.pack(">QH", mp.size, TFLAGS) + (b"" if self.no_zeroes else b"\0" * 124))
            self.phase = "transmission"
        elif opt in (P.OPT_GO, P.OPT_INFO):
            req = P.parse_go_request(data)
            if req is None:
                w(P.option_reply(opt, P.REP_ERR_INVALID, b"malformed GO/INFO"))
                return
            if req[0] not in ("", mp.name):
                w(P.option_reply(opt, P.REP_ERR_UNKNOWN, b"no such multipath device"))
                return
            for info in (P.info_export(mp.size, TFLAGS), P.info_block_size(1, 4096,
                                                                            P.MAX_REQUEST)):
                w(P.option_reply(opt, P.REP_INFO, info))
            w(P.option_reply(opt, P.REP_ACK))
            if opt == P.OPT_GO:
                self.phase = "transmission"
        elif opt == P.OPT_LIST:
            raw = mp.name.encode()
            w(P.option_reply(opt, P.REP_SERVER, struct.pack(">I", len(raw)) + raw))
            w(P.option_reply(opt, P.REP_ACK))
        elif opt == P.OPT_ABORT:
            w(P.option_reply(opt, P.REP_ACK))
            self.transport.close()
        else:
            w(P.option_reply(opt, P.REP_ERR_UNSUP))
