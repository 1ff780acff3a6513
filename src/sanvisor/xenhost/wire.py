"""Frames of the dom0 command channel (shared by both ends; standard library only,
because :mod:`sanvisor.xenhost.dom0server` imports it inside dom0).

A frame is ``MAGIC | kind (1 byte) | stream (u32) | length (u32) | payload``. The
host multiplexes any number of processes ("streams") in dom0 over the one port:

host -> dom0
  ``H`` hello (payload: the host's nonce), ``R`` response to dom0's challenge
  (payload: nonce, space, :func:`proof` of the host); then, authenticated, ``S`` spawn
  (payload: :func:`spawn_payload`), ``I`` input for the stream's stdin (empty: end of
  input), ``K`` kill (payload: signal number), each payload led by its :func:`tag`.
dom0 -> host
  ``C`` challenge (payload: the host's nonce, space, dom0's nonce), ``H`` welcome
  (payload: the host's nonce, space, :func:`proof` of dom0) or ``D`` denied (the
  host's nonce, space, why); ``O``/``E`` stdout/stderr data, ``A`` this many bytes of
  input were taken by the process (flow control), ``X`` exit (payload: return code,
  128+N for a signal), ``F`` spawn failed (payload: the reason).

Authentication (docs/xen.md, "The command channel"): both ends know a secret key
(the host: a 0600 file next to the control socket; dom0: a root-only file in its
initramfs, written at kit build). The host proves it knows the key by an HMAC over
both nonces (dom0's fresh for each hello, used once), so a stray hello or a replayed
one is refused. Every later frame from the host carries a MAC, under a key derived
for that session, over its sequence number and content: a peer that did not pass
the exchange (another process on the socket once the host's connection ended,
unseen by dom0) or a replay is not obeyed.
"""

from __future__ import annotations

import hmac
import os
import struct

MAGIC = b"SVX1"
HEADER = struct.Struct(">4scII")
MAX_PAYLOAD = 1 << 20
NONCE_BYTES = 16  # sent as hex
TAG_BYTES = 16
KEY_MIN_BYTES = 16
_TAGGED = struct.Struct(">QcI")  # sequence number, kind, stream


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


# ---- authentication ------------------------------------------------------------------
def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES).hex().encode()


def is_nonce(value: bytes) -> bool:
    return len(value) == 2 * NONCE_BYTES and all(c in b"0123456789abcdef" for c in value)


def proof(key: bytes, role: bytes, host_nonce: bytes, dom0_nonce: bytes) -> bytes:
    """What ``role`` (b"host" or b"dom0") answers to prove it holds ``key`` (hex)."""
    msg = b"sv-dom0 proof\0" + role + b"\0" + host_nonce + b"\0" + dom0_nonce
    return hmac.new(key, msg, "sha256").hexdigest().encode()


def session_key(key: bytes, host_nonce: bytes, dom0_nonce: bytes) -> bytes:
    return hmac.digest(key, b"sv-dom0 session\0" + host_nonce + b"\0" + dom0_nonce,
                       "sha256")


def tag(skey: bytes, seq: int, kind: bytes, stream: int, payload: bytes) -> bytes:
    """The MAC of the ``seq``-th frame the host sends in a session."""
    mac = hmac.new(skey, _TAGGED.pack(seq, kind, stream), "sha256")
    mac.update(payload)
    return mac.digest()[:TAG_BYTES]


def parse_key(text: bytes) -> bytes:
    """A key file's content (hex) as the key; ValueError if it is not one."""
    key = bytes.fromhex(text.decode("ascii").strip())
    if len(key) < KEY_MIN_BYTES:
        raise ValueError(f"a key of {len(key)} bytes is too short")
    return key
