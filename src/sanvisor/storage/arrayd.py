"""The disk array daemon: serves LUNs over NBD, one listener per fabric.

Fixed newstyle handshake (OPT_GO/INFO/LIST/EXPORT_NAME/ABORT), simple replies,
READ/WRITE (FUA)/FLUSH (fdatasync: a FLUSHed write survives the array being
killed)/TRIM/WRITE_ZEROES/DISC, any number of requests in flight (answered in
order). The initiator is known by the address it connects from (its HBA's
address on the fabric); it can list and open only the LUNs zoned to its WWPN.
A client that sends garbage or vanishes loses its connection, nobody else's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import struct
from pathlib import Path

from sanvisor.storage import nbdproto as P
from sanvisor.storage.array import ArrayConfig, ArrayStore, Initiator, Lun

log = logging.getLogger("sanvisor.array")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


class ProtocolViolation(Exception):
    pass


def punch_hole(fd: int, offset: int, length: int) -> bool:
    rc = _libc.fallocate(fd, _PUNCH, ctypes.c_long(offset), ctypes.c_long(length))
    return bool(rc == 0)


class Array:
    def __init__(self, store: ArrayStore, fault_dir: Path | None = None) -> None:
        self.store = store
        self.fault_dir = fault_dir  # loopback lab: a file per "down" initiator address
        self.live: set[Session] = set()
        self._cfg = store.load()
        self._mtime = store.mtime()
        self.sessions = 0

    def config(self) -> ArrayConfig:
        m = self.store.mtime()
        if m != self._mtime:
            self._cfg, self._mtime = self.store.load(), m
        return self._cfg


class Session:
    def __init__(self, array: Array, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.array = array
        self.r = reader
        self.w = writer
        peer = writer.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else "local"

    def cut(self) -> bool:
        """Loopback lab: this initiator's HBA is down; drop the connection."""
        fd = self.array.fault_dir
        return fd is not None and (fd / self.peer).exists()

    async def run(self) -> None:
        if self.cut():
            self.w.transport.abort()
            return
        self.array.live.add(self)
        try:
            await self._run()
        finally:
            self.array.live.discard(self)

    async def _run(self) -> None:
        sock = self.w.get_extra_info("socket")
        if sock is not None:
            # a host whose HBA died leaves a half-open connection: reap it in ~10 s
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 5)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 5)
        cfg = self.array.config()
        ini = cfg.initiator_at(self.peer)
        try:
            lun = await self.handshake(cfg, ini)
            if lun is not None:
                log.info("%s (%s) opened LUN %d", self.peer, ini.wwpn if ini else "?", lun.id)
                await self.transmission(lun)
        except (asyncio.IncompleteReadError, ConnectionError, ProtocolViolation) as exc:
            log.info("%s: connection dropped: %s", self.peer, exc or type(exc).__name__)
        finally:
            with contextlib.suppress(Exception):
                self.w.close()
                await self.w.wait_closed()

    # ---- handshake ----------------------------------------------------------------------
    def _visible(self, cfg: ArrayConfig, ini: Initiator | None) -> list[Lun]:
        return cfg.visible_to(ini.wwpn) if ini else []

    async def handshake(self, cfg: ArrayConfig, ini: Initiator | None) -> Lun | None:
        self.w.write(struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT,
                                 P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", await self.r.readexactly(4))
        no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
        while True:
            magic, opt, length = P.OPT_HEADER.unpack(await self.r.readexactly(16))
            if magic != P.IHAVEOPT or length > 65536:
                raise ProtocolViolation("bad option header")
            data = await self.r.readexactly(length)
            visible = {lun.wwid: lun for lun in self._visible(cfg, ini)}
            if opt == P.OPT_EXPORT_NAME:
                lun = visible.get(data.decode(errors="replace"))
                if lun is None:
                    raise ProtocolViolation("EXPORT_NAME of an export it may not see")
                self.w.write(struct.pack(">QH", lun.size, self.tflags()))
                if not no_zeroes:
                    self.w.write(b"\0" * 124)
                return lun
            if opt == P.OPT_ABORT:
                self.w.write(P.option_reply(opt, P.REP_ACK))
                await self.w.drain()
                return None
            if opt == P.OPT_LIST:
                for lun in visible.values():
                    name = lun.wwid.encode()
                    self.w.write(P.option_reply(
                        opt, P.REP_SERVER,
                        struct.pack(">I", len(name)) + name + lun.description().encode()))
                self.w.write(P.option_reply(opt, P.REP_ACK))
            elif opt in (P.OPT_INFO, P.OPT_GO):
                lun = self.parse_info_request(data, visible)
                if lun is None:
                    self.w.write(P.option_reply(opt, P.REP_ERR_UNKNOWN, b"no such export"))
                else:
                    for info in (P.info_export(lun.size, self.tflags()),
                                 P.info_block_size(1, 4096, P.MAX_REQUEST),
                                 P.info_description(lun.description())):
                        self.w.write(P.option_reply(opt, P.REP_INFO, info))
                    self.w.write(P.option_reply(opt, P.REP_ACK))
                    if opt == P.OPT_GO:
                        await self.w.drain()
                        return lun
            else:  # STARTTLS, STRUCTURED_REPLY, meta contexts...: not offered
                self.w.write(P.option_reply(opt, P.REP_ERR_UNSUP))
            await self.w.drain()

    @staticmethod
    def parse_info_request(data: bytes, visible: dict[str, Lun]) -> Lun | None:
        if len(data) < 6:
            raise ProtocolViolation("short INFO/GO request")
        (nlen,) = struct.unpack(">I", data[:4])
        if 4 + nlen + 2 > len(data):
            raise ProtocolViolation("malformed INFO/GO request")
        name = data[4:4 + nlen].decode(errors="replace")
        if name == "" and len(visible) == 1:
            return next(iter(visible.values()))  # the default export
        return visible.get(name)

    @staticmethod
    def tflags() -> int:
        return (P.TF_HAS_FLAGS | P.TF_SEND_FLUSH | P.TF_SEND_FUA | P.TF_SEND_TRIM
                | P.TF_SEND_WRITE_ZEROES | P.TF_CAN_MULTI_CONN)

    # ---- transmission -----------------------------------------------------------------
    async def transmission(self, lun: Lun) -> None:
        fd = os.open(lun.backing, os.O_RDWR | os.O_CLOEXEC)
        try:
            while True:
                hdr = await self.r.readexactly(P.REQUEST.size)
                magic, flags, cmd, cookie, offset, length = P.REQUEST.unpack(hdr)
                if magic != P.REQUEST_MAGIC:
                    raise ProtocolViolation(f"bad request magic {magic:#x}")
                if cmd == P.CMD_WRITE:
                    if length > P.MAX_REQUEST:
                        raise ProtocolViolation("write larger than the maximum")
                    payload = await self.r.readexactly(length)
                    err = await self.write(fd, lun, flags, offset, payload)
                    self.reply(err, cookie)
                elif cmd == P.CMD_READ:
                    if length > P.MAX_REQUEST or offset + length > lun.size:
                        self.reply(P.EINVAL, cookie)
                    else:
                        try:
                            data = os.pread(fd, length, offset)
                            data += b"\0" * (length - len(data))
                            self.reply(0, cookie, data)
                        except OSError:
                            self.reply(P.EIO, cookie)
                elif cmd == P.CMD_FLUSH:
                    self.reply(await self.flush(fd), cookie)
                elif cmd in (P.CMD_TRIM, P.CMD_WRITE_ZEROES):
                    self.reply(await self.zero(fd, lun, cmd, flags, offset, length), cookie)
                elif cmd == P.CMD_CACHE:
                    self.reply(0, cookie)
                elif cmd == P.CMD_DISC:
                    await self.w.drain()
                    return
                else:
                    self.reply(P.EINVAL, cookie)
                if self.w.transport.get_write_buffer_size() > (4 << 20):
                    await self.w.drain()
        finally:
            os.close(fd)

    def reply(self, err: int, cookie: int, data: bytes = b"") -> None:
        self.w.write(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, err, cookie))
        if data and not err:
            self.w.write(data)

    async def write(self, fd: int, lun: Lun, flags: int, offset: int, data: bytes) -> int:
        if offset + len(data) > lun.size:
            return P.ENOSPC
        try:
            os.pwrite(fd, data, offset)
        except OSError:
            return P.EIO
        if flags & P.CMD_FLAG_FUA:
            return await self.flush(fd)
        return 0

    async def flush(self, fd: int) -> int:
        try:
            await asyncio.to_thread(os.fdatasync, fd)
        except OSError:
            return P.EIO
        return 0

    async def zero(self, fd: int, lun: Lun, cmd: int, flags: int, offset: int,
                   length: int) -> int:
        if offset + length > lun.size:
            return P.ENOSPC if cmd == P.CMD_WRITE_ZEROES else P.EINVAL
        if cmd == P.CMD_TRIM or not flags & P.CMD_FLAG_NO_HOLE:
            if punch_hole(fd, offset, length):
                return await self.flush(fd) if flags & P.CMD_FLAG_FUA else 0
            if cmd == P.CMD_TRIM:
                return 0  # TRIM is advisory
        try:
            chunk = b"\0" * min(length, 1 << 20)
            pos = offset
            while pos < offset + length:
                pos += os.pwrite(fd, chunk[: offset + length - pos], pos)
        except OSError:
            return P.EIO
        return await self.flush(fd) if flags & P.CMD_FLAG_FUA else 0


async def _fault_watch(array: Array) -> None:
    while True:
        await asyncio.sleep(0.05)
        for s in [s for s in array.live if s.cut()]:
            s.w.transport.abort()


async def serve(home: Path, listens: list[tuple[str, int]],
                fault_dir: Path | None = None) -> None:
    array = Array(ArrayStore(home), fault_dir)
    watcher = asyncio.create_task(_fault_watch(array)) if fault_dir else None

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        array.sessions += 1
        try:
            await Session(array, reader, writer).run()
        finally:
            array.sessions -= 1

    servers = [await asyncio.start_server(on_conn, host, port, reuse_address=True)
               for host, port in listens]
    (home / "array.pid").write_text(f"{os.getpid()}\n")
    log.info("array serving on %s", ", ".join(f"{h}:{p}" for h, p in listens))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    for s in servers:
        s.close()
    with contextlib.suppress(FileNotFoundError):
        (home / "array.pid").unlink()


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return (host or "0.0.0.0", int(port or 10809))
