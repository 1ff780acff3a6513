"""dom0's end of a migration stream over the LAN (xenhost/mignet.py), run here for real
on 127.0.0.1: the one-shot listener takes only a connection with the token, then
runs its command on it (on the socket itself, or fed through a pipe), and the
connector relays both ways with each end's EOF passed on. The Xen migration tests
(tests/xen) run the same module in the nested dom0s."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sanvisor.drivers.xen.migrate import STARTED, SUSPENDED, XlLog

TOKEN = "ab" * 32
RUN = ("import sys, sanvisor.xenhost.mignet as m; m.LAN_FILE = sys.argv[1]; "
       "sys.exit(m.main(sys.argv[2:]))")


def _mignet(lan: Path, *args: str, **kw: object) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    return subprocess.Popen([sys.executable, "-c", RUN, str(lan), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]


@pytest.fixture
def lan(tmp_path: Path) -> Path:
    path = tmp_path / "sv-lan"
    path.write_text("127.0.0.1/8\n")
    return path


def _listen(lan: Path, mode: str, *argv: str) -> tuple[subprocess.Popen[bytes], str, int]:
    proc = _mignet(lan, "listen", TOKEN, mode, *argv)
    assert proc.stdout is not None
    ip, port = proc.stdout.readline().split()
    return proc, ip.decode(), int(port)


def test_pipe_mode_takes_only_the_token_and_feeds_the_file(lan: Path,
                                                           tmp_path: Path) -> None:
    out, src = tmp_path / "out", tmp_path / "image"
    src.write_bytes(os.urandom(3 << 20))
    proc, ip, port = _listen(lan, "pipe", "sh", "-c", f"cat > {out}")
    try:
        with socket.create_connection((ip, port)) as intruder:  # a wrong token: dropped
            intruder.sendall(b"x" * 64)
            assert intruder.recv(10) == b""
        sender = _mignet(lan, "connect", ip, str(port), TOKEN, str(src))
        assert sender.wait(30) == 0
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    assert out.read_bytes() == src.read_bytes()
    assert proc.stderr is not None and b"dropped a connection" in proc.stderr.read()


def test_exec_mode_runs_the_command_on_the_socket_both_ways(lan: Path) -> None:
    # cat on the socket echoes: what the connector sends comes back to its stdout,
    # and its stdin's EOF reaches cat (which then exits, closing the stream)
    proc, ip, port = _listen(lan, "exec", "cat")
    try:
        sender = _mignet(lan, "connect", ip, str(port), TOKEN, "peer", "xl",
                         "migrate-receive", stdin=subprocess.PIPE)
        data = os.urandom(1 << 20)
        got, _ = sender.communicate(data, timeout=30)
        assert got == data and sender.returncode == 0
        assert proc.wait(30) == 0
    finally:
        proc.kill()


def test_no_lan_address_and_no_listener(tmp_path: Path) -> None:
    proc = _mignet(tmp_path / "missing", "listen", TOKEN, "exec", "true")
    assert proc.wait(30) == 3
    assert proc.stderr is not None and b"no LAN address" in proc.stderr.read()


def test_a_target_that_does_not_answer_fails_the_sender(lan: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        sender = _mignet(lan, "connect", "127.0.0.1", str(port), TOKEN)
        assert sender.wait(30) == 1
    assert sender.stderr is not None and b"cannot reach" in sender.stderr.read()


def test_xl_log_times_the_guest_stop_from_xl_lines() -> None:
    log = XlLog()
    log(b"xc: info: Saving domain 1\nlibxl: debug: x: Domain 1:guest has sus")
    log(b"pended.\n")
    log(b"migration sender: Target reports successful startup.\n")
    assert [ln for _, ln in log.lines][1].endswith("guest has suspended.")
    down = log.between(SUSPENDED, STARTED)
    assert down is not None and down >= 0
    assert log.between("never said", "Target reports") is None
