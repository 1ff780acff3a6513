"""The command server inside a nested Xen host's dom0 (standard library only).

It runs as ``python -m sanvisor.xenhost.dom0server PORT`` from dom0's ``/init`` on the
virtio-serial port the outer host reaches through a unix socket, and multiplexes
processes over it (frames: :mod:`sanvisor.xenhost.wire`). Processes are started with
``posix_spawn`` (a vfork: a fork of this process costs ~12 ms under a PV dom0 on TCG,
a vfork almost nothing), with pipes or a pseudo-terminal (``xl console`` wants one),
each under its own deadline.

Nothing runs before the host proved that it holds the channel's key (the hello
exchange of :mod:`sanvisor.xenhost.wire`: a challenge, an HMAC over both nonces),
and every later frame must carry the session's MAC: a frame that does not ends the
session (its sender is not the host that authenticated). The key is read from
``KEYFILE`` (default ``/etc/sanvisor/ctl.key``, root's, in dom0's initramfs).

When the host side goes away (read returns end-of-file), every process it started
is killed and the server waits for the next connection.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import os
import select
import signal
import sys
import time

from sanvisor.xenhost import wire

READ_SIZE = 65536
#: Output still arriving this long after the process exited belongs to a grandchild
#: that kept the pipe (a daemon); the exit is reported without waiting for it.
LINGER_S = 0.3
KEY_FILE = "/etc/sanvisor/ctl.key"
MAX_CHALLENGES = 8  # hellos answered and not yet responded to (each used once)


class Proc:
    """A process started for the host (no dataclass: keep dom0's imports few)."""

    def __init__(self, stream: int, pid: int, stdin: int, outputs: dict[int, bytes],
                 deadline: float) -> None:
        self.stream = stream
        self.pid = pid
        self.stdin: int | None = stdin
        self.outputs = outputs  # fd -> frame kind
        self.deadline = deadline
        self.status: int | None = None
        self.exited_at = 0.0
        self.pending = b""  # stdin not yet taken by the process
        self.stdin_eof = False


def read_key(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return wire.parse_key(f.read())
    except (OSError, ValueError) as exc:
        print(f"dom0server: no key ({path}: {exc}): every hello is refused",
              file=sys.stderr)
        return None


class Server:
    def __init__(self, port: str, key_file: str = KEY_FILE) -> None:
        """``port``: the device to serve, or ``fd:N`` for an inherited socket (tests);
        the server returns when a socket's peer goes away."""
        self.port = port
        self.key = read_key(key_file)
        self.is_socket = port.startswith("fd:")
        if self.is_socket:
            self.fd = int(port[3:])
            os.set_blocking(self.fd, False)
        else:
            self.fd = os.open(port, os.O_RDWR | os.O_NONBLOCK)
        self.running = True
        self.session: bytes | None = None  # the nonce of the host connection we serve
        self.skey: bytes | None = None  # its session key (None: nobody authenticated)
        self.seq = 0  # the sequence number of the next frame it sends
        self.challenges: dict[bytes, bytes] = {}  # host nonce -> our nonce, pending
        self.parser = wire.Parser()
        self.procs: dict[int, Proc] = {}
        self.by_fd: dict[int, Proc] = {}
        self.by_stdin: dict[int, Proc] = {}
        self.poll = select.poll()
        self.poll.register(self.fd, select.POLLIN)
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda _s, _f: None)
        self.poll.register(self.wake_r, select.POLLIN)

    # -- output to the host ------------------------------------------------------------
    def send(self, kind: bytes, stream: int, payload: bytes = b"") -> None:
        data = wire.frame(kind, stream, payload)
        while data:
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                select.select([], [self.fd], [], 1.0)
                continue
            except OSError:
                return  # host not connected: nobody to tell
            data = data[n:]

    # -- requests --------------------------------------------------------------------
    def handle(self, kind: bytes, stream: int, payload: bytes) -> None:
        if kind == b"H":
            self.hello(payload)
            return
        if kind == b"R":
            self.respond(payload)
            return
        if self.skey is None or not self.authentic(kind, stream, payload):
            if kind == b"S":
                self.send(b"F", stream, b"not authenticated: nothing runs before the "
                          b"hello exchange")
            return
        payload = payload[wire.TAG_BYTES:]
        if kind == b"S":
            self.spawn(stream, payload)
        elif kind == b"I":
            self.feed_stdin(stream, payload)
        elif kind == b"K" and stream in self.procs:
            with contextlib.suppress(OSError, ValueError):
                os.kill(self.procs[stream].pid, int(payload or b"9"))

    # -- authentication -----------------------------------------------------------------
    def hello(self, nonce: bytes) -> None:
        """A host's hello: challenge it (the same challenge to a repeated hello)."""
        if not wire.is_nonce(nonce) or nonce == self.session:
            return  # garbage, or a late copy of the authenticated host's own hello
        ours = self.challenges.pop(nonce, None) or wire.new_nonce()
        self.challenges[nonce] = ours
        while len(self.challenges) > MAX_CHALLENGES:
            del self.challenges[next(iter(self.challenges))]
        self.send(b"C", 0, nonce + b" " + ours)

    def respond(self, payload: bytes) -> None:
        nonce, _, mac = payload.partition(b" ")
        ours = self.challenges.pop(nonce, None)
        if self.key is None:
            why = "dom0 has no key"
        elif ours is None:
            why = "no challenge pending for this hello (replayed?)"
        elif not hmac.compare_digest(mac, wire.proof(self.key, b"host", nonce, ours)):
            why = "wrong key"
        else:
            if self.session is not None and nonce != self.session:
                # a new host connection: the old one's processes have nobody to report
                # to (the host may reconnect before this end ever reads end-of-file)
                self.disconnect(reset_parser=False)
            self.session, self.seq = nonce, 0
            self.skey = wire.session_key(self.key, nonce, ours)
            self.send(b"H", 0, nonce + b" " + wire.proof(self.key, b"dom0", nonce, ours))
            return
        print(f"dom0server: hello refused: {why}", file=sys.stderr)
        self.send(b"D", 0, nonce[:64] + b" " + why.encode())

    def authentic(self, kind: bytes, stream: int, payload: bytes) -> bool:
        """Whether the frame is the session's next one; if not, the session ends."""
        assert self.skey is not None
        mac, body = payload[:wire.TAG_BYTES], payload[wire.TAG_BYTES:]
        if hmac.compare_digest(mac, wire.tag(self.skey, self.seq, kind, stream, body)):
            self.seq += 1
            return True
        print("dom0server: a frame without the session's MAC: session ended",
              file=sys.stderr)
        nonce = self.session or b"-"
        self.disconnect(reset_parser=False)  # its processes killed, then the host told
        self.send(b"D", 0, nonce + b" session ended: a frame without its MAC")
        return False

    def spawn(self, stream: int, payload: bytes) -> None:
        try:
            argv, timeout, use_pty = wire.parse_spawn(payload)
        except ValueError as exc:
            self.send(b"F", stream, f"bad spawn request: {exc}".encode())
            return
        opened: list[int] = []
        try:
            if use_pty:
                master, slave = os.openpty()
                opened += [master, slave]
                ours = {master: b"O"}
                stdin_w = os.dup(master)
                opened.append(stdin_w)
                actions = [(os.POSIX_SPAWN_DUP2, slave, n) for n in (0, 1, 2)]
                theirs = [slave]
            else:
                in_r, stdin_w = os.pipe()
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                opened += [in_r, stdin_w, out_r, out_w, err_r, err_w]
                ours = {out_r: b"O", err_r: b"E"}
                actions = [(os.POSIX_SPAWN_DUP2, in_r, 0), (os.POSIX_SPAWN_DUP2, out_w, 1),
                           (os.POSIX_SPAWN_DUP2, err_w, 2)]
                theirs = [in_r, out_w, err_w]
            for fd in [*ours, stdin_w]:  # ours only: not for the process, never blocking
                os.set_inheritable(fd, False)
                os.set_blocking(fd, False)
            pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions,
                                  setsid=True)
        except (OSError, ValueError) as exc:
            for fd in opened:
                os.close(fd)
            self.send(b"F", stream, f"{argv[:1]}: {exc}".encode())
            return
        for fd in theirs:
            os.close(fd)
        proc = Proc(stream, pid, stdin_w, dict(ours),
                    time.monotonic() + timeout if timeout > 0 else 0.0)
        self.procs[stream] = proc
        for fd in ours:
            self.by_fd[fd] = proc
            self.poll.register(fd, select.POLLIN)

    def feed_stdin(self, stream: int, data: bytes) -> None:
        """Queue ``data`` for the process; each chunk the process has taken is acked
        (``A``, its length), so the host never has much in flight."""
        proc = self.procs.get(stream)
        if proc is None or proc.stdin is None:
            self.send(b"A", stream, str(len(data)).encode())  # nobody reads: discard
            return
        if not data:
            proc.stdin_eof = True
        proc.pending += data
        self.push_stdin(proc)

    def push_stdin(self, proc: Proc) -> None:
        assert proc.stdin is not None
        taken = 0
        try:
            while proc.pending:
                n = os.write(proc.stdin, proc.pending[:READ_SIZE])
                proc.pending = proc.pending[n:]
                taken += n
        except BlockingIOError:
            pass
        except OSError:  # the process stopped reading: drop the rest
            taken += len(proc.pending)
            proc.pending = b""
            proc.stdin_eof = True
        if taken:
            self.send(b"A", proc.stream, str(taken).encode())
        if proc.pending:
            self.poll.register(proc.stdin, select.POLLOUT)
            self.by_stdin[proc.stdin] = proc
            return
        if proc.stdin in self.by_stdin:
            self.poll.unregister(proc.stdin)
            del self.by_stdin[proc.stdin]
        if proc.stdin_eof:
            self.close_stdin(proc)

    def close_stdin(self, proc: Proc) -> None:
        if proc.stdin is None:
            return
        if proc.stdin in self.by_stdin:
            self.poll.unregister(proc.stdin)
            del self.by_stdin[proc.stdin]
        os.close(proc.stdin)
        proc.stdin = None

    # -- process output and exit -------------------------------------------------------
    def drain(self, fd: int) -> None:
        proc = self.by_fd[fd]
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:  # EIO: the pty's other side is closed
            data = b""
        if data:
            self.send(proc.outputs[fd], proc.stream, data)
            return
        self.poll.unregister(fd)
        del self.by_fd[fd], proc.outputs[fd]
        os.close(fd)

    def reap(self) -> None:
        now = time.monotonic()
        for proc in list(self.procs.values()):
            if proc.status is None:
                if proc.deadline and now > proc.deadline:
                    self.kill(proc)
                try:
                    pid, status = os.waitpid(proc.pid, os.WNOHANG)
                except ChildProcessError:
                    pid, status = proc.pid, 255 << 8
                if pid:
                    proc.status = os.waitstatus_to_exitcode(status)
                    proc.exited_at = now
            if proc.status is not None and (not proc.outputs
                                            or now - proc.exited_at > LINGER_S):
                self.finish(proc)

    def kill(self, proc: Proc) -> None:
        for target in (-proc.pid, proc.pid):  # its session first (setsid: pgid == pid)
            with contextlib.suppress(OSError):
                os.kill(target, signal.SIGKILL)

    def finish(self, proc: Proc) -> None:
        for fd in list(proc.outputs):
            self.drain(fd)
            if fd in proc.outputs:
                self.poll.unregister(fd)
                del self.by_fd[fd]
                os.close(fd)
        proc.outputs.clear()
        self.close_stdin(proc)
        del self.procs[proc.stream]
        code = proc.status if proc.status is not None else 255
        self.send(b"X", proc.stream, str(128 - code if code < 0 else code).encode())

    def disconnect(self, reset_parser: bool = True) -> None:
        """The host went away: nobody will read what these processes say."""
        for proc in list(self.procs.values()):
            if proc.status is None:
                self.kill(proc)
                os.waitpid(proc.pid, 0)
                proc.status = -9
            self.finish(proc)
        self.session = self.skey = None
        self.challenges.clear()
        if reset_parser:
            self.parser.reset()

    # -- main loop ---------------------------------------------------------------------
    def serve(self) -> None:
        self.send(b"H", 0, b"sv-dom0 2")
        while self.running:
            timeout = 100 if self.procs else None
            for fd, _ev in self.poll.poll(timeout):
                if fd == self.fd:
                    self.read_port()
                elif fd == self.wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 512)
                elif fd in self.by_fd:
                    self.drain(fd)
                elif fd in self.by_stdin:
                    self.push_stdin(self.by_stdin[fd])
            self.reap()

    def read_port(self) -> None:
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                data = b""
            else:
                return
        if not data:
            self.disconnect()
            self.running = not self.is_socket
            time.sleep(0.05)  # a virtio port without a host polls readable: don't spin
            return
        for kind, stream, payload in self.parser.feed(data):
            self.handle(kind, stream, payload)


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print("usage: dom0server PORT [KEYFILE]", file=sys.stderr)
        return 2
    Server(*sys.argv[1:]).serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
