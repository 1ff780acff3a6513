"""The array's storage pool: the file system holding the LUN files, its free space,
and thick provisioning.

LUNs are sparse files unless created thick: a sparse LUN can run out of space
while a guest writes (the array then answers ENOSPC, never a silent short
write), so the pool's free space is reported with every LUN and a warning is
raised when it runs low.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sanvisor.errors import ResourceError

if TYPE_CHECKING:
    from sanvisor.storage.array import Lun

log = logging.getLogger("sanvisor.array")
POOL_CHECK = 5.0  # seconds between checks of the pool's free space
ENOSPC_LOG_EVERY = 10.0  # seconds: at most one "pool full" warning per LUN per period

LOW_SPACE_FRACTION = 0.10  # the pool is "low" under 10 % free...
LOW_SPACE_BYTES = 1 << 30  # ...or under 1 GiB free


@dataclass
class PoolSpace:
    path: str  # a directory on the file system (the LUN's own directory)
    size: int
    free: int  # bytes an unprivileged writer may still allocate

    @property
    def low(self) -> bool:
        return self.free < self.size * LOW_SPACE_FRACTION or self.free < LOW_SPACE_BYTES

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "low": self.low}

    def warning(self) -> str:
        return (f"WARNING: the array's pool at {self.path} is low on space: "
                f"{human(self.free)} free of {human(self.size)} "
                f"({100 * self.free / max(self.size, 1):.1f} %); sparse LUNs may fail "
                "writes with ENOSPC")


class PoolWatch:
    """The array daemon's warnings: a pool that becomes low (checked every POOL_CHECK
    s), and a write that failed for lack of space (once per ENOSPC_LOG_EVERY a LUN)."""

    def __init__(self, luns: Callable[[], Iterable[Lun]]) -> None:
        self.luns = luns
        self._low: set[str] = set()  # pools known to be low
        self._enospc_logged: dict[int, float] = {}

    def check(self) -> None:
        for d in sorted({str(Path(lun.backing).parent) for lun in self.luns()}):
            try:
                space = pool_space(Path(d))
            except OSError:
                continue
            if space.low and d not in self._low:
                self._low.add(d)
                log.warning("%s", space.warning())
            elif not space.low and d in self._low:
                self._low.discard(d)
                log.info("the array's pool at %s has space again: %d MiB free", d,
                         space.free >> 20)

    def note_enospc(self, lun: Lun) -> None:
        now = time.monotonic()
        if now - self._enospc_logged.get(lun.id, -ENOSPC_LOG_EVERY) >= ENOSPC_LOG_EVERY:
            self._enospc_logged[lun.id] = now
            log.warning("LUN %d (%s): a write failed with ENOSPC: its pool is full",
                        lun.id, lun.name)
            self.check()

    async def watch(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                self.check()
            await asyncio.sleep(POOL_CHECK)


def human(n: int) -> str:
    """Bytes for people: 512 B, 4 MiB, 79.1 GiB."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f}".removesuffix(".0") + f" {unit}"
    return f"{n} B"


def pool_space(path: Path) -> PoolSpace:
    """Free space of the file system holding ``path`` (a file or a directory)."""
    d = path if path.is_dir() else path.parent
    st = os.statvfs(d)
    return PoolSpace(path=str(d), size=st.f_blocks * st.f_frsize,
                     free=st.f_bavail * st.f_frsize)


def allocated(path: Path) -> int:
    """Bytes the LUN's backing file really occupies (0 for a missing file)."""
    try:
        st = os.stat(path)
    except OSError:
        return 0
    return int(st.st_blocks) * 512


def preallocate(path: Path, size: int) -> None:
    """Thick provisioning: allocate every block of ``path`` up to ``size`` now, or raise
    ResourceError (one line) if the pool cannot hold it."""
    have = allocated(path)
    free = pool_space(path).free
    if size - have > free:
        raise ResourceError(f"not enough space in the array's pool for a thick LUN of "
                            f"{human(size)}: {human(free)} free at {path.parent}",
                            needed=size - have, free=free)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceError(f"not enough space in the array's pool for a thick LUN "
                                f"of {human(size)} at {path.parent}") from None
        raise ResourceError(f"cannot preallocate {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
