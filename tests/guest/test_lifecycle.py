"""The xm verbs on one real guest, shared by the tests of this module in order, run
against both hypervisors: QEMU (TCG) and a real Xen 4.17 nested under QEMU (the
``xen`` runs use the lab's ``xen1`` host and are skipped, with the reason, where
it cannot boot).

QEMU guest: guest-kit kernel, 128 MiB (maxmem 384), 1 vCPU (maxvcpus 2), a disk on
sda and a NIC on a bridge inside the test's network namespace. Xen guest: the
seed's V-G config, paths substituted with dom0's (the guest kit in /srv/domu,
a dom0 file as its disk) and sized like the QEMU one.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sanvisor.lab.guestshell import GuestShell
from tests.guest.conftest import ROOT, write_config
from tests.guest.helpers import Sanvisor, qemu_pids, wait_until

pytestmark = pytest.mark.guest
NAME = "lc1"
GUEST_IP = "10.213.9.2"
PEER_IP = "10.213.9.1"
SEED = Path(__file__).parent.parent / "unit" / "data" / "seed-vg.cfg"
DOMU = "/srv/domu"  # the guest kit inside a nested Xen's dom0


@dataclass
class Hv:
    kind: str  # "qemu" or "xen"
    sv: Sanvisor

    def only(self, kind: str, why: str) -> None:
        if self.kind != kind:
            pytest.skip(f"{kind} only: {why}")


@pytest.fixture(scope="module",
                params=["qemu", pytest.param("xen", marks=pytest.mark.xen)])
def hv(request: pytest.FixtureRequest) -> Hv:
    if request.param == "qemu":
        return Hv("qemu", request.getfixturevalue("qemu_sv"))
    lab: Path = request.getfixturevalue("xen_lab")
    return Hv("xen", Sanvisor(lab / "xen1", None))


@pytest.fixture(scope="module")
def sv(hv: Hv) -> Sanvisor:
    return hv.sv


def _xen_config(d: Path) -> Path:
    text = SEED.read_text()
    text = text.replace("/boot/vmlinuz-2.6.18-6-xen-686", f"{DOMU}/vmlinux")
    text = text.replace("/boot/initrd.img-2.6.18-6-xen-686", f"{DOMU}/initrd.cpio")
    text = text.replace("/dev/vgvirtualdebian/lvsysteme", f"{DOMU}/initrd.cpio")
    text = text.replace("bridge=xenbr0", f"bridge=xenbr0, ip={GUEST_IP}/24")
    cfg = d / "virtualdebian.cfg"
    cfg.write_text(text)
    return cfg


@pytest.fixture(scope="module")
def guest(hv: Hv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GuestShell]:
    sv = hv.sv
    d = tmp_path_factory.mktemp("lc")
    if hv.kind == "xen":
        sv.run("create", str(_xen_config(d)), f"name={NAME}", "memory=128", "maxmem=384",
               "vcpus=1", "maxvcpus=2")
    else:
        disk = d / "sda.img"
        disk.write_bytes(b"SANVISOR-DISK-A" + b"\0" * (8 << 20))
        cfg = write_config(d / "lc1.cfg", name=NAME, memory=128, maxmem=384, vcpus=1,
                           maxvcpus=2, disk=[f"file:{disk},sda,w"],
                           vif=[f"bridge=svbr0, ip={GUEST_IP}/24"])
        sv.run("create", str(cfg))
    try:
        sv.wait_marker(NAME)
        yield GuestShell(sv.domain(NAME)["console_socket"])
    finally:
        sv.run("destroy", NAME, check=False)


def test_list_shows_the_guest_like_xm(hv: Hv, sv: Sanvisor, guest: GuestShell) -> None:
    out = sv.run("list").stdout.splitlines()
    assert out[0].split() == ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)"]
    assert out[1].split()[:2] == ["Domain-0", "0"]
    row = next(ln.split() for ln in out if ln.startswith(NAME + " "))
    assert row[2:4] == ["128", "1"]
    assert row[4] in ("r-----", "-b----")
    info = sv.domain(NAME)
    assert sv.run("domid", NAME).stdout.strip() == str(info["domid"])
    assert sv.run("domname", str(info["domid"])).stdout.strip() == NAME
    assert NAME in sv.run("uptime").stdout
    if hv.kind == "qemu":
        assert guest.run("cat /sys/block/sda/device/model; dd if=/dev/sda bs=15 count=1 "
                         "2>/dev/null").endswith("SANVISOR-DISK-A")
    else:  # the seed's phy: disk on sda, a dom0 file (the guest kit's cpio) behind it
        assert guest.run("dd if=/dev/xvda bs=6 count=1 2>/dev/null") == "070701"
        assert guest.run("cat /sys/class/net/eth0/address") == "00:16:3e:00:00:01"


def _read_until(fd: int, token: bytes, buf: bytes, deadline: float) -> bytes:
    while token not in buf:
        assert time.monotonic() < deadline, f"no {token!r} from the console: {buf!r}"
        if select.select([fd], [], [], 1)[0]:
            buf += os.read(fd, 4096)
    return buf


def test_console_attach_detach_many_times(sv: Sanvisor, guest: GuestShell) -> None:
    for i in range(3):
        pid, fd = pty.fork()
        if pid == 0:  # child: the real CLI on a real terminal
            os.execv(sv.argv("console", NAME)[0], sv.argv("console", NAME))
        try:
            deadline = time.monotonic() + 30
            buf = _read_until(fd, b"Ctrl-] to detach", b"", deadline)  # raw from here on
            os.write(fd, f"echo hello-$(({i}+40))\r".encode())
            _read_until(fd, f"hello-{i + 40}".encode(), buf, deadline)
            os.write(fd, b"\x1d")  # Ctrl-]
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            os.close(fd)
    assert sv.domain(NAME)["state"] in ("running", "blocked")


def test_pause_stops_the_guest_and_unpause_resumes_it(sv: Sanvisor, guest: GuestShell) -> None:
    c1 = guest.counter()
    sv.run("pause", NAME)
    assert sv.domain(NAME)["letters"] == "--p---"
    t0 = time.monotonic()
    time.sleep(1.5)  # wall-clock time passing while paused is what is tested
    sv.run("unpause", NAME)
    paused_for = time.monotonic() - t0
    c2 = guest.counter()
    # the counter ticks 10/s of guest time; had the guest run, it would have gained ~15
    assert 0 <= c2 - c1 < 10 * (paused_for - 1.5) + 8, (c1, c2, paused_for)
    c3 = wait_until("the counter to move on", lambda: (v := guest.counter()) > c2 + 5 and v)
    assert c3 > c2
    assert sv.fail("unpause", NAME).endswith("unpause needs a paused domain")


@pytest.mark.skipif(not ROOT, reason="bridges and namespaces need root")
def test_guest_answers_on_its_ip_through_the_bridge(hv: Hv, sv: Sanvisor,
                                                    guest: GuestShell) -> None:
    hv.only("qemu", "the peer is a namespace on the agent's host (Xen: the next test)")
    assert sv.netns
    peer = f"svpeer{os.getpid()}"
    veth = f"svv{os.getpid() % 100000}"
    run = subprocess.run
    run(["ip", "netns", "add", peer], check=True)
    try:
        run(["ip", "link", "add", veth, "netns", sv.netns, "type", "veth", "peer", "name",
             "eth0", "netns", peer], check=True)
        run(["ip", "-n", sv.netns, "link", "set", veth, "master", "svbr0", "up"], check=True)
        run(["ip", "-n", peer, "addr", "add", f"{PEER_IP}/24", "dev", "eth0"], check=True)
        run(["ip", "-n", peer, "link", "set", "eth0", "up"], check=True)
        run(["ip", "-n", peer, "link", "set", "lo", "up"], check=True)
        mac = sv.domain(NAME)["vifs"][0]["mac"]
        assert guest.run("cat /sys/class/net/eth0/address") == mac
        probe = ("import socket,sys\n"
                 f"s=socket.create_connection(('{GUEST_IP}',7),timeout=5)\n"
                 "s.sendall(b'ping-through-the-bridge\\n')\n"
                 "print(s.recv(100).decode().strip())\n")
        out = wait_until("the guest's echo service", lambda: run(
            ["ip", "netns", "exec", peer, "python3", "-c", probe],
            capture_output=True, text=True).stdout.strip(), timeout=30, interval=0.5)
        assert out == "ping-through-the-bridge"
        ping = run(["ip", "netns", "exec", peer, "ping", "-c", "2", "-W", "5", GUEST_IP],
                   capture_output=True, text=True)
        assert ping.returncode == 0, ping.stdout
    finally:
        run(["ip", "netns", "del", peer], check=False)
        run(["ip", "-n", sv.netns, "link", "del", veth], check=False)


def test_xen_guests_talk_through_dom0s_bridge(hv: Hv, sv: Sanvisor, guest: GuestShell,
                                             tmp_path: Path) -> None:
    """A second domU on dom0's xenbr0: netfront -> netback -> dom0 bridge and back."""
    hv.only("xen", "Xen's vif hotplug in dom0 (QEMU: the test above)")
    cfg = write_config(tmp_path / "peer.cfg", name="lc1peer", memory=96,
                       vif=[f"bridge=xenbr0, ip={PEER_IP}/24"])
    sv.run("create", str(cfg))
    try:
        sv.wait_marker("lc1peer")
        peer = GuestShell(sv.domain("lc1peer")["console_socket"])
        assert peer.run(f"ping -c 2 -W 5 {GUEST_IP} >/dev/null && echo ok") == "ok"
        assert guest.run(f"ping -c 1 -W 5 {PEER_IP} >/dev/null && echo ok") == "ok"
        added = sv.json("network-attach", "lc1peer", "bridge=xenbr0")
        wait_until("eth1 in the guest", lambda: "eth1" in peer.run("ls /sys/class/net"))
        assert peer.run("cat /sys/class/net/eth1/address") == added["mac"]
        sv.run("network-detach", "lc1peer", added["mac"])
        wait_until("eth1 to go", lambda: "eth1" not in peer.run("ls /sys/class/net"))
    finally:
        sv.run("destroy", "lc1peer", check=False)


