"""The outer host's end of a nested Xen host's command channel.

Transport: a virtio-serial port of the nested QEMU (``sanvisor.ctl``), a unix socket
(mode 0600 in the host's work directory) on the outer host; in dom0,
:mod:`sanvisor.xenhost.dom0server` serves it. Any number of dom0 processes run at
once over it (frames: :mod:`sanvisor.xenhost.wire`): short commands whose output is
collected (:meth:`Channel.run`), and long-lived ones whose output is streamed to a
callback (``xl console`` on a pseudo-terminal, a file read back from dom0).

The channel authenticates to dom0's server with the key in ``ctl.key`` next to the
socket (0600; :func:`key_path`): a challenge-response over both ends' nonces, then
a MAC on every frame it sends (:mod:`sanvisor.xenhost.wire`). It also checks dom0's
own proof, so it never drives a dom0 that does not hold the key.

A serial UART was the first transport: QEMU paces it at 115200 baud (~12 KB/s) and
the shell server behind it forked ~7 times per request (~12 ms each in a PV dom0
under TCG), ~95 ms for an empty round trip. This one costs a few milliseconds.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sanvisor.errors import ChannelError as ChannelError  # re-exported
from sanvisor.xenhost import wire

#: Input bytes in flight to one dom0 process before waiting for its acks.
WINDOW = 1 << 20
CHUNK = 256 << 10
HELLO_EVERY = 0.25

Sink = Callable[[bytes], None]


def key_path(sock: str | Path) -> Path:
    """Where the key of the channel on socket ``sock`` is kept: ``ctl.sock`` ->
    ``ctl.key``, in the same (the host's work) directory."""
    return Path(sock).with_suffix(".key")


def read_key(path: Path) -> bytes:
    """The channel's key from ``path``, which only its owner may read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ChannelError(f"no key for the dom0 channel: {path}: {exc.strerror}",
                           path=str(path)) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            raise ChannelError(f"the dom0 channel's key {path} must be a file only its "
                               f"owner can read (mode {stat.S_IMODE(st.st_mode):o})",
                               path=str(path))
        try:
            return wire.parse_key(f.read(4096))
        except ValueError as exc:
            raise ChannelError(f"the dom0 channel's key {path} is not a key: {exc}",
                               path=str(path)) from None


def write_key(path: Path, text: bytes) -> None:
    """Install a key (hex, as the kit has it) at ``path``, mode 0600, atomically."""
    wire.parse_key(text)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(text)
    os.replace(tmp, path)


class Proc:
    """A process in dom0. Output goes to the sinks, or is collected when there are none."""

    def __init__(self, chan: Channel, stream: int, on_out: Sink | None,
                 on_err: Sink | None) -> None:
        self.chan = chan
        self.stream = stream
        self.out = bytearray()
        self.err = bytearray()
        self.on_out = on_out or self.out.extend
        self.on_err = on_err or self.err.extend
        self.rc: int | None = None
        self.failure: str | None = None
        self.inflight = 0
        self.cond = threading.Condition()

    # called by the reader thread
    def _ack(self, n: int) -> None:
        with self.cond:
            self.inflight -= n
            self.cond.notify_all()

    def _end(self, rc: int | None, failure: str | None) -> None:
        with self.cond:
            self.rc, self.failure = rc, failure
            self.cond.notify_all()

    @property
    def done(self) -> bool:
        return self.rc is not None or self.failure is not None

    def write(self, data: bytes, deadline: float | None = None) -> None:
        """Send ``data`` to the process's stdin (blocks while the window is full)."""
        for at in range(0, len(data), CHUNK):
            piece = data[at:at + CHUNK]
            with self.cond:
                while self.inflight + len(piece) > WINDOW and not self.done:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise ChannelError("dom0 process does not take its input")
                    self.cond.wait(left)
                if self.done:
                    return
                self.inflight += len(piece)
            self.chan.send(b"I", self.stream, piece)

    def close_stdin(self) -> None:
        self.chan.send(b"I", self.stream, b"")

    def kill(self, signum: int = 9) -> None:
        self.chan.send(b"K", self.stream, str(signum).encode())

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while not self.done:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise ChannelError(f"dom0 process {self.stream} still running "
                                       f"after {timeout:.0f}s")
                self.cond.wait(left)
        if self.failure is not None:
            raise ChannelError(self.failure)
        assert self.rc is not None
        return self.rc


class Channel:
    """One connection to dom0's server; thread-safe."""

    def __init__(self, path: str, hello_timeout: float = 10.0,
                 sock: socket.socket | None = None, key: bytes | None = None) -> None:
        """Connect to the unix socket ``path`` (or use the connected ``sock``) and
        authenticate with ``key`` (default: read from :func:`key_path` of ``path``)."""
        self.path = path
        self._key = key if key is not None else read_key(key_path(path))
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
            except OSError:
                sock.close()
                raise
        self._sock = sock
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._procs: dict[int, Proc] = {}
        self._next = 0
        self._closed: str | None = None
        self._nonce = wire.new_nonce()
        self._challenge: bytes | None = None  # dom0's nonce, once it challenged us
        self._challenged = threading.Event()
        self._hello = threading.Event()  # dom0 welcomed us, or refused (_refused)
        self._refused: str | None = None
        self._skey: bytes | None = None  # the session's key, once authenticated
        self._seq = 0
        self._reader = threading.Thread(target=self._read, name=f"dom0:{path}", daemon=True)
        self._reader.start()
        try:
            self._authenticate(time.monotonic() + hello_timeout)
        except ChannelError:
            self.close()
            raise

    def _authenticate(self, deadline: float) -> None:
        # dom0 drops what arrives before its server opened the port: say hello again
        # until it answers (a repeated hello gets the same challenge)
        while not self._challenged.wait(
                min(HELLO_EVERY, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise ChannelError(f"dom0 server does not answer on {self.path}")
            self._send_raw(b"H", self._nonce)
        if self._refused is None:
            assert self._challenge is not None
            self._send_raw(b"R", self._nonce + b" " + wire.proof(
                self._key, b"host", self._nonce, self._challenge))
            if not self._hello.wait(max(0.0, deadline - time.monotonic())):
                raise ChannelError(f"dom0 server does not answer on {self.path}")
        if self._refused is not None:
            raise ChannelError(f"dom0 refused the channel on {self.path}: {self._refused}")

    def _send_raw(self, kind: bytes, payload: bytes) -> None:
        with self._send_lock:
            if self._closed:
                raise ChannelError(f"dom0 channel closed: {self._closed}")
            try:
                self._sock.sendall(wire.frame(kind, 0, payload))
            except OSError as exc:
                raise ChannelError(f"dom0 channel: {exc}") from exc

    def send(self, kind: bytes, stream: int, payload: bytes = b"") -> None:
        """Send a frame of the session (with its MAC)."""
        with self._send_lock:
            if self._closed:
                raise ChannelError(f"dom0 channel closed: {self._closed}")
            if self._skey is None:
                raise ChannelError("dom0 channel: not authenticated")
            mac = wire.tag(self._skey, self._seq, kind, stream, payload)
            self._seq += 1
            try:
                self._sock.sendall(wire.frame(kind, stream, mac + payload))
            except OSError as exc:
                raise ChannelError(f"dom0 channel: {exc}") from exc

    def _read(self) -> None:
        parser = wire.Parser()
        reason = "QEMU gone?"
        try:
            while True:
                data = self._sock.recv(1 << 20)
                if not data:
                    break
                for kind, stream, payload in parser.feed(data):
                    self._dispatch(kind, stream, payload)
        except OSError as exc:
            reason = str(exc)
        with self._lock:
            self._closed = self._closed or reason
            procs = list(self._procs.values())
            self._procs.clear()
        for proc in procs:
            proc._end(None, f"dom0 channel closed ({reason})")

    def _handshake(self, kind: bytes, payload: bytes) -> None:
        """dom0's side of the hello exchange (on the reader thread)."""
        nonce, _, rest = payload.partition(b" ")
        if nonce != self._nonce:
            return  # not ours (dom0's banner, an answer to another connection)
        if self._hello.is_set():
            if kind == b"D" and self._skey is not None:  # dom0 ended our session
                self._end(f"dom0 ended the session: {rest.decode(errors='replace')}")
            return
        if kind == b"C" and self._challenge is None:
            self._challenge = rest
            self._challenged.set()
            return
        if kind == b"H" and not rest:
            self._refused = "its command server does not authenticate (an old Xen kit?)"
        elif kind == b"H" and self._challenge is not None:
            want = wire.proof(self._key, b"dom0", self._nonce, self._challenge)
            if hmac.compare_digest(rest, want):
                self._skey = wire.session_key(self._key, self._nonce, self._challenge)
            else:
                self._refused = "dom0 does not hold the channel's key"
        elif kind == b"D":
            self._refused = rest.decode(errors="replace")
        else:
            return
        self._hello.set()
        self._challenged.set()  # (a refusal may come instead of a challenge)

    def _end(self, reason: str) -> None:
        """Close the channel from the reader's side (its link then reconnects)."""
        with self._lock:
            self._closed = self._closed or reason
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # the reader ends, failing every process

    def _dispatch(self, kind: bytes, stream: int, payload: bytes) -> None:
        if kind in (b"C", b"H", b"D"):
            self._handshake(kind, payload)
            return
        if kind == b"F" and payload.startswith(b"not authenticated"):
            self._end("dom0 no longer knows this session")
        with self._lock:
            proc = self._procs.get(stream)
            if proc is not None and kind in (b"X", b"F"):
                del self._procs[stream]
        if proc is None:
            return
        if kind == b"O":
            proc.on_out(payload)
        elif kind == b"E":
            proc.on_err(payload)
        elif kind == b"A":
            proc._ack(int(payload))
        elif kind == b"X":
            proc._end(int(payload), None)
        elif kind == b"F":
            proc._end(None, payload.decode(errors="replace"))

    def spawn(self, argv: list[str], *, timeout: float = 0, pty: bool = False,
              on_out: Sink | None = None, on_err: Sink | None = None) -> Proc:
        """Start ``argv`` in dom0 (``timeout`` 0: no deadline; dom0 kills it after)."""
        payload = wire.spawn_payload(argv, timeout=timeout, pty=pty)
        with self._lock:
            if self._closed:
                raise ChannelError(f"dom0 channel closed: {self._closed}")
            self._next += 1
            proc = Proc(self, self._next, on_out, on_err)
            self._procs[proc.stream] = proc
        self.send(b"S", proc.stream, payload)
        return proc

    def run(self, argv: list[str], timeout: float = 120,
            stdin: bytes | None = None) -> tuple[int, str, str]:
        """Run ``argv`` to completion; (rc, stdout, stderr). rc 137: dom0 killed it at
        ``timeout``."""
        proc = self.spawn(argv, timeout=timeout)
        deadline = time.monotonic() + timeout + 10  # transfer time on top
        if stdin:
            proc.write(stdin, deadline)
        proc.close_stdin()
        rc = proc.wait(max(0.0, deadline - time.monotonic()))
        return rc, proc.out.decode(errors="replace"), proc.err.decode(errors="replace")

    @property
    def closed(self) -> bool:
        return self._closed is not None

    def close(self) -> None:
        with self._send_lock:
            self._closed = self._closed or "closed by us"
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


def put_file(run: Callable[..., tuple[int, str, str]], path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` in dom0 through ``run`` (parent directories created)."""
    script = 'mkdir -p "$(dirname "$1")" && cat > "$1"'
    rc, _out, err = run(["sh", "-c", script, "sh", path], stdin=data)
    if rc != 0:
        raise ChannelError(f"writing {path} in dom0 failed: {err.strip()}", path=path)
