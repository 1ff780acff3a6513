"""The data-path engine's control protocol, the agent's side (docs/dataplane.md).

Requests are lines ``verb key=value ...`` (values percent-encoded, so a value is
never split or ended by what it contains); the engine answers each, in order,
with ``ok {json}`` or ``error {"message": ...}``; a connection that sent
``watch`` also gets ``event {json}`` lines (path changes, the engine's log).
Pure functions: encoding, decoding, the commands the control plane sends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from sanvisor.storage import nbdproto as P

VERSION = 1


def line(verb: str, **args: object) -> bytes:
    """One request line; None values are left out."""
    parts = [verb]
    for key, value in args.items():
        if value is None:
            continue
        if isinstance(value, bool):
            value = int(value)
        parts.append(f"{key}={quote(str(value), safe=':,/.@-_')}")
    return (" ".join(parts) + "\n").encode()


def seg_lines(segs: list[Segment]) -> list[str]:
    return [f"{s.start}:{s.length}:{s.map_offset}:{s.map_id}" for s in segs]


def _segs(key: str, segs: list[Segment]) -> bytes:
    return b"".join(f" {key}=".encode() + quote(s, safe=":,/.@-_").encode()
                    for s in seg_lines(segs))


def device_line(name: str, size: int, segs: list[Segment], with_fd: bool,
                cows: tuple[str, ...] = (), snap: str | None = None) -> bytes:
    """A device (its segment table); with_fd: its listening socket comes with the line.
    ``cows``: the stores of an origin's snapshots; ``snap``: a snapshot's own store
    (its segments are then its origin's)."""
    body = line("device", name=name, size=size, fd=1 if with_fd else None,
                snap=snap).rstrip(b"\n")
    body += _segs("seg", segs)
    for c in cows:
        body += b" cow=" + quote(c, safe=":,/.@-_").encode()
    return body + b"\n"


def store_line(ident: str, size: int, chunk: int, cow: list[Segment],
               origin: list[Segment]) -> bytes:
    """A snapshot's exception store: its COW LV's segments and its origin's."""
    body = line("store", id=ident, size=size, chunk=chunk).rstrip(b"\n")
    return body + _segs("cow", cow) + _segs("org", origin) + b"\n"


@dataclass(frozen=True)
class Segment:
    """[start, start + length) of a device is map ``map_id`` at ``map_offset``."""

    start: int
    length: int
    map_id: str
    map_offset: int = 0


@dataclass(frozen=True)
class StoreSpec:
    """A snapshot's exception store: its COW LV and its origin (docs/dataplane.md)."""

    ident: str
    size: int
    chunk: int
    cow: tuple[Segment, ...]
    origin: tuple[Segment, ...]

    def line(self) -> bytes:
        return store_line(self.ident, self.size, self.chunk, list(self.cow), list(self.origin))


@dataclass(frozen=True)
class DeviceSpec:
    """A device other than a map's own: an LV (linear, an origin with ``cows``, or a
    snapshot with ``snap``), served on HOME/mapper/NAME.sock."""

    name: str
    size: int
    segs: tuple[Segment, ...]
    cows: tuple[str, ...] = ()
    snap: str | None = None

    def line(self) -> bytes:
        return device_line(self.name, self.size, list(self.segs), True, self.cows, self.snap)


@dataclass(frozen=True)
class Reply:
    kind: str  # ok | error | event
    data: dict[str, Any]

    @property
    def message(self) -> str:
        return str(self.data.get("message", ""))


def parse(raw: bytes) -> Reply:
    """One line from the engine (without its newline). Raises ValueError."""
    head, _, body = raw.decode(errors="replace").partition(" ")
    if head not in ("ok", "error", "event"):
        raise ValueError(f"not an engine line: {raw[:80]!r}")
    data = json.loads(body) if body.strip() else {}
    if not isinstance(data, dict):
        raise ValueError(f"not an object: {raw[:80]!r}")
    return Reply(head, data)


def hold(writes: tuple[int, ...]) -> str:
    """The commands a map holds for a fence before resending them."""
    return ",".join(str(c) for c in sorted(writes)) or "-"


DEFAULT_HOLD = hold((P.CMD_WRITE, P.CMD_WRITE_ZEROES, P.CMD_TRIM))