def test_xen_block_attach_and_detach(hv: Hv, sv: Sanvisor, guest: GuestShell) -> None:
    """block-attach of a dom0 device path (here a dom0 file, through a loop device)."""
    hv.only("xen", "a dom0 path through blkback (QEMU: the next test)")
    before = set(guest.run("ls /sys/block").split())
    sv.run("block-attach", NAME, f"file:{DOMU}/vmlinux", "xvdc", "r")
    wait_until("the disk in the guest", lambda: "xvdc" in guest.run("ls /sys/block"))
    assert guest.run("dd if=/dev/xvdc bs=4 count=1 2>/dev/null | od -An -c | tr -d ' '"
                     ) == "177ELF"
    assert "51744" in sv.run("block-list", NAME).stdout  # xvdc, as xl numbers it
    assert "xvdc" in [d["target"] for d in sv.json("block-list", NAME)]
    sv.run("block-detach", NAME, "xvdc")
    wait_until("the disk to leave the guest",
               lambda: set(guest.run("ls /sys/block").split()) == before)


def test_block_attach_and_detach(hv: Hv, sv: Sanvisor, guest: GuestShell,
                                 tmp_path: Path) -> None:
    hv.only("qemu", "a file on the agent's host (Xen: the test above)")
    img = tmp_path / "extra.img"
    img.write_bytes(b"\0" * (16 << 20))
    before = set(guest.run("ls /sys/block").split())
    sv.run("block-attach", NAME, f"file:{img}", "sdc", "w")
    new = wait_until("the disk in the guest",
                     lambda: set(guest.run("ls /sys/block").split()) - before)
    dev = new.pop()
    assert guest.run(f"cat /sys/block/{dev}/size") == str((16 << 20) // 512)
    guest.run(f"echo block-attach-works > /tmp/m; dd if=/tmp/m of=/dev/{dev} bs=512 "
              f"conv=sync,fsync 2>/dev/null")
    assert guest.run(f"dd if=/dev/{dev} bs=18 count=1 2>/dev/null") == "block-attach-works"
    assert img.read_bytes().startswith(b"block-attach-works")
    assert "/machine/peripheral/dev-sdc" in sv.run("block-list", NAME).stdout
    assert "already has a disk sdc" in sv.fail("block-attach", NAME, f"file:{img}", "sdc", "w")
    sv.run("block-detach", NAME, "sdc")
    wait_until("the disk to leave the guest",
               lambda: set(guest.run("ls /sys/block").split()) == before)
    assert "has no disk sdc" in sv.fail("block-detach", NAME, "sdc")


def _memtotal_mib(guest: GuestShell) -> int:
    return int(guest.run("grep MemTotal /proc/meminfo").split()[1]) // 1024


def test_mem_set_balloons_and_hotplugs(sv: Sanvisor, guest: GuestShell) -> None:
    start = _memtotal_mib(guest)
    sv.run("mem-set", NAME, "96")
    wait_until("the balloon to inflate", lambda: _memtotal_mib(guest) <= start - 24)
    assert sv.domain(NAME)["mem_mib"] == 96
    sv.run("mem-set", NAME, "256m")  # above the boot size: hot-plugged DIMM, up to maxmem
    wait_until("memory to grow", lambda: _memtotal_mib(guest) >= start + 100)
    assert "above the domain's maximum" in sv.fail("mem-set", NAME, "1g")
    assert "without a restart" in sv.fail("mem-max", NAME, "2048")
    sv.run("mem-max", NAME, "200")
    assert sv.domain(NAME)["mem_mib"] == 200


def test_vcpu_set_hotplugs_and_unplugs(sv: Sanvisor, guest: GuestShell) -> None:
    def online() -> str:
        return guest.run("cat /sys/devices/system/cpu/online")

    sv.run("vcpu-set", NAME, "2")
    wait_until("cpu1 online", lambda: online() == "0-1")
    assert sv.domain(NAME)["vcpus"] == 2
    assert "outside 1..2" in sv.fail("vcpu-set", NAME, "3")
    sv.run("vcpu-set", NAME, "1")
    wait_until("cpu1 offline", lambda: online() == "0")
    assert sv.domain(NAME)["vcpus"] == 1
    sv.run("vcpu-set", NAME, "2")
    wait_until("cpu1 back", lambda: online() == "0-1")


def test_top_batch_mode(sv: Sanvisor, guest: GuestShell) -> None:
    out = sv.run("top", "-b", "-n", "2", "-d", "0.5").stdout
    frames = [f for f in out.split("\n\n") if f.strip()]
    assert len(frames) == 2
    header, *rows = frames[1].splitlines()
    assert header.split() == ["NAME", "STATE", "CPU(sec)", "CPU(%)", "MEM(k)", "MEM(%)",
                              "VCPUS", "NETTX(k)", "NETRX(k)"]  # xentop's, in 80 columns
    assert rows[0].split()[0] == "Domain-0"
    row = dict(zip(header.split(), next(r for r in rows if r.split()[0] == NAME).split(),
                   strict=True))
    info = sv.domain(NAME)
    assert row["STATE"] == info["letters"] or row["STATE"] in ("r-----", "-b----")
    assert float(row["CPU(sec)"]) > 0 and float(row["CPU(%)"]) >= 0
    assert int(row["MEM(k)"]) == info["mem_mib"] * 1024  # the balloon's size now
    assert int(row["VCPUS"]) == info["vcpus"]  # online now, not plugged
    assert 0 < float(row["MEM(%)"]) < 100
    for total in ("NETTX(k)", "NETRX(k)"):
        assert int(row[total]) >= 0


def test_agent_restart_keeps_the_guest(hv: Hv, sv: Sanvisor, guest: GuestShell) -> None:
    before = sv.domain(NAME)
    c1 = guest.counter()
    old_agent = sv.agent_pid()
    sv.kill_agent()  # SIGKILL: no goodbye
    assert sv.agent_pid() is None
    if hv.kind == "qemu":
        assert before["pid"] in qemu_pids(sv.home)
    sv.start_agent()
    new_agent = sv.agent_pid()
    assert new_agent is not None and new_agent != old_agent  # not the old agent answering
    after = sv.domain(NAME)
    assert (after["domid"], after["pid"], after["uuid"]) == \
        (before["domid"], before["pid"], before["uuid"])
    assert after["state"] in ("running", "blocked")
    assert guest.counter() > c1
    sv.run("pause", NAME)  # the new agent drives it
    sv.run("unpause", NAME)


def test_save_and_restore_continue_the_guest(hv: Hv, sv: Sanvisor, guest: GuestShell,
                                             tmp_path: Path) -> None:
    guest.run("echo still-here > /run/mark")
    before = sv.domain(NAME)
    c1 = guest.counter()
    save = tmp_path / "lc1.save"
    sv.run("save", NAME, str(save))
    assert NAME not in sv.names()
    assert save.stat().st_size > 1 << 20  # the guest's memory is in the file
    if hv.kind == "qemu":
        assert before["pid"] not in qemu_pids(sv.home)
    sv.run("restore", str(save))
    after = sv.domain(NAME)
    assert after["domid"] != before["domid"]
    assert after["vifs"][0]["mac"] == before["vifs"][0]["mac"]
    assert guest.run("cat /run/mark") == "still-here"  # not rebooted: tmpfs kept
    assert guest.counter() >= c1
    assert guest.run("cat /sys/devices/system/cpu/online") == "0-1"
    log = Path(after["console_log"]).read_bytes()
    assert log.count(b"SANVISOR-READY") == 0  # a new log, and no boot in it


def test_reboot_is_clean_and_keeps_the_mac(hv: Hv, sv: Sanvisor, guest: GuestShell) -> None:
    before = sv.domain(NAME)
    guest.run("echo gone-after-reboot > /run/mark2")
    sv.run("reboot", NAME)
    sv.wait_marker(NAME, count=1)
    wait_until("a fresh boot", lambda: "mark2" not in guest.run("ls /run"))
    after = sv.domain(NAME)
    assert after["vifs"][0]["mac"] == before["vifs"][0]["mac"]
    assert after["domid"] != before["domid"]  # a new domain id, as in xm
    if hv.kind == "qemu":
        assert after["pid"] == before["pid"]  # the same QEMU, reset
    else:
        assert after["pid"] != before["pid"]  # xl restarted it: a new domid


def test_shutdown_is_clean(hv: Hv, sv: Sanvisor, guest: GuestShell) -> None:
    pid = sv.domain(NAME)["pid"]
    sv.run("pause", NAME)  # a paused guest cannot see the power button: a clear timeout
    assert "did not shut down" in sv.fail("shutdown", "-w", "-t", "1", NAME)
    sv.run("unpause", NAME)  # ...and then it does see it
    wait_until("the guest to go", lambda: NAME not in sv.names(), 60)
    assert "does not exist" in sv.fail("shutdown", NAME)
    if hv.kind == "qemu":
        wait_until("QEMU to exit", lambda: pid not in qemu_pids(sv.home), 10)

