"""The array's transmission phase for one session: its task set, executed in order.

A reader takes requests off the connection into the session's queue (the task
set of a SCSI target); an executor runs them one at a time, in order, and
replies. A request that needs no waiting (a read, a plain write) is executed
as soon as it is read when nothing is queued before it. The queue is what
fencing acts on (docs/lab.md, "Fencing"): a fenced session, or one whose
connection is gone, discards every request still queued (never executed), lets
the one being executed finish, and ends. Every failed or short write is an NBD
error (ENOSPC when the pool is full), never a success.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sanvisor.storage import nbdproto as P

if TYPE_CHECKING:
    from sanvisor.storage.array import Initiator, Lun

log = logging.getLogger("sanvisor.array")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
QUEUE_DEPTH = 1024  # requests read ahead of execution, at most...
QUEUE_BYTES = 64 << 20  # ...and bytes of write payload
ZERO_CHUNK = 1 << 20
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class ProtocolViolation(Exception):
    pass


def nbd_errno(e: int | None) -> int:
    """The NBD error for an OS error of a LUN's backing store."""
    if e in _SPACE_ERRNOS:
        return P.ENOSPC
    if e in (errno.EPERM, errno.EACCES, errno.EROFS):
        return P.EPERM
    return P.EIO


def punch_hole(fd: int, offset: int, length: int) -> bool:
    rc = _libc.fallocate(fd, _PUNCH, ctypes.c_long(offset), ctypes.c_long(length))
    return bool(rc == 0)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> int:
    """Write all of ``data`` or return the NBD error: a short write is never success."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        try:
            n = os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            return nbd_errno(exc.errno)
        if n <= 0:
            return P.ENOSPC  # no progress: nothing more fits
        done += n
    return 0


def pread_all(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes from ``offset``; past the end of the file reads as zeroes."""
    data = os.pread(fd, length, offset)
    while 0 < len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data + b"\0" * (length - len(data))


@dataclass
class Task:
    cmd: int
    flags: int
    cookie: int
    offset: int
    length: int
    payload: bytes = b""


