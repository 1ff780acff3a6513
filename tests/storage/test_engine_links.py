"""Link loss: the engine, in a host's network namespace, fails a path the moment
its HBA's link goes down.

- an HBA taken down: from the kernel's link event (netlink RTNLGRP_LINK): every
  poll is set to a minute here, so only the event can explain a failure seen
  within a tenth of a second;
- the switch side of the link going down (the veth's carrier lost): the kernel's
  link watch may hold that event up to a second (seen here: 0.67 s), so the
  carrier of a ready path's HBA is also read every 10 ms: failed within 0.1 s.

A veth pair stands for the HBA and its switch port; a tiny NBD server in the
peer namespace stands for the array (it opens the session and gives its id).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sanvisor.storage import engineproto as E
from tests.storage.enginekit import BUILD, sanitizer_build

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="creates network namespaces")]

ARRAY = r"""
import socket, struct, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("10.99.0.1", 10809)); srv.listen(8); print("up", flush=True)
def serve(c):
    c.sendall(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
    c.recv(4); hdr = c.recv(16); c.recv(struct.unpack(">QII", hdr)[2])
    for rtype, data in ((3, struct.pack(">HQ", 0x5356, 0x1234)), (1, b"")):
        c.sendall(struct.pack(">QIII", 0x3E889045565A9, 7, rtype, len(data)) + data)
    while c.recv(65536): pass
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[tuple[str, str]]:
    host, fab = f"svlh{os.getpid() % 100000}", f"svlf{os.getpid() % 100000}"
    procs: list[subprocess.Popen[bytes]] = []
    ip("netns", "add", host)
    try:
        ip("netns", "add", fab)
        ip("-n", host, "link", "add", "hba0", "type", "veth", "peer", "name", "port",
           "netns", fab)
        ip("-n", host, "addr", "add", "10.99.0.2/24", "dev", "hba0")
        ip("-n", fab, "addr", "add", "10.99.0.1/24", "dev", "port")
        ip("-n", host, "link", "set", "hba0", "up")
        ip("-n", fab, "link", "set", "port", "up")
        array = subprocess.Popen(["ip", "netns", "exec", fab, sys.executable, "-c", ARRAY],
                                 stdout=subprocess.PIPE)
        procs.append(array)
        assert array.stdout is not None and array.stdout.readline() == b"up\n"
        yield host, fab
    finally:
        for p in procs:
            p.kill()
            p.wait()
        subprocess.run(["ip", "netns", "del", host], check=False)
        subprocess.run(["ip", "netns", "del", fab], check=False)


class Ctl:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.buf = b""

    def __call__(self, raw: bytes) -> dict[str, Any]:
        self.sock.sendall(raw)
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            assert chunk, "the engine closed its control socket"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        reply = E.parse(line)
        assert reply.kind == "ok", reply
        return reply.data


def _path(ctl: Ctl) -> dict[str, Any]:
    return dict(ctl(E.line("stats"))["maps"][0]["paths"][0])


def _until(ctl: Ctl, pred: Any, what: str, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while not pred(_path(ctl)):
        assert time.monotonic() - t0 < timeout, f"{what}: {_path(ctl)}"
        time.sleep(0.002)
    return time.monotonic() - t0


def test_a_dead_link_fails_its_path_from_the_kernels_event(netns: tuple[str, str],
                                                          tmp_path: Path) -> None:
    host, fab = netns
    binary = sanitizer_build()
    log = open(tmp_path / "engine.log", "wb")  # noqa: SIM115 - closed below
    engine = subprocess.Popen(["ip", "netns", "exec", host, str(binary), "--control",
                               str(tmp_path / "c.sock"), "--state", str(tmp_path)],
                              stdout=log, stderr=log,
                              env=dict(os.environ, ASAN_OPTIONS="detect_leaks=0"))
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "c.sock").exists():
            assert engine.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        ctl = Ctl(tmp_path / "c.sock")
        ctl(E.line("map", id="w", size=1 << 20, polling_interval=0.1))
        ctl(E.line("path", id="0:0:0:1", map="w", dev="sdb", src="10.99.0.2",
                   target="10.99.0.1:10809", export="w", ifname="hba0"))
        _until(ctl, lambda p: p["state"] == "ready", "the path never came up")
        # the switch side goes down: carrier lost at once, the event maybe later
        ip("-n", fab, "link", "set", "port", "down")
        took = _until(ctl, lambda p: p["state"] == "faulty", "the path did not fail")
        assert took < 0.1, f"{took:.3f} s"
        assert _path(ctl)["reason"] == "link down on hba0" and not _path(ctl)["link"]
        ip("-n", fab, "link", "set", "port", "up")
        _until(ctl, lambda p: p["state"] == "ready", "the path did not come back")
        # the HBA itself goes down, and nothing but the kernel's event can tell
        ctl(E.line("set", link_poll=60, carrier_poll=60))
        ip("-n", host, "link", "set", "hba0", "down")
        took = _until(ctl, lambda p: p["state"] == "faulty", "the path did not fail")
        assert took < 0.1, f"{took:.3f} s: not from an event"
        ip("-n", host, "link", "set", "hba0", "up")
        _until(ctl, lambda p: p["state"] == "ready", "the path did not come back")
        assert json.dumps(ctl(E.line("hello")))
    finally:
        engine.terminate()
        engine.wait(10)
        log.close()
    text = (tmp_path / "engine.log").read_text(errors="replace")
    assert "runtime error" not in text and "AddressSanitizer" not in text, text
    assert BUILD.exists()
