"""The save file: a checked header, then QEMU's migration stream.

Layout: HEADER_SIZE bytes of header (magic line, JSON, space padding), then the
stream. The JSON holds the domain record, the stream's length and SHA-256, so a
truncated, corrupt or foreign file is refused before anything is started.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from sanvisor.errors import SaveFileError

MAGIC = b"SANVISOR-SAVE 1\n"
HEADER_SIZE = 64 * 1024


def hash_stream(fd: int, offset: int) -> tuple[int, str]:
    h = hashlib.sha256()
    total = 0
    pos = offset
    while True:
        chunk = os.pread(fd, 4 << 20, pos)
        if not chunk:
            break
        h.update(chunk)
        total += len(chunk)
        pos += len(chunk)
    return total, h.hexdigest()


def write_header(fd: int, record: dict[str, Any], hypervisor: str) -> None:
    length, digest = hash_stream(fd, HEADER_SIZE)
    body = json.dumps({"record": record, "hypervisor": hypervisor,
                       "stream_length": length, "stream_sha256": digest}).encode()
    blob = MAGIC + body + b"\n"
    if len(blob) > HEADER_SIZE:
        raise SaveFileError("domain record too large for the save file header")
    os.pwrite(fd, blob.ljust(HEADER_SIZE, b" "), 0)
    os.fsync(fd)


def read_header(path: Path, *, verify: bool = True) -> tuple[int, dict[str, Any]]:
    """Open and check a save file; returns (fd positioned at the stream, header)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SaveFileError(f"{path}: cannot open: {exc.strerror}", path=str(path)) from exc
    try:
        head = os.pread(fd, HEADER_SIZE, 0)
        if not head.startswith(MAGIC):
            raise SaveFileError(f"{path}: not a sanvisor save file", path=str(path))
        try:
            hdr = json.loads(head[len(MAGIC):].split(b"\n", 1)[0])
            hdr["record"]["spec"]["name"]
        except (ValueError, KeyError, TypeError) as exc:
            raise SaveFileError(f"{path}: corrupt save file header", path=str(path)) from exc
        if verify:
            length, digest = hash_stream(fd, HEADER_SIZE)
            if length != hdr.get("stream_length"):
                raise SaveFileError(
                    f"{path}: truncated save file ({length} of {hdr.get('stream_length')} "
                    "bytes of guest state)", path=str(path))
            if digest != hdr.get("stream_sha256"):
                raise SaveFileError(f"{path}: corrupt save file (checksum mismatch)",
                                    path=str(path))
        os.lseek(fd, HEADER_SIZE, os.SEEK_SET)
        return fd, hdr
    except BaseException:
        os.close(fd)
        raise
