"""Block devices for the volume manager: read and write at an offset, size, flush.

The volume manager does not care what a PV is. On a host it is a multipath map
reached through the map's NBD unix socket (the one the data-path engine serves to
QEMU); in tests, and for what lvm2
itself must read, a block device (a loop device) or a plain file.

Block devices are opened ``O_DIRECT``: other hosts write the same LUN, lvm2 reads
and writes with ``O_DIRECT`` too, and a page cache would show stale metadata.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import stat
import struct
import threading
from collections.abc import Callable
from typing import Protocol, TypeVar

from sanvisor.errors import NbdError, VolumeIOError
from sanvisor.storage.nbdclient import NbdClient

T = TypeVar("T")

BLKSSZGET = 0x1268  # ioctl: the logical block size
NBD_CHUNK = 8 << 20  # below the maps' 32 MiB maximum payload


class BlockDevice(Protocol):
    """What the volume manager needs of a PV's device."""

    name: str  # what pvs prints: /dev/mapper/NAME, /dev/loop3, a file's path

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class FileDevice:
    """A block device (``O_DIRECT``, aligned bounce buffers) or a regular file."""

    def __init__(self, path: str, name: str | None = None, *, readonly: bool = False) -> None:
        self.path, self.name = path, name or path
        try:
            st = os.stat(path)
            self.is_block = stat.S_ISBLK(st.st_mode)
            flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
            self.fd = os.open(path, flags | (os.O_DIRECT if self.is_block else 0))
        except OSError as exc:
            raise VolumeIOError(f"{self.name}: cannot open: {exc.strerror}",
                                device=self.name) from exc
        self.block = 512
        if self.is_block:
            with contextlib.suppress(OSError):
                raw = fcntl.ioctl(self.fd, BLKSSZGET, b"\0\0\0\0")
                self.block = max(512, struct.unpack("i", raw)[0])
            self._size = os.lseek(self.fd, 0, os.SEEK_END)
        else:
            self._size = os.fstat(self.fd).st_size

    @property
    def size(self) -> int:
        return self._size

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        b = self.block if self.is_block else 1
        start = offset - offset % b
        end = -(-(offset + length) // b) * b
        return start, end - start

    def _pread(self, start: int, length: int) -> bytes:
        if not self.is_block:
            return os.pread(self.fd, length, start).ljust(length, b"\0")
        buf = mmap.mmap(-1, max(length, mmap.PAGESIZE))
        try:
            got = os.preadv(self.fd, [memoryview(buf)[:length]], start)
            return bytes(buf[:got]).ljust(length, b"\0")
        finally:
            buf.close()

    def read(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        start, span = self._span(offset, length)
        try:
            data = self._pread(start, span)
        except OSError as exc:
            raise VolumeIOError(f"{self.name}: read at {offset}: {exc.strerror}",
                                device=self.name) from exc
        return data[offset - start:offset - start + length]

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        start, span = self._span(offset, len(data))
        try:
            if (start, span) != (offset, len(data)):  # read-modify-write the edges
                whole = bytearray(self._pread(start, span))
                whole[offset - start:offset - start + len(data)] = data
                data = bytes(whole)
            if not self.is_block:
                os.pwrite(self.fd, data, start)
                return
            buf = mmap.mmap(-1, max(span, mmap.PAGESIZE))
            try:
                buf[:span] = data
                done = os.pwritev(self.fd, [memoryview(buf)[:span]], start)
            finally:
                buf.close()
            if done != span:
                raise OSError(28, "short write")
        except OSError as exc:
            raise VolumeIOError(f"{self.name}: write at {offset}: {exc.strerror}",
                                device=self.name) from exc

    def flush(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise VolumeIOError(f"{self.name}: flush: {exc.strerror}",
                                device=self.name) from exc

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class NbdDevice:
    """A multipath map (or any NBD export) through its unix socket. One connection,
    used by one request at a time; a connection that failed is opened again at the
    next request."""

    def __init__(self, socket_path: str, name: str, *, timeout: float = 30.0,
                 export: str = "") -> None:
        self.socket_path, self.name, self.timeout, self.export = socket_path, name, timeout, export
        self._lock = threading.Lock()
        self._client: NbdClient | None = self._connect()
        self._size = self._client.size

    def _connect(self) -> NbdClient:
        try:
            client = NbdClient(self.socket_path, timeout=self.timeout)
            try:
                client.go(self.export)
            except BaseException:
                client.close()
                raise
        except (NbdError, OSError) as exc:
            raise VolumeIOError(f"{self.name}: cannot open {self.socket_path}: {exc}",
                                device=self.name) from exc
        return client

    @property
    def size(self) -> int:
        return self._size

    def _do(self, what: str, fn: Callable[[NbdClient], T]) -> T:
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            client = self._client
            try:
                return fn(client)
            except (NbdError, OSError) as exc:
                client.close()
                self._client = None
                raise VolumeIOError(f"{self.name}: {what}: {exc}", device=self.name) from exc

    def read(self, offset: int, length: int) -> bytes:
        parts = []
        for at in range(offset, offset + length, NBD_CHUNK):
            n = min(NBD_CHUNK, offset + length - at)
            parts.append(self._do(f"read at {at}", _reader(n, at)))
        return b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        for i in range(0, len(data), NBD_CHUNK):
            chunk = bytes(view[i:i + NBD_CHUNK])
            self._do(f"write at {offset + i}", _writer(chunk, offset + i))

    def flush(self) -> None:
        self._do("flush", lambda c: c.flush())

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.disconnect()
                self._client = None


def _reader(n: int, at: int) -> Callable[[NbdClient], bytes]:
    return lambda c: c.pread(n, at)


def _writer(data: bytes, at: int) -> Callable[[NbdClient], None]:
    return lambda c: c.pwrite(data, at)
