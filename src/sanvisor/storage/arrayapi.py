"""The array daemon's management API: ARRAY_HOME/admin.sock (0600).

One JSON request per line, one JSON reply per line:

    {"op": "lun-create", "args": {"name": "sys", "size": 67108864}}
    {"data": {...the LUN...}, "text": "LUN 1 sys created: 64 MiB, thin, WWID 36..."}
    {"error": {"code": "conflict", "message": "...", "context": {...}}}

The operations and their arguments are storage/arrayadmin.py's (OPS); errors are
sanvisor's error tree (errors.to_dict / from_dict), so a client rebuilds the same
class with its stable code. `sanvisor array ...` is one client of it; when no daemon
answers, the CLI applies the same operations to the array's home itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sanvisor.errors import AgentProtocolError, SanvisorError, UsageError, from_dict
from sanvisor.storage.arrayadmin import ArrayAdmin, Result

if TYPE_CHECKING:
    from sanvisor.storage.arrayd import Array

SOCKET = "admin.sock"
MAX_REQUEST = 1 << 16  # bytes of one request line


def socket_path(home: Path) -> Path:
    return home / SOCKET


async def serve_admin(array: Array, home: Path) -> asyncio.AbstractServer:
    lock = asyncio.Lock()  # one change at a time (the config's flock also guards files)

    async def handle(line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("op"), str) \
                    or not isinstance(req.get("args", {}), dict):
                raise UsageError('expected {"op": NAME, "args": {...}}')
            op, args = req["op"], dict(req.get("args", {}))
            async with lock:
                result = await _apply(array, op, args)
            return {"data": result.data, "text": result.text}
        except SanvisorError as exc:
            return {"error": exc.to_dict()}
        except (ValueError, UnicodeDecodeError) as exc:  # not JSON
            return {"error": UsageError(f"malformed request: {exc}").to_dict()}

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                reply = await handle(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError):  # ValueError: a line over the limit
            pass
        finally:
            writer.close()

    path = socket_path(home)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    server = await asyncio.start_unix_server(on_conn, str(path), limit=MAX_REQUEST)
    path.chmod(0o600)
    return server


async def _apply(array: Array, op: str, args: dict[str, Any]) -> Result:
    """Run one operation off the event loop (files, fallocate), with what only the
    running daemon knows: the sessions open on each LUN (a snapshot taken here, on
    the loop), and for a forced delete, those sessions fenced first."""
    users: dict[str, list[str]] = {}
    for s in list(array.sessions.values()):
        if not s.ended.is_set():
            host = s.initiator.host if s.initiator and s.initiator.host else "?"
            users.setdefault(s.lun.wwid, []).append(f"{s.peer} ({host})")
    if op == "lun-delete" and args.get("force") is True and isinstance(args.get("lun"), str):
        lun = array.config().lun(args["lun"])  # NotFoundError: the reply says so
        await asyncio.gather(*(s.fence() for s in list(array.sessions.values())
                               if s.lun.wwid == lun.wwid))
    admin = ArrayAdmin(array.store, lambda lun: users.get(lun.wwid, []))
    return await asyncio.to_thread(admin.run, op, args)


def call(home: Path, op: str, args: dict[str, Any], timeout: float = 120.0
         ) -> Result | None:
    """Ask the running array daemon; None when none answers at HOME/admin.sock."""
    path = socket_path(home)
    if not path.exists():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # a socket left by a daemon that died
        sock.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise AgentProtocolError(f"the array daemon ({path}) sent a malformed reply: "
                                 f"{data[:200]!r}")
    if "error" in reply:
        raise from_dict(reply["error"])
    return Result(reply.get("data"), str(reply.get("text", "")))
