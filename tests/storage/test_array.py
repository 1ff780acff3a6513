"""The disk array: its config (unit), and its NBD service with real clients
(qemu-img, qemu-io, nbdinfo) and a raw client for what they cannot send."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanvisor.errors import ConflictError, NotFoundError, UsageError
from sanvisor.storage import nbdproto as P
from sanvisor.storage.array import ArrayConfig
from sanvisor.storage.nbdclient import NbdClient, NbdError

HBA1 = "10:00:00:00:c9:00:01:00"
HBA2 = "10:00:00:00:c9:00:02:00"


def test_config_rules(tmp_path: Path) -> None:
    cfg = ArrayConfig()
    cfg.add_initiator(HBA1, "host1", "127.0.0.1")
    lun = cfg.add_lun("sys", 1 << 20, tmp_path / "x")
    assert lun.id == 1 and lun.wwid == "360060e80d60095920000000000000001"
    with pytest.raises(ConflictError, match="LUN id 1 is already in use"):
        cfg.add_lun("other", 1 << 20, tmp_path / "y", lun_id=1)
    with pytest.raises(NotFoundError, match="unknown initiator WWPN"):
        cfg.zone_add("sys", HBA2)
    with pytest.raises(UsageError, match="invalid WWPN"):
        cfg.zone_add("sys", "not-a-wwpn")
    with pytest.raises(UsageError, match="multiple of 512"):
        cfg.add_lun("odd", 1000, tmp_path / "z")
    with pytest.raises(ConflictError, match="already belongs"):
        cfg.add_initiator(HBA2, "host2", "127.0.0.1")
    cfg.zone_add("sys", HBA1)
    assert [x.name for x in cfg.visible_to(HBA1)] == ["sys"]
    assert cfg.visible_to(HBA2) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sv(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "sanvisor", "--home", str(home), *args],
                          capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


class Running:
    def __init__(self, home: Path, port: int) -> None:
        self.home, self.port = home, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sanvisor", "--home", str(self.home), "array", "serve",
             "--listen", f"127.0.0.1:{self.port}"], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "the array did not start"
                time.sleep(0.05)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait()

    def uri(self, wwid: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{wwid}"


@pytest.fixture
def array() -> Iterator[Running]:
    home = Path(tempfile.mkdtemp(prefix="sva", dir="/tmp"))
    _sv(home, "array", "initiator", "add", HBA1, "--address", "127.0.0.1", "--host", "host1")
    _sv(home, "array", "initiator", "add", HBA2, "--address", "127.0.0.2", "--host", "host2")
    _sv(home, "array", "lun", "create", "sys", "--size", "64M")
    _sv(home, "array", "lun", "create", "data", "--size", "16M", "--id", "7")
    _sv(home, "array", "zone", "add", "sys", HBA1)
    arr = Running(home, _free_port())
    arr.start()
    try:
        yield arr
    finally:
        if arr.proc and arr.proc.poll() is None:
            arr.kill(signal.SIGTERM)
        subprocess.run(["rm", "-rf", str(home)], check=False)


def _wwid(arr: Running, name: str) -> str:
    import json

    luns = json.loads(_sv(arr.home, "--json", "array", "lun", "list").stdout)
    return str(next(x["wwid"] for x in luns if x["name"] == name))


def test_real_clients_see_only_zoned_luns(array: Running) -> None:
    sysw, dataw = _wwid(array, "sys"), _wwid(array, "data")
    listing = subprocess.run(["nbdinfo", "--list", f"nbd://127.0.0.1:{array.port}"],
                             capture_output=True, text=True, check=True).stdout
    assert sysw in listing and dataw not in listing
    assert "vendor=HITACHI model=DF600F" in listing
    info = subprocess.run(["qemu-img", "info", array.uri(sysw)], capture_output=True,
                          text=True, check=True).stdout
    assert "virtual size: 64 MiB" in info
    refused = subprocess.run(["qemu-img", "info", array.uri(dataw)], capture_output=True,
                             text=True)
    assert refused.returncode != 0 and "no such export" in refused.stderr
    # another initiator (another HBA address) sees nothing until zoned
    with NbdClient("127.0.0.1", array.port, source="127.0.0.2") as c:
        assert c.exports() == []
    _sv(array.home, "array", "zone", "add", "data", HBA2)
    with NbdClient("127.0.0.1", array.port, source="127.0.0.2") as c:
        assert [e.name for e in c.exports()] == [dataw]
        assert c.exports()[0].fields()["lun"] == "7"


def test_io_flush_trim_and_convert(array: Running, tmp_path: Path) -> None:
    uri = array.uri(_wwid(array, "sys"))
    out = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 2M", "-c",
                          "read -P 0x5a 1M 2M", "-c", "write -z 1M 64k", "-c",
                          "read -P 0 1M 64k", "-c", "discard 2M 64k", "-c", "flush", uri],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, out
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(4 << 20))
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri],
                   check=True)
    back = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(back)],
                   check=True)
    assert back.read_bytes()[: 4 << 20] == src.read_bytes()


def test_past_the_end_garbage_and_kill_after_flush(array: Running) -> None:
    wwid = _wwid(array, "sys")
    good = NbdClient("127.0.0.1", array.port)
    good.go(wwid)
    assert good.size == 64 << 20
    assert good.request(P.CMD_READ, (64 << 20) - 512, 1024)[0] == P.EINVAL
    assert good.request(P.CMD_WRITE, 64 << 20, 512, b"x" * 512)[0] == P.ENOSPC
    # a client that sends garbage, and one that vanishes mid-request
    with socket.create_connection(("127.0.0.1", array.port)) as bad:
        bad.recv(18)
        bad.sendall(b"\0\0\0\3" + b"garbage" * 10)
        assert bad.recv(100) == b""  # dropped
    half = NbdClient("127.0.0.1", array.port)
    half.go(wwid)
    half.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 4096) + b"y" * 10)
    half.close()
    # the good client was not disturbed; flushed writes survive a kill -9 of the array
    blocks = {i * 4096: os.urandom(4096) for i in range(64)}
    for off, data in blocks.items():
        good.pwrite(data, off)
    good.flush()
    array.kill(signal.SIGKILL)
    array.start()
    with NbdClient("127.0.0.1", array.port) as again:
        again.go(wwid)
        for off, data in blocks.items():
            assert again.pread(4096, off) == data
    with pytest.raises(NbdError):
        NbdClient("127.0.0.1", array.port, source="127.0.0.3").go(wwid)
