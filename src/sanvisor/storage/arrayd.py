"""The disk array daemon: serves LUNs over NBD, one listener per fabric.

Fixed newstyle handshake (OPT_GO/INFO/LIST/EXPORT_NAME/ABORT, and the vendor
option OPT_X_FENCE), simple replies, READ/WRITE (FUA)/FLUSH (fdatasync: a
FLUSHed write survives the array being killed)/TRIM/WRITE_ZEROES/DISC, any
number of requests in flight (executed and answered in order: arraytx). The
initiator is known by the address it connects from (its HBA's address on the
fabric); it can list and open only the LUNs zoned to its WWPN. Each opened LUN
is a session with an id (INFO_X_SESSION) that another initiator of the same
host can fence (docs/lab.md, "Fencing"). A client that sends garbage or
vanishes loses its connection, nobody else's.

Bounds (``Limits``; docs/lab.md, "Limits of the array"): a connection must end its
option haggling within ``handshake`` seconds (the time a fence request waits for
the fenced sessions is not counted: that wait has its own bound, ``fence_wait``, and
ends when the client goes away), may send at most MAX_OPTIONS options of at most
MAX_OPTION_DATA bytes each, and an initiator address may hold ``per_initiator``
connections, the array ``connections`` in all: one more is closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import secrets
import signal
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sanvisor.storage import nbdproto as P
from sanvisor.storage.array import ArrayConfig, ArrayStore, Initiator, Lun
from sanvisor.storage.arrayapi import serve_admin, socket_path
from sanvisor.storage.arraypool import PoolWatch
from sanvisor.storage.arraytx import LunSession, ProtocolViolation

log = logging.getLogger("sanvisor.array")
REFUSED_LOG_EVERY = 10.0  # seconds: at most one "too many connections" warning per address
MAX_OPTIONS = 1024  # options per connection (a client needs a few per LUN it sees)
MAX_OPTION_DATA = 8192  # bytes of one option's data (names are at most 4096, NBD spec)


@dataclass(frozen=True)
class Limits:
    handshake: float = 10.0  # s from accept to GO (fence waits not counted), as qemu-nbd
    fence_wait: float = 60.0  # s a fence request waits for the fenced sessions to end
    connections: int = 1024  # connections open at once, all initiators
    per_initiator: int = 128  # ... from one initiator address


class Array:
    def __init__(self, store: ArrayStore, fault_dir: Path | None = None,
                 limits: Limits | None = None) -> None:
        self.store = store
        self.fault_dir = fault_dir  # loopback lab: a file per "down" initiator address
        self.limits = limits or Limits()
        self.live: set[Connection] = set()
        self.sessions: dict[int, LunSession] = {}  # by session id (token)
        self.hooks: Any = None  # test hooks (arrayhooks.Hooks), only with --control
        self._cfg = store.load()
        self._mtime = store.mtime()
        self.pool = PoolWatch(lambda: self.config().luns)
        self.connections = 0
        self.by_peer: dict[str, int] = {}  # open connections per initiator address
        self._refused_logged: dict[str, float] = {}

    def config(self) -> ArrayConfig:
        m = self.store.mtime()
        if m != self._mtime:
            self._cfg, self._mtime = self.store.load(), m
        return self._cfg

    def new_token(self) -> int:
        while True:
            token = secrets.randbits(64)
            if token and token not in self.sessions:
                return token

    async def fence(self, requester: Initiator, tokens: list[int]) -> str | None:
        """End the sessions named (queued requests discarded, the one executing
        finished); None when all are gone, else why it was refused (nothing fenced)."""
        targets = []
        for token in tokens:
            s = self.sessions.get(token)
            if s is None:
                continue  # ended already (or the array restarted since)
            owner = s.initiator
            if owner is None or not (owner.wwpn == requester.wwpn
                                     or (owner.host and owner.host == requester.host)):
                return f"session {token:016x} is not a session of host {requester.host!r}"
            targets.append(s)
        if targets:
            log.warning("%s (host %s) fences session(s) %s", requester.wwpn, requester.host,
                        ", ".join(f"{s.token:016x}" for s in targets))
        await asyncio.gather(*(s.fence() for s in targets))
        return None

    # ---- connections ----------------------------------------------------------------
    def admit(self, peer: str) -> bool:
        """Count a new connection from ``peer`` in, unless it is one too many."""
        lim = self.limits
        n = self.by_peer.get(peer, 0)
        if n >= lim.per_initiator or self.connections >= lim.connections:
            now = time.monotonic()
            if now - self._refused_logged.get(peer, -REFUSED_LOG_EVERY) >= REFUSED_LOG_EVERY:
                if len(self._refused_logged) > 1024:
                    self._refused_logged.clear()
                self._refused_logged[peer] = now
                log.warning("%s: connection refused: %s", peer,
                            f"{n} open from this address (at most {lim.per_initiator})"
                            if n >= lim.per_initiator else
                            f"{self.connections} open in all (at most {lim.connections})")
            return False
        self.by_peer[peer] = n + 1
        self.connections += 1
        self._changed()
        return True

    def leave(self, peer: str) -> None:
        self.connections -= 1
        if (n := self.by_peer[peer] - 1) > 0:
            self.by_peer[peer] = n
        else:
            del self.by_peer[peer]
        self._changed()

    def _changed(self) -> None:
        if self.hooks is not None:
            self.hooks.changed()


class Connection:
    """One initiator connection: the handshake, then (after GO) one LUN session."""

    def __init__(self, array: Array, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.array = array
        self.r = reader
        self.w = writer
        self.peer = peer_of(writer)
        self.session: LunSession | None = None
        self.clock: asyncio.Timeout | None = None  # the handshake's deadline
        self._ahead = b""  # the start of the next option, read while a fence waited

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
            try:
                async with asyncio.timeout(self.array.limits.handshake) as clock:
                    self.clock = clock
                    opened = await self.handshake(cfg, ini)
            except TimeoutError:
                if not clock.expired():
                    raise  # a socket's own ETIMEDOUT
                log.info("%s: connection dropped: no handshake within %g s", self.peer,
                         self.array.limits.handshake)
                return
            if opened and self.session is not None:
                await self.session.run()
        except (asyncio.IncompleteReadError, OSError, ProtocolViolation) as exc:
            log.info("%s: connection dropped: %s", self.peer, exc or type(exc).__name__)
        finally:
            if self.session is not None:
                self.session.finish_unstarted()
                self.array.sessions.pop(self.session.token, None)
            with contextlib.suppress(Exception):
                self.w.close()
                await self.w.wait_closed()

    def open_session(self, lun: Lun, ini: Initiator | None) -> LunSession:
        """The LUN session of this connection, registered (so it can be fenced) before
        the client can know its id."""
        array = self.array
        s = LunSession(array.new_token(), lun, ini, self.peer, self.r, self.w, array.hooks)
        s.on_enospc = array.pool.note_enospc
        array.sessions[s.token] = s
        self.session = s
        log.info("%s (%s) opened LUN %d: session %016x", self.peer,
                 ini.wwpn if ini else "?", lun.id, s.token)
        return s

    # ---- handshake ------------------------------------------------------------------
    def _visible(self, cfg: ArrayConfig, ini: Initiator | None) -> list[Lun]:
        return cfg.visible_to(ini.wwpn) if ini else []

    async def _read(self, n: int) -> bytes:
        head, self._ahead = self._ahead[:n], self._ahead[n:]
        return head + await self.r.readexactly(n - len(head)) if n > len(head) else head

    async def handshake(self, cfg: ArrayConfig, ini: Initiator | None) -> bool:
        """Option haggling; True when a LUN session was opened (self.session)."""
        self.w.write(struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT,
                                 P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", await self._read(4))
        if cflags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES):
            raise ProtocolViolation(f"unknown client flags {cflags:#x}")
        no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            magic, opt, length = P.OPT_HEADER.unpack(await self._read(16))
            if magic != P.IHAVEOPT:
                raise ProtocolViolation("bad option header")
            if length > MAX_OPTION_DATA:  # refused before a byte of it is read
                raise ProtocolViolation(f"option {opt:#x} of {length} bytes (at most "
                                        f"{MAX_OPTION_DATA})")
            data = await self._read(length)
            visible = {lun.wwid: lun for lun in self._visible(cfg, ini)}
            if opt == P.OPT_EXPORT_NAME:
                lun = visible.get(data.decode(errors="replace"))
                if lun is None:
                    raise ProtocolViolation("EXPORT_NAME of an export it may not see")
                self.open_session(lun, ini)
                self.w.write(struct.pack(">QH", lun.size, self.tflags()))
                if not no_zeroes:
                    self.w.write(b"\0" * 124)
                return True
            if opt == P.OPT_ABORT:
                self.w.write(P.option_reply(opt, P.REP_ACK))
                await self.w.drain()
                return False
            if opt == P.OPT_LIST:
                for lun in visible.values():
                    name = lun.wwid.encode()
                    self.w.write(P.option_reply(
                        opt, P.REP_SERVER,
                        struct.pack(">I", len(name)) + name + lun.description().encode()))
                self.w.write(P.option_reply(opt, P.REP_ACK))
            elif opt in (P.OPT_INFO, P.OPT_GO):
                if self._info(opt, data, visible, ini):
                    await self.w.drain()
                    return True
            elif opt == P.OPT_X_FENCE:
                await self._fence(opt, data, ini)
            else:  # STARTTLS, STRUCTURED_REPLY, meta contexts...: not offered
                self.w.write(P.option_reply(opt, P.REP_ERR_UNSUP))
            await self.w.drain()
        raise ProtocolViolation(f"more than {MAX_OPTIONS} options")

    def _info(self, opt: int, data: bytes, visible: dict[str, Lun],
              ini: Initiator | None) -> bool:
        """Answer INFO/GO; True when a GO opened the LUN."""
        req = P.parse_go_request(data)
        if req is None:
            self.w.write(P.option_reply(opt, P.REP_ERR_INVALID, b"malformed INFO/GO"))
            return False
        name, infos = req
        lun = visible.get(name)
        if name == "" and len(visible) == 1:
            lun = next(iter(visible.values()))  # the default export
        if lun is None:
            self.w.write(P.option_reply(opt, P.REP_ERR_UNKNOWN, b"no such export"))
            return False
        replies = [P.info_export(lun.size, self.tflags()),
                   P.info_block_size(1, 4096, P.MAX_REQUEST),
                   P.info_description(lun.description())]
        if opt == P.OPT_GO:
            s = self.open_session(lun, ini)
            if P.INFO_X_SESSION in infos:
                replies.append(P.info_session(s.token))
        for info in replies:
            self.w.write(P.option_reply(opt, P.REP_INFO, info))
        self.w.write(P.option_reply(opt, P.REP_ACK))
        return opt == P.OPT_GO

    async def _fence(self, opt: int, data: bytes, ini: Initiator | None) -> None:
        tokens = P.parse_fence_request(data)
        if tokens is None:
            self.w.write(P.option_reply(opt, P.REP_ERR_INVALID, b"malformed fence"))
        elif ini is None:
            self.w.write(P.option_reply(opt, P.REP_ERR_POLICY, b"unknown initiator"))
        else:
            why = await self._fence_wait(ini, tokens)
            self.w.write(P.option_reply(opt, P.REP_ERR_POLICY, why.encode()) if why
                         else P.option_reply(opt, P.REP_ACK))

    async def _fence_wait(self, ini: Initiator, tokens: list[int]) -> str | None:
        """The array's fence. It waits for the request each fenced session executes
        (an fdatasync may take long): the handshake's clock stops meanwhile, and the
        wait ends (ConnectionError) when the client leaves or after ``fence_wait`` s."""
        loop, clock = asyncio.get_running_loop(), self.clock
        when = clock.when() if clock is not None else None
        left = None if when is None else when - loop.time()
        if clock is not None:
            clock.reschedule(None)
        fence = asyncio.ensure_future(self.array.fence(ini, tokens))
        # a client waits for the reply: a byte now is EOF (it left) or its next option
        peek = None if self._ahead else asyncio.ensure_future(self.r.read(1))
        try:
            async with asyncio.timeout(self.array.limits.fence_wait) as limit:
                if peek is not None:
                    await asyncio.wait((fence, peek), return_when=asyncio.FIRST_COMPLETED)
                    if not fence.done() and not peek.result():
                        raise ConnectionResetError("the client left while its fence waited")
                return await fence
        except TimeoutError:
            if not limit.expired():
                raise
            raise ConnectionAbortedError(f"fence not done within {self.array.limits.fence_wait:g}"
                                         " s (its sessions stay fenced)") from None
        finally:
            fence.cancel()
            if peek is not None:
                if not peek.done():  # it must stop waiting on the reader before the next
                    peek.cancel()  # read (and then has read nothing)
                    await asyncio.wait((peek,))
                if not peek.cancelled() and peek.exception() is None:
                    self._ahead += peek.result()
            if clock is not None and left is not None:
                clock.reschedule(loop.time() + left)

    @staticmethod
    def tflags() -> int:
        return (P.TF_HAS_FLAGS | P.TF_SEND_FLUSH | P.TF_SEND_FUA | P.TF_SEND_TRIM
                | P.TF_SEND_WRITE_ZEROES | P.TF_CAN_MULTI_CONN)


async def _fault_watch(array: Array) -> None:
    while True:
        await asyncio.sleep(0.05)
        for c in [c for c in array.live if c.cut()]:
            c.w.transport.abort()


def peer_of(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) else "local"


def _enough_files(limits: Limits) -> None:
    """Two descriptors a connection (its socket, its LUN): raise the soft limit."""
    want = 2 * limits.connections + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


async def serve(home: Path, listens: list[tuple[str, int]],
                fault_dir: Path | None = None, control: Path | None = None,
                limits: Limits | None = None) -> None:
    array = Array(ArrayStore(home), fault_dir, limits)
    _enough_files(array.limits)
    tasks = [asyncio.create_task(array.pool.watch())]
    if fault_dir:
        tasks.append(asyncio.create_task(_fault_watch(array)))
    ctl = None
    if control is not None:
        from sanvisor.storage.arrayhooks import serve_control

        ctl = await serve_control(array, control)

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_of(writer)
        if not array.admit(peer):
            writer.transport.abort()
            return
        try:
            await Connection(array, reader, writer).run()
        finally:
            array.leave(peer)

    servers: list[asyncio.AbstractServer] = [
        await asyncio.start_server(on_conn, host, port, reuse_address=True)
        for host, port in listens]
    servers.append(await serve_admin(array, home))  # the management API (arrayapi.py)
    (home / "array.pid").write_text(f"{os.getpid()}\n")
    log.info("array serving on %s", ", ".join(f"{h}:{p}" for h, p in listens))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for t in tasks:
        t.cancel()
    for s in servers:
        s.close()
    if ctl is not None:
        ctl.close()
    with contextlib.suppress(FileNotFoundError):
        (home / "array.pid").unlink()
    with contextlib.suppress(FileNotFoundError):
        socket_path(home).unlink()