class LunSession:
    """One initiator's session on one LUN, from OPT_GO to its end."""

    def __init__(self, token: int, lun: Lun, initiator: Initiator | None, peer: str,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 hooks: Any = None) -> None:
        self.token, self.lun, self.initiator, self.peer = token, lun, initiator, peer
        self.r, self.w = reader, writer
        self.hooks = hooks  # test hooks (arrayhooks.Hooks) or None
        self.queue: collections.deque[Task] = collections.deque()
        self.queued_bytes = 0
        self.executing: Task | None = None
        self.fenced = False
        self.closing = False  # no more requests will be queued
        self.executed = 0
        self.discarded = 0
        self.fences = 0  # fence requests waiting for this session to end
        self.ended = asyncio.Event()
        self.on_enospc: Any = None  # the array's pool warning, called on ENOSPC
        self._work = asyncio.Event()
        self._space = asyncio.Event()
        self._fd = -1
        self.started = False

    # ---- life ---------------------------------------------------------------------
    def finish_unstarted(self) -> None:
        """The connection ended before transmission began: nothing to wait for."""
        if not self.started:
            self.started = self.closing = True
            self.ended.set()
            self._changed()

    async def run(self) -> None:
        try:
            self._fd = os.open(self.lun.backing, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("LUN %d: cannot open %s: %s", self.lun.id, self.lun.backing, exc)
            self.finish_unstarted()
            return
        self.started = True
        worker = asyncio.create_task(self._worker(), name=f"lun-session-{self.token:x}")
        disc = False
        try:
            disc = await self._reader()
        except (asyncio.IncompleteReadError, ConnectionError, OSError,
                ProtocolViolation) as exc:
            log.info("%s: session %016x on LUN %d ends: %s", self.peer, self.token,
                     self.lun.id, exc or type(exc).__name__)
        finally:
            if not disc:
                self.discard("the connection is gone")
            self.closing = True
            self._work.set()
            try:
                await asyncio.shield(worker)
            except asyncio.CancelledError:
                worker.cancel()
                raise
            finally:
                os.close(self._fd)
                self.ended.set()
                self._changed()

    def discard(self, why: str) -> None:
        """Abort the task set: requests read but not started are dropped unexecuted."""
        self.closing = True
        if self.queue:
            log.warning("session %016x (%s): %d queued request(s) discarded: %s",
                        self.token, self.peer, len(self.queue), why)
        self.discarded += len(self.queue)
        self.queue.clear()
        self.queued_bytes = 0
        self._space.set()
        self._work.set()
        self._changed()

    async def fence(self) -> None:
        """Discard the queue, cut the connection, wait for the request being executed
        (if any) to finish: then nothing of this session can reach the LUN any more."""
        self.fences += 1
        self._changed()
        try:
            if not self.fenced:
                self.fenced = True
                log.warning("session %016x (%s, LUN %d) fenced", self.token, self.peer,
                            self.lun.id)
                self.discard("fenced")
                self.w.transport.abort()
            await self.ended.wait()
        finally:
            self.fences -= 1
            self._changed()

    def view(self) -> dict[str, Any]:
        return {"token": f"{self.token:016x}", "peer": self.peer, "lun": self.lun.id,
                "wwpn": self.initiator.wwpn if self.initiator else None,
                "queued": len(self.queue), "executing": self.executing is not None,
                "executed": self.executed, "discarded": self.discarded,
                "fenced": self.fenced, "fences": self.fences,
                "ended": self.ended.is_set(),
                "idle": not self.queue and self.executing is None,
                "stalled": bool(self.hooks and self.hooks.stalled(self))}

    def _changed(self) -> None:
        if self.hooks is not None:
            self.hooks.changed()

    # ---- reading ------------------------------------------------------------------
    async def _reader(self) -> bool:
        """Read requests until DISC (True) or the end of the connection (raises)."""
        lun = self.lun
        while True:
            hdr = await self.r.readexactly(P.REQUEST.size)
            magic, flags, cmd, cookie, offset, length = P.REQUEST.unpack(hdr)
            if magic != P.REQUEST_MAGIC:
                raise ProtocolViolation(f"bad request magic {magic:#x}")
            payload = b""
            if cmd == P.CMD_WRITE:
                if length > P.MAX_REQUEST:
                    raise ProtocolViolation("write larger than the maximum")
                payload = await self.r.readexactly(length)
            if self.closing:
                return False  # fenced meanwhile: read, but never executed
            if cmd == P.CMD_DISC:
                return True
            task = Task(cmd, flags, cookie, offset, length, payload)
            if not self.queue and self.executing is None and self._inline(task):
                err, data = self._execute_now(task, lun)
                self.executed += 1
                self._reply(err, cookie, data)
            else:
                while len(self.queue) >= QUEUE_DEPTH or self.queued_bytes > QUEUE_BYTES:
                    self._space.clear()
                    await self._space.wait()
                    if self.closing:
                        return False
                self.queue.append(task)
                self.queued_bytes += len(payload)
                self._work.set()
                self._changed()
            if self.w.transport.get_write_buffer_size() > (4 << 20):
                await self.w.drain()

    def _inline(self, task: Task) -> bool:
        """Can this request run now, without waiting (no flush, no test stall)?"""
        if self.hooks is not None and self.hooks.stalls_any(self):
            return False
        return task.cmd == P.CMD_READ or (task.cmd == P.CMD_WRITE
                                          and not task.flags & P.CMD_FLAG_FUA)

    # ---- executing ----------------------------------------------------------------
    async def _worker(self) -> None:
        while True:
            if not self.queue:
                if self.closing:
                    return
                self._work.clear()
                await self._work.wait()
                continue
            task = self.queue.popleft()
            self.queued_bytes -= len(task.payload)
            self._space.set()
            self.executing = task
            self._changed()
            try:
                if self.hooks is not None and not await self.hooks.before_execute(self, task):
                    self.discarded += 1
                    continue
                err, data = await self._execute(task)
            finally:
                self.executing = None
            self.executed += 1
            self._reply(err, task.cookie, data)
            self._changed()

    def _execute_now(self, t: Task, lun: Lun) -> tuple[int, bytes]:
        if t.cmd == P.CMD_READ:
            if t.length > P.MAX_REQUEST or t.offset + t.length > lun.size:
                return P.EINVAL, b""
            try:
                return 0, pread_all(self._fd, t.length, t.offset)
            except OSError:
                return P.EIO, b""
        if t.offset + t.length > lun.size:
            return P.ENOSPC, b""
        return self._check(pwrite_all(self._fd, t.payload, t.offset)), b""

    async def _execute(self, t: Task) -> tuple[int, bytes]:
        if t.cmd in (P.CMD_READ, P.CMD_WRITE):
            err, data = self._execute_now(t, self.lun)
            if not err and t.cmd == P.CMD_WRITE and t.flags & P.CMD_FLAG_FUA:
                err = await self._flush()
            return err, data
        if t.cmd == P.CMD_FLUSH:
            return await self._flush(), b""
        if t.cmd in (P.CMD_TRIM, P.CMD_WRITE_ZEROES):
            return await self._zero(t), b""
        if t.cmd == P.CMD_CACHE:
            return 0, b""
        return P.EINVAL, b""

    async def _flush(self) -> int:
        if self.hooks is not None:
            await self.hooks.before_flush(self)
        try:
            await asyncio.to_thread(os.fdatasync, self._fd)
        except OSError as exc:
            return self._check(nbd_errno(exc.errno))
        return 0

    async def _zero(self, t: Task) -> int:
        if t.offset + t.length > self.lun.size:
            return P.ENOSPC if t.cmd == P.CMD_WRITE_ZEROES else P.EINVAL
        if t.cmd == P.CMD_TRIM or not t.flags & P.CMD_FLAG_NO_HOLE:
            if punch_hole(self._fd, t.offset, t.length):
                return await self._flush() if t.flags & P.CMD_FLAG_FUA else 0
            if t.cmd == P.CMD_TRIM:
                return 0  # TRIM is advisory
        err = await asyncio.to_thread(self._write_zeroes, t.offset, t.length)
        if err:
            return self._check(err)
        return await self._flush() if t.flags & P.CMD_FLAG_FUA else 0

    def _write_zeroes(self, offset: int, length: int) -> int:
        chunk = bytes(min(length, ZERO_CHUNK))
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(chunk), end - pos)
            err = pwrite_all(self._fd, memoryview(chunk)[:n], pos)
            if err:
                return err
            pos += n
        return 0

    def _check(self, err: int) -> int:
        if err == P.ENOSPC and self.on_enospc is not None:
            self.on_enospc(self.lun)
        return err

    def _reply(self, err: int, cookie: int, data: bytes = b"") -> None:
        transport = self.w.transport
        if transport.is_closing():
            return
        with contextlib.suppress(RuntimeError):
            transport.write(P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, err, cookie))
            if data and not err:
                transport.write(data)
