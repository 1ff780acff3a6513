"""`sanvisor console`: attach a terminal to a guest's serial console.

Ctrl-] detaches; the guest keeps running and its output keeps being logged,
so one can attach and detach any number of times.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import termios
import tty

ESCAPE = b"\x1d"  # Ctrl-]


def attach(sock_path: str, name: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(sock_path)
    except OSError as exc:
        print(f"sanvisor: cannot attach to {name}'s console: {exc.strerror}", file=sys.stderr)
        return 1
    stdin = sys.stdin.fileno()
    is_tty = os.isatty(stdin)
    saved = termios.tcgetattr(stdin) if is_tty else None
    if is_tty:
        tty.setraw(stdin, termios.TCSANOW)  # NOW, not FLUSH: keep what was typed ahead
        print(f"Connected to {name}'s console (Ctrl-] to detach)\r", file=sys.stderr)
    out = sys.stdout.buffer
    stdin_open = True
    try:
        while True:
            fds = [sock] + ([stdin] if stdin_open else [])
            ready, _, _ = select.select(fds, [], [])
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    break
                out.write(data)
                out.flush()
            if stdin in ready:
                data = os.read(stdin, 4096)
                if not data:
                    stdin_open = False
                    if not is_tty:
                        break
                    continue
                if ESCAPE in data:
                    sock.sendall(data.split(ESCAPE, 1)[0])
                    break
                sock.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
            print("\r", file=sys.stderr)
        with contextlib.suppress(OSError):
            sock.close()
    return 0
