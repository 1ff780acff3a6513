"""Fencing, the host's side: a failed path's writes are resent only once the array
has confirmed that the failed session can execute nothing any more.

Why: a path can fail while the array still holds requests it received on it (a
write queued behind a slow fdatasync; a half-open connection the array has not
noticed). Resent elsewhere, acknowledged, overwritten by newer data, the old
copy would then still be executed by the array: a stale write replayed over
newer data. So, as real arrays do with task abort / session logout before a
retry on another path, the map asks the array, over a *new* connection through
a path that works, to fence the dead session (the vendor option OPT_X_FENCE
with its session id, from INFO_X_SESSION). The array discards what that
session still had queued, lets the request it was executing finish, ends the
session, and only then acknowledges. Until then the writes wait (and, with no
path left to fence through, wait or fail as no_path_retry says: never resent
unfenced). The wire protocol is in docs/lab.md, "Fencing".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from dataclasses import dataclass, field

from sanvisor.errors import NbdError
from sanvisor.storage import nbdproto as P
from sanvisor.storage.paths import Request
from sanvisor.storage.scsi import HbaConf

log = logging.getLogger("sanvisor.multipath")
FENCE_TIMEOUT = 5.0  # seconds for one fence attempt (connect, handshake, the array's ack)
WRITES = (P.CMD_WRITE, P.CMD_WRITE_ZEROES, P.CMD_TRIM)  # what a stale copy can harm


@dataclass
class DeadSession:
    """A failed path's session at the array, not yet fenced, and its held writes."""

    token: int
    dev: str  # the path it was (sdb), for logs
    requests: list[Request]
    since: float = field(default_factory=time.monotonic)
    failed_back: bool = False  # a write of it was failed to the guest before the fence


async def fence(hba: HbaConf, tokens: list[int], timeout: float = FENCE_TIMEOUT) -> None:
    """Ask the array, through ``hba``, to fence sessions ``tokens``; returns once it
    confirmed they are gone. Raises NbdError, OSError or TimeoutError."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            hba.target_host, hba.target_port, local_addr=(hba.address, 0))
        try:
            magic, opt, _flags = struct.unpack(">QQH", await reader.readexactly(18))
            if magic != P.NBDMAGIC or opt != P.IHAVEOPT:
                raise NbdError("not an NBD array")
            data = P.fence_request(tokens)
            writer.write(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)
                         + P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_X_FENCE, len(data)) + data)
            rmagic, ropt, rtype, length = P.OPT_REPLY.unpack(await reader.readexactly(20))
            if rmagic != P.REPLY_MAGIC or ropt != P.OPT_X_FENCE or length > 4096:
                raise NbdError("garbled reply to a fence request")
            why = (await reader.readexactly(length)).decode(errors="replace")
            if rtype != P.REP_ACK:
                raise NbdError(f"the array refused to fence: {why or hex(rtype)}")
            writer.write(P.OPT_HEADER.pack(P.IHAVEOPT, P.OPT_ABORT, 0))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            writer.transport.abort()
