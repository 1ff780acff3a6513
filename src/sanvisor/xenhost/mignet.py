"""dom0's end of a Xen migration stream over the hosts' LAN (standard library only: it
runs in dom0 under the bundled Python, as ``python3 -S mignet.py ...``).

The agents only arrange the stream; xl's bytes go dom0 to dom0 over TCP:

``listen TOKEN MODE ARGV...`` (target): binds dom0's LAN address (``/run/sv-lan``,
written by dom0's init), an ephemeral port; prints ``IP PORT``; takes the first
connection that presents TOKEN (64 hex characters, checked in constant time; any
other connection is dropped and the wait goes on, until ACCEPT_S); stops listening;
then runs ARGV on the connection: ``exec`` makes the socket its stdin and stdout
(``xl migrate-receive``), ``pipe`` feeds a pipe from the socket (``xl restore``
opens ``/proc/self/fd/0``, which a socket cannot be) and exits with ARGV's status.

``connect IP PORT TOKEN [FILE]`` (source): connects, presents TOKEN, then relays
stdin to the socket and the socket to stdout (``xl migrate -s`` runs it: trailing
words xl appends are ignored), or sends FILE (the FIFO ``xl save`` writes).

Bytes move with splice(2) where one end is a pipe: no copy through Python.
"""

from __future__ import annotations

import hmac
import os
import select
import socket
import sys

LAN_FILE = "/run/sv-lan"
TOKEN_LEN = 64
ACCEPT_S = 60.0
CHUNK = 1 << 20
NO_LAN = 3  # exit status: this dom0 has no LAN address


def _move(src: int, dst: int) -> int:
    """One chunk from ``src`` to ``dst`` (at least one a pipe); 0 at EOF."""
    try:
        return os.splice(src, dst, CHUNK)
    except OSError:  # neither end a pipe (a file): copy
        data = os.read(src, CHUNK)
        view = memoryview(data)
        while view:
            view = view[os.write(dst, view):]
        return len(data)


def relay(sock: socket.socket, rfd: int | None, wfd: int | None) -> None:
    """``rfd`` -> the socket and the socket -> ``wfd`` until both directions ended
    (a direction that is None has ended). An end's EOF is passed on: the socket's
    write side shut down, ``wfd`` closed. A peer gone (EPIPE, reset) ends both."""
    s = sock.fileno()
    up, down = rfd is not None, wfd is not None
    try:
        while up or down:
            want = ([rfd] if up and rfd is not None else []) + ([s] if down else [])
            ready, _, _ = select.select(want, [], [])
            if up and rfd in ready and rfd is not None and _move(rfd, s) == 0:
                up = False
                sock.shutdown(socket.SHUT_WR)
            if down and s in ready and wfd is not None and _move(s, wfd) == 0:
                down = False
                os.close(wfd)
    except OSError:
        return


def _accept(srv: socket.socket, token: bytes) -> socket.socket:
    deadline = _now() + ACCEPT_S
    while True:
        left = deadline - _now()
        if left <= 0:
            raise TimeoutError("no source connected in time")
        srv.settimeout(left)
        conn, peer = srv.accept()
        conn.settimeout(5.0)
        got = b""
        try:
            while len(got) < TOKEN_LEN and (part := conn.recv(TOKEN_LEN - len(got))):
                got += part
        except OSError:
            pass
        if len(got) == TOKEN_LEN and hmac.compare_digest(got, token):
            conn.settimeout(None)
            return conn
        print(f"mignet: dropped a connection from {peer[0]} (no valid token)",
              file=sys.stderr, flush=True)
        conn.close()


def _now() -> float:
    return os.times().elapsed


def listen(token: str, mode: str, argv: list[str]) -> int:
    try:
        with open(LAN_FILE) as f:
            ip = f.read().split("/")[0].strip()
    except OSError:
        ip = ""
    if not ip:
        print("mignet: this dom0 has no LAN address", file=sys.stderr)
        return NO_LAN
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind((ip, 0))
    srv.listen(4)
    print(f"{ip} {srv.getsockname()[1]}", flush=True)
    try:
        conn = _accept(srv, token.encode())
    except (OSError, TimeoutError) as exc:
        print(f"mignet: {exc}", file=sys.stderr)
        return 1
    finally:
        srv.close()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if mode == "exec":
        os.dup2(conn.fileno(), 0)
        os.dup2(conn.fileno(), 1)
        conn.close()
        os.execvp(argv[0], argv)
    r, w = os.pipe()
    pid = os.posix_spawnp(argv[0], argv, dict(os.environ),
                          file_actions=[(os.POSIX_SPAWN_DUP2, r, 0),
                                        (os.POSIX_SPAWN_CLOSE, w)])
    os.close(r)
    relay(conn, None, w)
    conn.close()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def connect(ip: str, port: str, token: str, path: str | None) -> int:
    # no create_connection: its getaddrinfo wants the idna codec, which dom0's bundled
    # standard library leaves out; a numeric address needs no lookup
    conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        conn.settimeout(10.0)
        conn.connect((ip, int(port)))
    except (OSError, ValueError) as exc:
        conn.close()
        print(f"mignet: cannot reach the target's dom0 at {ip}:{port}: {exc}",
              file=sys.stderr, flush=True)
        if path is not None:  # the writer (xl save) then fails instead of waiting
            os.close(os.open(path, os.O_RDONLY))
        return 1
    conn.settimeout(None)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn.sendall(token.encode())
    if path is None:
        relay(conn, 0, 1)
    else:
        fd = os.open(path, os.O_RDONLY)
        relay(conn, fd, None)
        os.close(fd)
    conn.close()
    return 0


def main(args: list[str]) -> int:
    if len(args) >= 4 and args[0] == "listen" and args[2] in ("exec", "pipe"):
        return listen(args[1], args[2], args[3:])
    if len(args) >= 4 and args[0] == "connect":
        path = args[4] if len(args) >= 5 and args[4].startswith("/") else None
        return connect(args[1], args[2], args[3], path)
    print("usage: mignet.py listen TOKEN exec|pipe ARGV... | "
          "connect IP PORT TOKEN [FILE]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
