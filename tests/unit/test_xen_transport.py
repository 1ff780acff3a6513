"""How the Xen driver reaches dom0 (host.json: local xl, or a channel's socket), and
the forward of a dom0 unix socket over a transport's spawn, with real processes and
sockets (LocalDom0 stands in for the channel: the same spawn interface)."""

from __future__ import annotations

import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanvisor.drivers.xen.local import LocalDom0
from sanvisor.drivers.xen.transport import guest_kit, xen_driver
from sanvisor.errors import ConfigError
from sanvisor.xenhost.forward import UnixForward


def test_no_transport_named_means_xl_in_this_dom0() -> None:
    driver, how = xen_driver({"driver": "xen", "name": "x"})
    assert how == "in this dom0 (xl run locally)"
    assert driver.run(["echo", "local"], None) == (0, "local\n", "")


def test_a_real_xen_host_imports_nothing_of_the_lab() -> None:
    """docs/architecture.md: what only the lab has (lab/, xenhost/) is never imported
    by what a real host runs; here, the agent's Xen driver over local xl."""
    code = ("import sys, sanvisor.agent.daemon, sanvisor.cli.main\n"
            "from sanvisor.drivers.xen.transport import xen_driver, guest_kit\n"
            "xen_driver({'driver': 'xen'}); guest_kit({})\n"
            "print(' '.join(m for m in sys.modules\n"
            "               if m.startswith(('sanvisor.lab', 'sanvisor.xenhost'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.split() == []


def test_a_channel_socket_is_one_transport_among_others(tmp_path: Path) -> None:
    _, how = xen_driver({"ctl": str(tmp_path / "ctl.sock")})  # connects at first use
    assert how == f"dom0 through {tmp_path / 'ctl.sock'}"
    with pytest.raises(ConfigError, match=r"^/h/host.json: ctl: not a socket path"):
        xen_driver({"ctl": 5}, "/h/host.json")


def test_guest_kit_from_host_json() -> None:
    assert guest_kit({}) is None
    assert guest_kit({"guest_kit": {"kernel": "/k", "initrd": "/i"}}) == (Path("/k"),
                                                                          Path("/i"))
    for bad in ({"kernel": "/k"}, "/k", {"kernel": "/k", "initrd": ""}):
        with pytest.raises(ConfigError, match=r"^/h/host.json: guest_kit: want"):
            guest_kit({"guest_kit": bad}, "/h/host.json")


def _server(path: Path, reply: bytes, *, until_eof: bool) -> Iterator[list[bytes]]:
    """One-connection-at-a-time server: reads a request (to its blank line, or to
    the client's end), answers, closes; what it read is in the list yielded."""
    seen: list[bytes] = []
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
                    if not until_eof and b"\r\n\r\n" in data:
                        break
                seen.append(data)
                conn.sendall(reply + data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield seen
    finally:
        srv.shutdown(socket.SHUT_RDWR)
        srv.close()
        t.join(5)


@pytest.mark.parametrize("until_eof", [False, True], ids=["server-closes", "client-ends"])
def test_forward_carries_a_connection_both_ways(tmp_path: Path, until_eof: bool) -> None:
    remote, local = tmp_path / "remote.sock", tmp_path / "local.sock"
    server = _server(remote, b"HTTP/1.1 200 OK\r\n\r\n", until_eof=until_eof)
    seen = next(server)
    try:
        with UnixForward(LocalDom0().spawn, [sys.executable], str(remote), local) as fwd:
            assert stat.S_IMODE(local.stat().st_mode) == 0o600
            for n in range(2):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
                    c.settimeout(30)
                    c.connect(str(local))
                    body = b"x" * 100_000 * n if until_eof else b""  # more than a chunk
                    request = f"GET /{n} HTTP/1.1\r\n\r\n".encode() + body
                    c.sendall(request)
                    if until_eof:
                        c.shutdown(socket.SHUT_WR)
                    got = b""
                    while chunk := c.recv(65536):
                        got += chunk
                assert seen[n] == request  # all of it reached the server
                assert got == b"HTTP/1.1 200 OK\r\n\r\n" + request  # and came back
            assert fwd.connections == 2
        assert not local.exists()
    finally:
        next(server, None)


def test_the_agent_bundle_carries_what_the_agent_needs_and_no_more() -> None:
    """What xenhost/agentbundle.py sends to a nested dom0 (the Xen test runs it there)."""
    from sanvisor.xenhost import agentbundle

    files = agentbundle.files()
    dests = set(files.values())
    lib = f"opt/sanvisor/lib/python{sys.version_info.major}.{sys.version_info.minor}"
    for needed in ("os.py", "asyncio/__init__.py", "site-packages/sanvisor/__init__.py",
                   "site-packages/sanvisor/drivers/xen/local.py",
                   "site-packages/uvicorn/__init__.py", "site-packages/fastapi/__init__.py"):
        assert f"{lib}/{needed}" in dests, needed
    assert agentbundle.ENGINE[1:] in dests  # the data path: no agent starts without it
    assert not [d for d in dests if f"{lib}/test/" in d or "/tkinter/" in d]
    assert not [d for d in dests if "/site-packages/pytest/" in d]  # not imported
    libs = {Path(d).name for d in dests if d.startswith("opt/sanvisor/libs/")}
    assert "libssl.so.3" in libs and not {"libc.so.6", "libm.so.6"} & libs
    assert all(src.is_file() for src in files)
    argv = agentbundle.python_argv("-m", "sanvisor")
    assert argv[:5] == ["env", "-u", "PYTHONPATH", "-u", "PYTHONDONTWRITEBYTECODE"]
    assert "PYTHONHOME=/opt/sanvisor" in argv and argv[-2:] == ["-m", "sanvisor"]
