"""The dom0 command server authenticates its peer: the real server in a process of
its own, behind a relay that behaves as QEMU's socket chardev does (one client at a
time, and dom0 never sees a client leave), clients over a real unix socket.

Nothing runs for a peer that did not pass the challenge-response over the kit's
key: not with a wrong key, not before the exchange, not by replaying a recorded
one, not on the heels of a host that left (the frames carry the session's MAC).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanvisor.xenhost import dom0server, wire
from sanvisor.xenhost.channel import Channel, ChannelError, key_path, read_key, write_key

DEADLINE = 10.0


class Relay:
    """QEMU's ``-chardev socket,server=on`` in front of a virtio port: a unix socket
    that serves one client at a time; the port (the server's socket) sees one byte
    stream, never the end of a client. What each client sent is kept (``sent``)."""

    def __init__(self, path: Path, port: socket.socket) -> None:
        self.path, self.port = path, port
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.client: socket.socket | None = None
        self.sent: list[bytearray] = []
        self.threads = [threading.Thread(target=f, daemon=True)
                        for f in (self._clients, self._replies)]
        for t in self.threads:
            t.start()

    def _clients(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.sent.append(bytearray())
            self.client = conn
            try:
                while data := conn.recv(65536):
                    self.sent[-1] += data
                    self.port.sendall(data)
            except OSError:
                pass
            self.client = None
            conn.close()

    def _replies(self) -> None:
        while True:
            try:
                data = self.port.recv(65536)
            except OSError:
                return
            if not data:
                return
            if (c := self.client) is not None:
                with contextlib.suppress(OSError):  # that client left: nobody hears it
                    c.sendall(data)

    def close(self) -> None:
        for s in (self.listener, self.port, self.client):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked on them
        for t in self.threads:
            t.join(DEADLINE)
            assert not t.is_alive(), "the relay did not stop"
        self.listener.close()
        self.port.close()


class Dom0:
    """The server (``python -S dom0server.py fd:N KEYFILE``) behind a relay."""

    def __init__(self, tmp: Path, key: bytes | None) -> None:
        keyfile = tmp / "dom0.key"
        if key is not None:
            keyfile.write_text(key.hex() + "\n")
        ours, theirs = socket.socketpair()
        src = Path(dom0server.__file__).resolve().parents[2]
        self.proc = subprocess.Popen(
            [sys.executable, "-S", dom0server.__file__, f"fd:{theirs.fileno()}",
             str(keyfile)], pass_fds=[theirs.fileno()], stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(src)))
        theirs.close()
        self.sock = tmp / "ctl.sock"
        self.relay = Relay(self.sock, ours)
        self.marker = tmp / "ran"
        self.stderr: str | None = None

    def stop(self) -> str:
        """Stop the server (once); what it said on stderr."""
        if self.stderr is None:
            self.relay.close()  # the port's end: the server exits
            try:
                _, err = self.proc.communicate(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                _, err = self.proc.communicate()
            self.stderr = err.decode(errors="replace")
        return self.stderr


class Raw:
    """A client that speaks frames by hand."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(DEADLINE)
        self.sock.connect(str(path))
        self.parser = wire.Parser()
        self.got: list[tuple[bytes, int, bytes]] = []

    def send(self, kind: bytes, stream: int, payload: bytes) -> None:
        self.sock.sendall(wire.frame(kind, stream, payload))

    def expect(self, kind: bytes, stream: int) -> bytes:
        """The payload of the next frame of ``kind`` on ``stream`` (within DEADLINE)."""
        while True:
            for i, (k, s, p) in enumerate(self.got):
                if (k, s) == (kind, stream):
                    del self.got[i]
                    return p
            data = self.sock.recv(65536)
            assert data, f"the server's side closed before {kind!r} on {stream}"
            self.got += self.parser.feed(data)

    def close(self) -> None:
        self.sock.close()


KEY = bytes(range(32))


@pytest.fixture
def dom0(tmp_path: Path) -> Iterator[Dom0]:
    d = Dom0(tmp_path, KEY)
    try:
        yield d
    finally:
        d.stop()


def _spawn_touch(marker: Path) -> bytes:
    return wire.spawn_payload(["sh", "-c", f"echo ran >> {marker}"], timeout=5)


def test_the_right_key_is_served_from_the_file_next_to_the_socket(dom0: Dom0) -> None:
    write_key(key_path(dom0.sock), KEY.hex().encode())
    assert key_path(dom0.sock) == dom0.sock.with_name("ctl.key")
    assert os.stat(key_path(dom0.sock)).st_mode & 0o777 == 0o600
    chan = Channel(str(dom0.sock), hello_timeout=DEADLINE)
    try:
        assert chan.run(["echo", "served"], 5) == (0, "served\n", "")
    finally:
        chan.close()


def test_a_wrong_key_is_refused_and_the_right_one_then_works(dom0: Dom0) -> None:
    with pytest.raises(ChannelError, match=r"refused the channel.*wrong key"):
        Channel(str(dom0.sock), hello_timeout=DEADLINE, key=b"k" * 32)
    chan = Channel(str(dom0.sock), hello_timeout=DEADLINE, key=KEY)
    try:
        assert chan.run(["echo", "ok"], 5) == (0, "ok\n", "")
    finally:
        chan.close()
    assert "hello refused: wrong key" in dom0.stop()


def test_nothing_runs_before_the_exchange(dom0: Dom0) -> None:
    raw = Raw(dom0.sock)
    raw.send(b"S", 1, _spawn_touch(dom0.marker))  # no hello at all
    assert b"not authenticated" in raw.expect(b"F", 1)
    raw.send(b"S", 2, b"\0" * wire.TAG_BYTES + _spawn_touch(dom0.marker))  # a made-up MAC
    assert b"not authenticated" in raw.expect(b"F", 2)
    nonce = os.urandom(16).hex().encode()
    raw.send(b"H", 0, nonce)  # a hello, but no response to the challenge
    assert raw.expect(b"C", 0).startswith(nonce + b" ")
    raw.send(b"S", 3, _spawn_touch(dom0.marker))
    assert b"not authenticated" in raw.expect(b"F", 3)
    raw.send(b"R", 0, nonce + b" " + b"0" * 64)  # a guess
    assert raw.expect(b"D", 0) == nonce + b" wrong key"
    raw.send(b"S", 4, _spawn_touch(dom0.marker))
    assert b"not authenticated" in raw.expect(b"F", 4)
    raw.close()
    assert not dom0.marker.exists()
    chan = Channel(str(dom0.sock), hello_timeout=DEADLINE, key=KEY)  # the same, with the key
    try:
        assert chan.run(["sh", "-c", f"echo ran >> {dom0.marker}"], 5)[0] == 0
    finally:
        chan.close()
    assert dom0.marker.read_text() == "ran\n"


def _record_a_session(dom0: Dom0) -> bytes:
    """A host's whole conversation: hello, response, a process that leaves a mark."""
    chan = Channel(str(dom0.sock), hello_timeout=DEADLINE, key=KEY)
    try:
        assert chan.run(["sh", "-c", f"echo ran >> {dom0.marker}"], 5) == (0, "", "")
    finally:
        chan.close()
    assert dom0.marker.read_text() == "ran\n"
    return bytes(dom0.relay.sent[-1])


def test_a_replayed_exchange_is_refused(dom0: Dom0, tmp_path: Path) -> None:
    recorded = _record_a_session(dom0)
    nonce = wire.Parser().feed(recorded)[0][2]
    # to the same server (which never saw that host leave)
    raw = Raw(dom0.sock)
    raw.sock.sendall(recorded)
    assert raw.expect(b"D", 0) == nonce + b" no challenge pending for this hello (replayed?)"
    assert b"not authenticated" in raw.expect(b"F", 1)
    raw.close()
    # to a server started afresh (dom0 rebooted): a new challenge, the old answer fails
    (tmp_path / "again").mkdir()
    again = Dom0(tmp_path / "again", KEY)
    try:
        raw = Raw(again.sock)
        raw.sock.sendall(recorded)
        assert raw.expect(b"C", 0).startswith(nonce + b" ")
        assert raw.expect(b"D", 0) == nonce + b" wrong key"
        assert b"not authenticated" in raw.expect(b"F", 1)
        raw.close()
    finally:
        again.stop()
    assert dom0.marker.read_text() == "ran\n"  # once, by the host that had the key
    assert not again.marker.exists()


def test_a_peer_after_the_host_left_is_not_obeyed(dom0: Dom0) -> None:
    """dom0 does not see a client of the socket leave (nor the next one come): the
    next one gets nothing of the session, though the session is still on."""
    recorded = _record_a_session(dom0)
    frames = wire.Parser().feed(recorded)
    spawn = next(f for f in frames if f[0] == b"S")
    raw = Raw(dom0.sock)
    raw.send(b"S", 7, _spawn_touch(dom0.marker))  # as if it were the host
    assert b"not authenticated" in raw.expect(b"F", 7)
    raw.send(*spawn)  # the host's own frame, MAC and all, again
    assert b"not authenticated" in raw.expect(b"F", spawn[1])
    raw.close()
    assert dom0.marker.read_text() == "ran\n"


def test_a_new_host_session_kills_the_old_ones_processes(dom0: Dom0) -> None:
    """An agent that reconnects before dom0 saw its old connection end must not find
    the old processes (an old `xl console` holds the console's lock)."""
    old = Channel(str(dom0.sock), hello_timeout=DEADLINE, key=KEY)
    said = bytearray()
    started = threading.Event()

    def sink(data: bytes) -> None:
        said.extend(data)
        if said.endswith(b"\n"):
            started.set()

    old.spawn(["sh", "-c", "echo $$; exec sleep 60"], on_out=sink)
    assert started.wait(DEADLINE)
    pid = int(said)
    old.close()  # dom0 does not see it go
    os.kill(pid, 0)  # still running
    new = Channel(str(dom0.sock), hello_timeout=DEADLINE, key=KEY)
    try:
        with pytest.raises(ProcessLookupError):  # killed before the new one was welcomed
            os.kill(pid, 0)
        assert new.run(["echo", "still served"], 5)[1] == "still served\n"
    finally:
        new.close()


def test_a_frame_without_the_sessions_mac_ends_the_session(dom0: Dom0) -> None:
    """dom0 stops obeying a session once a frame in it is not the host's (its processes
    are killed); the host's channel learns it and closes, so its link reconnects."""
    chan = Channel(str(dom0.sock), hello_timeout=DEADLINE, key=KEY)
    said = bytearray()
    started = threading.Event()

    def sink(data: bytes) -> None:
        said.extend(data)
        if said.endswith(b"\n"):
            started.set()

    proc = chan.spawn(["sh", "-c", "echo $$; exec sleep 60"], on_out=sink)
    assert started.wait(DEADLINE)
    pid = int(said)
    chan._sock.sendall(wire.frame(b"K", proc.stream, b"9"))  # no MAC: not the host's
    chan._reader.join(DEADLINE)
    assert chan.closed and "dom0 ended the session" in str(chan._closed)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert proc.wait(DEADLINE) == 137  # killed (told before the session's end)
    chan.close()
    again = Channel(str(dom0.sock), hello_timeout=DEADLINE, key=KEY)
    try:
        assert again.run(["echo", "back"], 5)[1] == "back\n"
    finally:
        again.close()


def test_a_server_without_a_key_refuses_everyone(tmp_path: Path) -> None:
    d = Dom0(tmp_path, None)
    try:
        with pytest.raises(ChannelError, match="dom0 has no key"):
            Channel(str(d.sock), hello_timeout=DEADLINE, key=KEY)
    finally:
        assert "no key" in d.stop()


def test_the_key_file_is_the_owners_only(tmp_path: Path) -> None:
    path = tmp_path / "ctl.key"
    write_key(path, KEY.hex().encode())
    assert read_key(path) == KEY
    path.chmod(0o640)
    with pytest.raises(ChannelError, match="only its owner can read"):
        read_key(path)
    path.write_text("not hex")
    path.chmod(0o600)
    with pytest.raises(ChannelError, match="is not a key"):
        read_key(path)
    with pytest.raises(ChannelError, match="no key for the dom0 channel"):
        read_key(tmp_path / "missing.key")
