"""A unix socket of dom0 reached from this machine: a port forward over the channel.

Each connection to the local socket starts, through the dom0 command channel, a
small relay in dom0 that connects to the remote socket and copies bytes both ways
(its stdin to the socket, the socket to its stdout). So a client here (the
sanvisor CLI, ``--home DIR`` whose ``agent.sock`` is the local end) talks to an
agent that runs in a nested host's dom0.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from sanvisor.xenhost.channel import Sink

#: Run by dom0's Python with the socket path as its argument.
RELAY = """\
import os, socket, sys, threading
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
def up():
    while True:
        data = os.read(0, 65536)
        if not data:
            break
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while True:
    data = s.recv(65536)
    if not data:
        break
    os.write(1, data)
"""


class RemoteProc(Protocol):
    def write(self, data: bytes, deadline: float | None = None) -> None: ...
    def close_stdin(self) -> None: ...
    def kill(self, signum: int = 9) -> None: ...
    def wait(self, timeout: float | None = None) -> int: ...


Spawn = Callable[..., RemoteProc]


class UnixForward:
    """``local`` (created 0600) forwarded to dom0's ``remote``; ``python`` is the
    argv prefix that runs a Python in dom0 (e.g. agentbundle.python_argv())."""

    def __init__(self, spawn: Spawn, python: list[str], remote: str, local: Path) -> None:
        self.spawn, self.python, self.remote, self.local = spawn, python, remote, local
        self.connections = 0
        self.timeout = 300.0  # the longest a forwarded connection may last
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> UnixForward:
        self.local.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.local))
        finally:
            os.umask(old)
        sock.listen(16)
        self._sock = sock
        t = threading.Thread(target=self._accept, name="forward-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        """One connection: the relay's output to the client; when the relay ends (the
        agent closed its side), so does the client's connection."""
        def down(data: bytes) -> None:
            with contextlib.suppress(OSError):
                conn.sendall(data)

        sink: Sink = down
        try:
            proc = self.spawn([*self.python, "-c", RELAY, self.remote], on_out=sink)
        except Exception:
            conn.close()
            raise
        up = threading.Thread(target=self._up, args=(conn, proc), daemon=True)
        up.start()
        try:
            proc.wait(self.timeout)
        except Exception:
            proc.kill()
        finally:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            up.join(5)
            conn.close()

    @staticmethod
    def _up(conn: socket.socket, proc: RemoteProc) -> None:
        with contextlib.suppress(Exception):  # the connection or the relay went away
            while data := conn.recv(65536):
                proc.write(data)
            proc.close_stdin()

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        self.local.unlink(missing_ok=True)
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> UnixForward:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
