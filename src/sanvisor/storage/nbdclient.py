"""A small blocking NBD client (fixed newstyle): list exports, open one, do I/O.

Used by the host side (SCSI rescan lists what each HBA sees) and by tests.
``source`` binds the connection to an HBA's address, so it goes through that
HBA's fabric and the array knows which initiator asks.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass

from sanvisor.errors import NbdError as NbdError  # re-exported
from sanvisor.storage import nbdproto as P


@dataclass
class Export:
    name: str
    description: str

    def fields(self) -> dict[str, str]:
        return dict(kv.split("=", 1) for kv in self.description.split() if "=" in kv)


class NbdClient:
    def __init__(self, host: str, port: int = 10809, *, source: str | None = None,
                 timeout: float = 10.0) -> None:
        """``host`` may be a unix socket path (starting with '/')."""
        unix = host.startswith("/")
        self.sock = socket.socket(socket.AF_UNIX if unix else socket.AF_INET,
                                  socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            if source:
                self.sock.bind((source, 0))
            self.sock.connect(host if unix else (host, port))
            self._greet()
        except OSError as exc:
            self.sock.close()
            raise NbdError(f"cannot reach the array at {host}:{port}"
                           f"{' from ' + source if source else ''}: {exc}") from exc
        self.size = 0
        self.flags = 0
        self.session: int | None = None  # the array's id of this session (INFO_X_SESSION)
        self._cookie = 0
        self._pending: dict[int, tuple[int, int]] = {}  # cookie -> (cmd, length)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise NbdError("the array closed the connection")
            buf += chunk
        return bytes(buf)

    def _greet(self) -> None:
        magic, opt, flags = struct.unpack(">QQH", self._recv(18))
        if magic != P.NBDMAGIC or opt != P.IHAVEOPT or not flags & P.FLAG_FIXED_NEWSTYLE:
            raise NbdError("not a fixed-newstyle NBD server")
        self.sock.sendall(struct.pack(">I", P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES))

    def _option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(P.OPT_HEADER.pack(P.IHAVEOPT, opt, len(data)) + data)

    def _reply(self) -> tuple[int, bytes]:
        magic, _opt, rtype, length = P.OPT_REPLY.unpack(self._recv(20))
        if magic != P.REPLY_MAGIC:
            raise NbdError("bad option reply")
        return rtype, self._recv(length)

    def exports(self) -> list[Export]:
        self._option(P.OPT_LIST)
        out: list[Export] = []
        while True:
            rtype, data = self._reply()
            if rtype == P.REP_ACK:
                return out
            if rtype != P.REP_SERVER:
                raise NbdError(f"LIST refused ({rtype:#x})")
            (n,) = struct.unpack(">I", data[:4])
            out.append(Export(data[4:4 + n].decode(), data[4 + n:].decode()))

    def go(self, name: str) -> None:
        """Open export ``name`` (asking for the array's session id, if it gives one)."""
        self._option(P.OPT_GO, P.go_request(name, (P.INFO_X_SESSION,)))
        while True:
            rtype, data = self._reply()
            if rtype == P.REP_ACK:
                return
            if rtype == P.REP_INFO and len(data) >= 2:
                (itype,) = struct.unpack_from(">H", data)
                if itype == P.INFO_EXPORT and len(data) == 12:
                    _, self.size, self.flags = struct.unpack(">HQH", data)
                elif itype == P.INFO_X_SESSION and len(data) == 10:
                    (self.session,) = struct.unpack_from(">Q", data, 2)
            elif rtype & (1 << 31):
                raise NbdError(f"export {name!r}: {data.decode(errors='replace') or rtype}")

    def fence(self, tokens: list[int]) -> None:
        """Ask the array to fence sessions (OPT_X_FENCE, during the handshake); returns
        once it confirmed none of them can execute anything any more."""
        self._option(P.OPT_X_FENCE, P.fence_request(tokens))
        rtype, data = self._reply()
        if rtype != P.REP_ACK:
            raise NbdError(f"fence refused ({rtype:#x}): {data.decode(errors='replace')}")

    def abort(self) -> None:
        self._option(P.OPT_ABORT)
        with contextlib.suppress(NbdError, OSError):
            self._reply()
        self.close()

    def request(self, cmd: int, offset: int, length: int, data: bytes = b"",
                flags: int = 0) -> tuple[int, bytes]:
        """One request; returns (error, data read)."""
        cookie = self.send(cmd, offset, length, data, flags)
        got, err, payload = self.receive()
        if got != cookie:
            raise NbdError("bad reply")
        return err, payload

    def send(self, cmd: int, offset: int, length: int, data: bytes = b"",
             flags: int = 0) -> int:
        """Send a request without waiting for its reply (pipelining); its cookie."""
        self._cookie += 1
        self._pending[self._cookie] = (cmd, length)
        self.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, self._cookie, offset,
                                         length) + data)
        return self._cookie

    def receive(self) -> tuple[int, int, bytes]:
        """The next reply: (cookie, error, data read)."""
        magic, err, cookie = P.SIMPLE_REPLY.unpack(self._recv(16))
        if magic != P.SIMPLE_REPLY_MAGIC or cookie not in self._pending:
            raise NbdError("bad reply")
        cmd, length = self._pending.pop(cookie)
        payload = self._recv(length) if cmd == P.CMD_READ and not err else b""
        return cookie, err, payload

    def pread(self, length: int, offset: int) -> bytes:
        err, data = self.request(P.CMD_READ, offset, length)
        if err:
            raise NbdError(f"read at {offset}: error {err}")
        return data

    def pwrite(self, data: bytes, offset: int, fua: bool = False) -> None:
        err, _ = self.request(P.CMD_WRITE, offset, len(data), data,
                              P.CMD_FLAG_FUA if fua else 0)
        if err:
            raise NbdError(f"write at {offset}: error {err}")

    def flush(self) -> None:
        err, _ = self.request(P.CMD_FLUSH, 0, 0)
        if err:
            raise NbdError(f"flush: error {err}")

    def disconnect(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, 0, 0, 0))
        self.close()
