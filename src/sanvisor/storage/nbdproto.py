"""NBD protocol constants and wire helpers (the fixed newstyle handshake).

See the NBD protocol document (proto.md in the NBD project). Only what
sanvisor's array and host side use; every number has its name from there.
"""

from __future__ import annotations

import struct

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
# sanvisor's vendor option (fencing; see docs/lab.md "Fencing"): a number far from the
# spec's registry, so no client sends it by mistake and unknown servers answer ERR_UNSUP
OPT_X_FENCE = 0x53560001

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3
INFO_X_SESSION = 0x5356  # vendor: the array's id of this session (u64), sent if requested

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_CAN_MULTI_CONN = 1 << 8

# commands and their flags
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1

# errors (errno values on the wire)
EPERM = 1
EIO = 5
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

MAX_REQUEST = 32 << 20  # larger reads/writes are refused (EINVAL / connection closed)
MAX_FENCE = 64  # session ids in one fence option

OPT_HEADER = struct.Struct(">QII")  # magic, option, length
OPT_REPLY = struct.Struct(">QIII")  # magic, option, type, length
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie


def option_reply(option: int, rtype: int, data: bytes = b"") -> bytes:
    return OPT_REPLY.pack(REPLY_MAGIC, option, rtype, len(data)) + data


def info_export(size: int, flags: int) -> bytes:
    return struct.pack(">HQH", INFO_EXPORT, size, flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", INFO_BLOCK_SIZE, minimum, preferred, maximum)


def info_description(text: str) -> bytes:
    return struct.pack(">H", INFO_DESCRIPTION) + text.encode()


def info_session(token: int) -> bytes:
    return struct.pack(">HQ", INFO_X_SESSION, token)


def go_request(name: str, infos: tuple[int, ...] = ()) -> bytes:
    """The data of an OPT_GO/OPT_INFO: the export name and the info types asked for."""
    raw = name.encode()
    return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def parse_go_request(data: bytes) -> tuple[str, list[int]] | None:
    """(name, info types) of an OPT_GO/OPT_INFO, or None if malformed."""
    if len(data) < 6:
        return None
    (nlen,) = struct.unpack_from(">I", data)
    if 4 + nlen + 2 > len(data):
        return None
    (count,) = struct.unpack_from(">H", data, 4 + nlen)
    if len(data) != 4 + nlen + 2 + 2 * count:
        return None
    infos = list(struct.unpack_from(f">{count}H", data, 4 + nlen + 2))
    return data[4:4 + nlen].decode(errors="replace"), infos


def fence_request(tokens: list[int]) -> bytes:
    """OPT_X_FENCE data: u32 count, then count session ids (u64)."""
    return struct.pack(f">I{len(tokens)}Q", len(tokens), *tokens)


def parse_fence_request(data: bytes) -> list[int] | None:
    if len(data) < 4:
        return None
    (count,) = struct.unpack_from(">I", data)
    if count > MAX_FENCE or len(data) != 4 + 8 * count:
        return None
    return list(struct.unpack_from(f">{count}Q", data, 4))
