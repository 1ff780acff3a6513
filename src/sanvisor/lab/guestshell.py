"""Run commands in a guest-kit guest through its serial console.

The guest kit's /init keeps a root shell on ttyS0. We connect to the console
socket, type a command framed by markers, read until the end marker, and
disconnect, so a person can still attach with `sanvisor console` in between.
"""

from __future__ import annotations

import re
import socket
import time

from sanvisor.errors import GuestCommandError as GuestCommandError  # re-exported


class GuestShell:
    """A root shell on the guest's serial console (connects, runs, disconnects)."""

    def __init__(self, sock_path: str) -> None:
        self.sock_path = sock_path
        self.n = 0

    def run(self, cmd: str, timeout: float = 30.0) -> str:
        self.n += 1
        n = self.n
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(self.sock_path)
            s.settimeout(timeout)
            # the arithmetic keeps the tty's echo of our line from matching the markers
            line = f"echo @@B$(({n}+0))@@; {cmd}; echo @@E$(({n}+0))@@$?@@\n"
            s.sendall(line.encode())
            buf = b""
            end = re.compile(rb"@@E" + str(n).encode() + rb"@@(\d+)@@")
            deadline = time.monotonic() + timeout
            while not end.search(buf):
                if time.monotonic() > deadline:
                    raise GuestCommandError(f"guest did not finish {cmd!r}: {buf[-500:]!r}")
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    raise GuestCommandError(f"guest did not finish {cmd!r} within "
                                            f"{timeout:g} s: {buf[-500:]!r}") from None
                if not chunk:
                    raise GuestCommandError("console closed")
                buf += chunk
        text = buf.decode(errors="replace")
        start = text.index(f"@@B{n}@@") + len(f"@@B{n}@@")
        m = end.search(buf)
        assert m is not None
        body = text[start:text.index(f"@@E{n}@@")]
        rc = int(m.group(1))
        if rc != 0:
            raise GuestCommandError(f"guest command {cmd!r} failed rc={rc}: {body!r}")
        return body.replace("\r", "").strip("\n")

    def counter(self) -> int:
        return int(self.run("cat /run/counter"))
