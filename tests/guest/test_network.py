"""Networking on real guests: NAT (nftables masquerade) and NIC hot-plug."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanvisor.lab.guestshell import GuestShell
from tests.guest.conftest import ROOT, write_config
from tests.guest.helpers import Sanvisor, wait_until

pytestmark = [pytest.mark.guest,
              pytest.mark.skipif(not ROOT, reason="taps, bridges and nftables need root")]

SERVER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.214.0.2", 9000)); s.listen(1); s.settimeout(60)
c, addr = s.accept(); data = c.recv(100)
print(addr[0], data.decode().strip(), flush=True)
"""


@pytest.fixture(scope="module")
def natguest(sv: Sanvisor, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestShell]:
    d = tmp_path_factory.mktemp("nat")
    cfg = write_config(d / "nat1.cfg", name="nat1", memory=128, vif=["script=vif-nat"])
    sv.run("create", str(cfg))
    try:
        sv.wait_marker("nat1")
        yield GuestShell(sv.domain("nat1")["console_socket"])
    finally:
        sv.run("destroy", "nat1", check=False)


def test_nat_guest_reaches_outside_masqueraded(sv: Sanvisor, natguest: GuestShell) -> None:
    assert sv.netns
    vif = sv.domain("nat1")["vifs"][0]
    assert vif["type"] == "nat" and vif["ip"].startswith("10.213.0.")
    out_ns = f"svout{os.getpid()}"
    run = subprocess.run
    run(["ip", "netns", "add", out_ns], check=True)
    server = None
    try:
        run(["ip", "link", "add", "svup0", "netns", sv.netns, "type", "veth", "peer", "name",
             "eth0", "netns", out_ns], check=True)
        run(["ip", "-n", sv.netns, "addr", "add", "10.214.0.1/24", "dev", "svup0"], check=True)
        run(["ip", "-n", sv.netns, "link", "set", "svup0", "up"], check=True)
        run(["ip", "-n", out_ns, "addr", "add", "10.214.0.2/24", "dev", "eth0"], check=True)
        run(["ip", "-n", out_ns, "link", "set", "eth0", "up"], check=True)
        server = subprocess.Popen(["ip", "netns", "exec", out_ns, "python3", "-c", SERVER],
                                  stdout=subprocess.PIPE, text=True)
        wait_until("the outside server", lambda: "10.214.0.2:9000" in " ".join(
            run(["ip", "netns", "exec", out_ns, "ss", "-ltnH"], capture_output=True,
                text=True).stdout.split()), 10)
        assert natguest.run("ip route | grep default") .startswith("default via 10.213.0.1")
        natguest.run("echo from-the-guest | nc -w 5 10.214.0.2 9000")
        got, _ = server.communicate(timeout=30)
        # the outside saw the host's address, not the guest's private one
        assert got.split() == ["10.214.0.1", "from-the-guest"]
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()
        run(["ip", "netns", "del", out_ns], check=False)
        run(["ip", "-n", sv.netns, "link", "del", "svup0"], check=False)


def test_network_attach_and_detach(sv: Sanvisor, natguest: GuestShell, tmp_path: Path) -> None:
    before = set(natguest.run("ls /sys/class/net").split())
    added = sv.json("network-attach", "nat1", "bridge=svbr2", "mac=00:16:3e:12:34:56")
    assert added["mac"] == "00:16:3e:12:34:56"
    new = wait_until("a new NIC in the guest",
                     lambda: set(natguest.run("ls /sys/class/net").split()) - before)
    nic = new.pop()
    assert natguest.run(f"cat /sys/class/net/{nic}/address") == "00:16:3e:12:34:56"
    rows = [ln.split() for ln in sv.run("network-list", "nat1").stdout.splitlines()[1:]]
    assert "00:16:3e:12:34:56" in [r[2] for r in rows]  # xm's columns: Idx BE MAC...
    by_mac = {r["mac"]: r for r in sv.json("network-list", "nat1")}
    assert by_mac["00:16:3e:12:34:56"]["bridge"] == "svbr2"  # the bridge it is on
    assert by_mac[next(m for m in by_mac if m != "00:16:3e:12:34:56")]["bridge"] == "svnat0"
    assert added["bridge"] == "svbr2"
    sv.run("network-detach", "nat1", "00:16:3e:12:34:56")
    wait_until("the NIC to go", lambda: set(natguest.run("ls /sys/class/net").split()) == before)
    assert "has no network device" in sv.fail("network-detach", "nat1", "7")
    taps = subprocess.run(["ip", "-n", str(sv.netns), "-o", "link"], capture_output=True,
                          text=True).stdout
    assert f"vif{sv.domain('nat1')['domid']}.1" not in taps
