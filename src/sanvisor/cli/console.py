"""`sanvisor console`: attach a terminal to a guest's serial console.

Ctrl-] detaches; the guest keeps running and its output keeps being logged,
so one can attach and detach any number of times. One session at a time: a
second attach is refused in one line and the attached session is told.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import sys
import termios
import tty

ESCAPE = b"\x1d"  # Ctrl-]


def _claim(sock_path: str, name: str) -> int | None:
    """One session per console (QEMU serves one client at a time: a second one would
    hang silently). Returns the lock's fd, or None after telling both sides."""
    try:
        fd = os.open(sock_path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return -1  # no place for a lock (the domain is going away): let connect() say it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raw = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        holder = int(raw) if raw.isdigit() else 0
        if holder:
            with contextlib.suppress(OSError):
                os.kill(holder, signal.SIGUSR1)  # the attached session prints a notice
        print(f"sanvisor: error: {name}'s console is attached by another session"
              f"{f' (pid {holder})' if holder else ''}; detach it first (Ctrl-])",
              file=sys.stderr)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def attach(sock_path: str, name: str) -> int:
    lock = _claim(sock_path, name)
    if lock is None:
        return 1

    def notice(_sig: int, _frame: object) -> None:
        os.write(sys.stderr.fileno(), f"\r\n[sanvisor: another session tried to attach "
                 f"to {name}'s console]\r\n".encode())

    previous = signal.signal(signal.SIGUSR1, notice)
    try:
        return _attach(sock_path, name)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        if lock >= 0:
            os.close(lock)


def _attach(sock_path: str, name: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(sock_path)
    except OSError as exc:
        print(f"sanvisor: error: cannot attach to {name}'s console: {exc.strerror}",
              file=sys.stderr)
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
