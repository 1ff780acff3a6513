"""Frames of the dom0 command channel (shared by both ends; standard library only,
because :mod:`sanvisor.xenhost.dom0server` imports it inside dom0).

A frame is ``MAGIC | kind (1 byte) | stream (u32) | length (u32) | payload``. The
host multiplexes any number of processes ("streams") in dom0 over the one port:

host -> dom0
  ``H`` hello (payload: a nonce, echoed back), ``S`` spawn (payload: :func:`spawn_payload`),
  ``I`` input for the stream's stdin (empty payload: end of input), ``K`` kill (payload:
  signal number).
dom0 -> host
  ``H`` hello reply, ``O``/``E`` stdout/stderr data, ``A`` this many bytes of input
  were taken by the process (flow control), ``X`` exit (payload: return code, 128+N
  for a signal), ``F`` spawn failed (payload: the reason).
"""

from __future__ import annotations

import struct

MAGIC = b"SVX1"
HEADER = struct.Struct(">4scII")
MAX_PAYLOAD = 1 << 20


def frame(kind: bytes, stream: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, kind, stream, len(payload)) + payload


class Parser:
    """Incremental frame decoder; skips garbage up to the next magic (a peer that
    went away mid-frame, noise before the other end started)."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[tuple[bytes, int, bytes]]:
        self.buf += data
        out: list[tuple[bytes, int, bytes]] = []
        while True:
            at = self.buf.find(MAGIC)
            if at < 0:
                self.buf = self.buf[-(len(MAGIC) - 1):]
                return out
            if at:
                self.buf = self.buf[at:]
            if len(self.buf) < HEADER.size:
                return out
            _magic, kind, stream, length = HEADER.unpack_from(self.buf)
            if length > MAX_PAYLOAD:
                self.buf = self.buf[1:]  # not a real header: resync further on
                continue
            end = HEADER.size + length
            if len(self.buf) < end:
                return out
            out.append((kind, stream, self.buf[HEADER.size:end]))
            self.buf = self.buf[end:]

    def reset(self) -> None:
        self.buf = b""


def spawn_payload(argv: list[str], *, timeout: float, pty: bool = False) -> bytes:
    """``timeout pty\\0arg0\\0arg1...`` (no argument may hold a NUL)."""
    if not argv or any("\0" in a for a in argv):
        raise ValueError(f"bad argv {argv!r}")
    head = f"{max(0.0, timeout):.3f} {int(pty)}"
    return "\0".join([head, *argv]).encode()


def parse_spawn(payload: bytes) -> tuple[list[str], float, bool]:
    head, *argv = payload.decode(errors="surrogateescape").split("\0")
    timeout, pty = head.split(" ")
    return argv, float(timeout), pty == "1"
