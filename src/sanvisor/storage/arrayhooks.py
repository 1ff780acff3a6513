"""Test hooks of the array daemon: a control socket (`array serve --control PATH`).

For tests and fault injection only: they control the array's timing so a race
can be reproduced deterministically. One command per line, one JSON reply per
line:

    sessions                      every LUN session (id, peer, queued, executing...)
    stall ID flush|any            the session's next fdatasync (flush) or next
                                  request (any) waits until `release ID`
    release ID                    let it go on
    kill ID                       cut the session's connection from the array's side
    poison OFFSET                 any session about to execute a request at OFFSET
                                  has its connection cut instead (a request that kills
                                  every path it is sent on); `poison -1` clears
    wait ID FIELD N [SECONDS]     reply once the session's FIELD >= N (queued,
                                  executed, discarded, fences, stalled, executing,
                                  fenced, ended, idle; booleans count 0/1; a session
                                  that is gone has ended=1); {"error": "timeout"} past
                                  SECONDS
    conns                         open connections: in all, and per initiator address
    wait-conns ADDR N [SECONDS]   reply once ADDR has exactly N connections open (ADDR
                                  ``*``: in all)

ID is the session id in hex, as INFO_X_SESSION gave it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sanvisor.storage.arrayd import Array
    from sanvisor.storage.arraytx import LunSession, Task

_FIELDS = ("queued", "executed", "discarded", "fences", "stalled", "executing", "fenced",
           "ended", "idle")


class Hooks:
    def __init__(self, array: Array) -> None:
        self.array = array
        self._event = asyncio.Event()
        self.armed: dict[int, str] = {}  # session id -> "flush" | "any"
        self._release: dict[int, asyncio.Event] = {}
        self._stalled: set[int] = set()
        self.poison: set[int] = set()

    def changed(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def stalled(self, s: LunSession) -> bool:
        return s.token in self._stalled

    def stalls_any(self, s: LunSession) -> bool:
        return self.armed.get(s.token) == "any" or bool(self.poison)

    async def before_execute(self, s: LunSession, task: Task) -> bool:
        """Whether to execute ``task`` (False: it is dropped, its connection cut)."""
        if self.armed.get(s.token) == "any":
            await self._stall(s)
        if task.offset in self.poison:
            s.w.transport.abort()
            return False
        return True

    async def before_flush(self, s: LunSession) -> None:
        if self.armed.get(s.token) == "flush":
            await self._stall(s)

    async def _stall(self, s: LunSession) -> None:
        ev = self._release.setdefault(s.token, asyncio.Event())
        self._stalled.add(s.token)
        self.changed()
        try:
            await ev.wait()
        finally:
            self._stalled.discard(s.token)
            self.changed()

    def view(self, token: int) -> dict[str, Any]:
        s = self.array.sessions.get(token)
        if s is None:
            return {"token": f"{token:016x}", "ended": True, "idle": True, "gone": True}
        return s.view()

    async def command(self, line: str) -> dict[str, Any]:
        words = line.split()
        if not words:
            return {"error": "empty command"}
        if words[0] == "sessions":
            return {"sessions": [s.view() for s in self.array.sessions.values()]}
        if words[0] == "conns":
            return self._conns()
        if words[0] == "wait-conns" and len(words) in (3, 4):
            return await self._wait_conns(words[1], int(words[2]),
                                          float(words[3]) if len(words) == 4 else 30.0)
        if len(words) < 2:
            return {"error": f"usage: {words[0]} ID ..."}
        if words[0] == "poison":
            offset = int(words[1])
            if offset < 0:
                self.poison.clear()
            else:
                self.poison.add(offset)
            return {"ok": True}
        token = int(words[1], 16)
        if words[0] == "stall" and len(words) == 3 and words[2] in ("flush", "any"):
            self.armed[token] = words[2]
            self._release[token] = asyncio.Event()
            return {"ok": True}
        if words[0] == "release":
            self.armed.pop(token, None)
            ev = self._release.pop(token, None)
            if ev is not None:
                ev.set()
            return {"ok": True}
        if words[0] == "kill":
            s = self.array.sessions.get(token)
            if s is not None:
                s.w.transport.abort()
            return {"ok": s is not None}
        if words[0] == "wait" and len(words) in (4, 5) and words[2] in _FIELDS:
            return await self._wait(token, words[2], int(words[3]),
                                    float(words[4]) if len(words) == 5 else 30.0)
        return {"error": f"unknown command {line.strip()!r}"}

    def _conns(self) -> dict[str, Any]:
        return {"total": self.array.connections, "peers": dict(self.array.by_peer)}

    async def _wait_conns(self, peer: str, n: int, timeout: float) -> dict[str, Any]:
        def count() -> int:
            return int(self.array.connections if peer == "*"
                       else self.array.by_peer.get(peer, 0))

        try:
            async with asyncio.timeout(timeout):
                while count() != n:
                    await self._event.wait()
        except TimeoutError:
            return {"error": "timeout", **self._conns()}
        return self._conns()

    async def _wait(self, token: int, field: str, n: int, timeout: float) -> dict[str, Any]:
        try:
            async with asyncio.timeout(timeout):
                while int(self.view(token).get(field, 0)) < n:
                    await self._event.wait()
        except TimeoutError:
            return {"error": "timeout", **self.view(token)}
        return self.view(token)


async def serve_control(array: Array, path: Path) -> asyncio.AbstractServer:
    hooks = Hooks(array)
    array.hooks = hooks

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    reply = await hooks.command(line.decode(errors="replace"))
                except ValueError as exc:
                    reply = {"error": str(exc)}
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    server = await asyncio.start_unix_server(on_conn, str(path))
    path.chmod(0o600)
    return server
