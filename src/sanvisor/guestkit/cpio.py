"""A minimal writer (and reader, for tests) of the newc cpio format the kernel unpacks.

The host has no ``cpio`` binary, and the format is simple: a 110-byte ASCII header per
entry (``070701`` then 13 eight-digit hex fields), the NUL-terminated name padded to a
4-byte boundary, then the data padded to a 4-byte boundary; a ``TRAILER!!!`` entry ends it.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_HEADER_LEN = 110


@dataclass(frozen=True)
class Entry:
    """One archive member. ``mode`` includes the file type bits (S_IFREG, S_IFDIR...)."""

    name: str
    mode: int
    data: bytes = b""
    mtime: int = 0
    rdev: tuple[int, int] = (0, 0)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


def _pad(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


class NewcWriter:
    """Writes entries to a binary stream; call :meth:`close` to write the trailer."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self._closed = False

    def _write(self, name: str, mode: int, data: bytes, mtime: int = 0, nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        raw_name = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, nlink, mtime, len(data),
            0, 0, rdev[0], rdev[1],  # dev major/minor, rdev major/minor
            len(raw_name), 0,  # namesize, check
        )
        self._ino += 1
        header = MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + raw_name + _pad(_HEADER_LEN + len(raw_name)))
        self._out.write(data + _pad(len(data)))

    def add(self, entry: Entry) -> None:
        if self._closed:
            raise ValueError("archive already closed")
        name = entry.name.lstrip("/") or "."
        nlink = 2 if entry.is_dir else 1
        self._write(name, entry.mode, entry.data, entry.mtime, nlink, entry.rdev)

    def directory(self, name: str, perm: int = 0o755) -> None:
        self.add(Entry(name, stat.S_IFDIR | perm))

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self.add(Entry(name, stat.S_IFREG | perm, data))

    def symlink(self, name: str, target: str) -> None:
        self.add(Entry(name, stat.S_IFLNK | 0o777, target.encode()))

    def close(self) -> None:
        if not self._closed:
            self._write(TRAILER, 0, b"", nlink=1)
            self._closed = True


def read_newc(blob: bytes) -> Iterator[Entry]:
    """Yield the entries of a newc archive (stops at the trailer)."""
    pos = 0
    while True:
        header = blob[pos : pos + _HEADER_LEN]
        if len(header) < _HEADER_LEN or header[:6] != MAGIC:
            raise ValueError(f"bad newc header at offset {pos}")
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, mtime, filesize, namesize = fields[1], fields[5], fields[6], fields[11]
        rdev = (fields[9], fields[10])
        name_start = pos + _HEADER_LEN
        name = blob[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize
        data_start += (4 - data_start % 4) % 4
        data = blob[data_start : data_start + filesize]
        pos = data_start + filesize
        pos += (4 - pos % 4) % 4
        if name == TRAILER:
            return
        yield Entry(name, mode, data, mtime, rdev)
