"""The dom0 command server and the host's channel, for real over a socketpair: the
server runs in its own process on this host, as it does in dom0."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanvisor.xenhost import dom0server, wire
from sanvisor.xenhost.channel import Channel, ChannelError


def test_parser_resyncs_on_garbage_and_split_frames() -> None:
    p = wire.Parser()
    data = b"noise" + wire.frame(b"O", 3, b"abc") + b"SVX" + wire.frame(b"X", 3, b"0")
    got = []
    for i in range(len(data)):  # one byte at a time
        got += p.feed(data[i:i + 1])
    assert got == [(b"O", 3, b"abc"), (b"X", 3, b"0")]
    bogus = wire.HEADER.pack(wire.MAGIC, b"O", 1, wire.MAX_PAYLOAD + 1)
    assert p.feed(bogus + wire.frame(b"A", 1, b"5")) == [(b"A", 1, b"5")]


def test_spawn_payload_roundtrip() -> None:
    raw = wire.spawn_payload(["sh", "-c", "echo 'a b'"], timeout=2.5, pty=True)
    assert wire.parse_spawn(raw) == (["sh", "-c", "echo 'a b'"], 2.5, True)
    with pytest.raises(ValueError):
        wire.spawn_payload([], timeout=1)
    with pytest.raises(ValueError):
        wire.spawn_payload(["a\0b"], timeout=1)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Channel, subprocess.Popen[bytes]]]:
    key = os.urandom(32)
    (tmp_path / "dom0.key").write_text(key.hex())
    ours, theirs = socket.socketpair()
    src = Path(dom0server.__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-S", dom0server.__file__,
                             f"fd:{theirs.fileno()}", str(tmp_path / "dom0.key")],
                            pass_fds=[theirs.fileno()],
                            env=dict(os.environ, PYTHONPATH=str(src)))
    theirs.close()
    chan = Channel("test", hello_timeout=10, sock=ours, key=key)
    try:
        yield chan, proc
    finally:
        chan.close()
        try:
            proc.wait(10)
        finally:
            proc.kill()
            proc.wait()


def test_run_collects_output_rc_and_stdin(served: tuple[Channel, object]) -> None:
    chan, _ = served
    assert chan.run(["sh", "-c", "cat; echo oops >&2; exit 4"], 5, b"hello\n") == (
        4, "hello\n", "oops\n")
    assert chan.run(["printf", "%s|", "a b", "c"], 5) == (0, "a b|c|", "")
    big = os.urandom(3 << 20)  # more than the flow-control window
    assert chan.run(["sh", "-c", "wc -c; echo x >&2"], 20, big) == (0, f"{len(big)}\n", "x\n")
    text = b"0123456789abcdef" * (1 << 16)  # 1 MiB: output flows while input does
    assert chan.run(["cat"], 20, text) == (0, text.decode(), "")


def test_deadline_kills_and_missing_program_fails(served: tuple[Channel, object]) -> None:
    chan, _ = served
    t0 = time.monotonic()
    rc, _, _ = chan.run(["sleep", "30"], timeout=0.5)
    assert rc == 137 and time.monotonic() - t0 < 10
    with pytest.raises(ChannelError, match="no-such-program"):
        chan.run(["no-such-program-sv"], 5)


def test_concurrent_processes_and_a_pty(served: tuple[Channel, object]) -> None:
    chan, _ = served
    seen = bytearray()
    got = threading.Event()

    def sink(data: bytes) -> None:
        seen.extend(data)
        if b"tty=yes" in seen:
            got.set()

    console = chan.spawn(["sh", "-c", "[ -t 0 ] && echo tty=yes; cat"], pty=True, on_out=sink)
    results = []
    workers = [threading.Thread(target=lambda i=i: results.append(
        chan.run(["sh", "-c", f"echo {i}"], 5))) for i in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(20)
    assert sorted(r[1] for r in results) == [f"{i}\n" for i in range(8)]
    assert got.wait(10), seen
    console.write(b"ping\n")
    deadline = time.monotonic() + 10
    while seen.count(b"ping") < 2:  # the pty's echo, then cat's copy
        assert time.monotonic() < deadline, seen
        time.sleep(0.01)
    console.kill()
    assert console.wait(10) == 137


def test_host_going_away_kills_its_processes(
        served: tuple[Channel, subprocess.Popen[bytes]], tmp_path: Path) -> None:
    chan, server = served
    pidfile = tmp_path / "pid"
    chan.spawn(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"])
    deadline = time.monotonic() + 10
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pid = int(pidfile.read_text())
    chan.close()
    assert server.wait(10) == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# (a new host session: tests/unit/test_dom0auth.py, behind a QEMU-like relay)
