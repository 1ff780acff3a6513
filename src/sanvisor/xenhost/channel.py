"""The command channel between the outer host and dom0 of a nested Xen.

Transport: the nested QEMU's second serial port (COM2, I/O 0x2f8, IRQ 3) is a unix
socket on the outer host (``-chardev socket,server=on,wait=off``). Xen is told to use
only COM1 (``console=com1 com1=...``), so COM2 is left to dom0, where Linux's 8250
driver makes it ``/dev/ttyS1``; the dom0 server puts it in raw mode (no echo, no
CR/LF translation, no line-length limit).

Protocol: one ASCII line per message, fields separated by one space, ``-`` standing
for an empty field; payloads are base64 (no line wrapping), so no field holds a
space or newline:

* dom0 -> host, once the server runs: ``HELLO sv-xenctl 1``
* host -> dom0: ``REQ <id> <timeout-s> <n1> <n2>``, newline, then ``n1`` bytes of
  base64 script and ``n2`` bytes of base64 stdin (no newline after them; the server
  reads them with one ``head -c``, much faster than the shell's byte-wise ``read``).
  The script is ``shlex.join(argv)``, run by ``sh`` under ``timeout -s KILL <timeout-s>``;
* dom0 -> host: ``RSP <id> <rc> <b64 stdout> <b64 stderr> END``.

The server handles one request at a time. ``id`` is a fresh integer per request; the
host skips every line that is not the ``RSP`` of the id it waits for (stale replies
of timed-out requests, noise from before the server started), and the trailing
``END`` shows the line was not truncated.
"""

from __future__ import annotations

import base64
import binascii
import shlex
import socket
import time
from collections.abc import Callable

from sanvisor.xenhost.packages import XenHostError


class ChannelError(XenHostError):
    code = "xenhost.channel"


def put_file(run: Callable[..., tuple[int, str, str]], path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` in dom0 through ``run`` (parent directories created)."""
    script = 'mkdir -p "$(dirname "$1")" && cat > "$1"'
    rc, _out, err = run(["sh", "-c", script, "sh", path], stdin=data)
    if rc != 0:
        raise ChannelError(f"writing {path} in dom0 failed: {err.strip()}", path=path)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode() if data else "-"


def _unb64(field: str) -> bytes:
    if field == "-":
        return b""
    try:
        return base64.b64decode(field, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ChannelError(f"bad base64 field in reply: {field[:40]!r}") from exc


def encode_request(req_id: int, argv: list[str], stdin: bytes | None, timeout: int) -> bytes:
    if not argv:
        raise ValueError("empty argv")
    script = base64.b64encode(shlex.join(argv).encode() + b"\n")
    data = base64.b64encode(stdin or b"")
    head = f"REQ {req_id} {max(1, timeout)} {len(script)} {len(data)}\n".encode()
    return head + script + data


def decode_request(raw: bytes) -> tuple[int, int, str, bytes]:
    """(id, timeout, script, stdin) of a whole request (the dom0 side, for tests)."""
    line, _, body = raw.partition(b"\n")
    parts = line.decode().split()
    if len(parts) != 5 or parts[0] != "REQ":
        raise ChannelError(f"not a request: {line[:60]!r}")
    n1, n2 = int(parts[3]), int(parts[4])
    if len(body) != n1 + n2:
        raise ChannelError("request body length mismatch")
    script, data = base64.b64decode(body[:n1]), base64.b64decode(body[n1:])
    return int(parts[1]), int(parts[2]), script.decode(), data


def encode_response(req_id: int, rc: int, out: bytes, err: bytes) -> bytes:
    return f"RSP {req_id} {rc} {_b64(out)} {_b64(err)} END\n".encode()


def decode_response(line: str, req_id: int) -> tuple[int, str, str] | None:
    """(rc, stdout, stderr) when ``line`` is the complete reply to ``req_id``, else None."""
    parts = line.strip().split(" ")
    if len(parts) < 2 or parts[0] != "RSP" or parts[1] != str(req_id):
        return None
    if len(parts) != 6 or parts[5] != "END":
        raise ChannelError(f"truncated reply to request {req_id}", line=line[:80])
    try:
        rc = int(parts[2])
    except ValueError as exc:
        raise ChannelError(f"bad rc in reply: {parts[2]!r}") from exc
    out = _unb64(parts[3]).decode(errors="replace")
    err = _unb64(parts[4]).decode(errors="replace")
    return rc, out, err


class Channel:
    """Client end of the unix socket; :meth:`call` sends one request, waits its reply."""

    def __init__(self, path: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(path)
        self._buf = b""
        self._next_id = int(time.time()) % 100000 * 1000

    def close(self) -> None:
        self._sock.close()

    def readline(self, deadline: float) -> str | None:
        """The next line, or None at ``deadline``."""
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                raise ChannelError("dom0 channel closed (QEMU gone?)")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace")

    def call(self, argv: list[str], timeout: float, stdin: bytes | None = None) -> tuple[
            int, str, str]:
        self._next_id += 1
        req_id = self._next_id
        self._sock.sendall(encode_request(req_id, argv, stdin, int(timeout + 0.999)))
        deadline = time.monotonic() + timeout + 10  # transfer time on top of the command
        while True:
            line = self.readline(deadline)
            if line is None:
                raise ChannelError(f"no reply to {argv[:3]} within {timeout:.0f}s",
                                   argv=argv)
            reply = decode_response(line, req_id)
            if reply is not None:
                return reply
