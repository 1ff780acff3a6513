"""The rest of xm on real QEMU guests (TCG): vcpu-list/-pin and sched-credit seen by
the host's scheduler and kept across save/restore, dmesg/log/console history,
sysrq and NMI seen by the guest's kernel, dump-core read as an ELF core, xm's
block-/network-list and list -l shapes, rename, reboot -w under a new id, top as
xentop (batch and keys on a terminal); then, on an agent of their own, managed
domains with autostart after a host "crash", and shutdown/reboot -a.

One guest (xm1) is shared by the first tests, in order.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import shutil
import signal
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanvisor.cli import sxp
from sanvisor.lab.guestshell import GuestShell
from tests.guest.conftest import write_config
from tests.guest.helpers import Sanvisor, qemu_pids, wait_until

pytestmark = pytest.mark.guest
NAME = "xm1"
CGROUP_V1 = Path("/sys/fs/cgroup/cpu")


@pytest.fixture(scope="module")
def guest(qemu_sv: Sanvisor, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[GuestShell]:
    d = tmp_path_factory.mktemp("xm")
    disk = d / "sda.img"
    disk.write_bytes(b"\0" * (4 << 20))
    cfg = write_config(d / "xm1.cfg", name=NAME, memory=128, vcpus=2, maxvcpus=2,
                       disk=[f"file:{disk},sda,w"], vif=["type=user"])
    qemu_sv.run("create", str(cfg))
    try:
        qemu_sv.wait_marker(NAME)
        yield GuestShell(qemu_sv.domain(NAME)["console_socket"])
    finally:
        qemu_sv.run("destroy", NAME, check=False)


def _vcpu_threads(pid: int) -> dict[int, int]:
    """vCPU index -> thread id of a QEMU (debug-threads=on names them 'CPU N/TCG')."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        comm = (task / "comm").read_text().strip()
        if comm.startswith("CPU ") and "/" in comm:
            out[int(comm[4:].split("/")[0])] = int(task.name)
    return out


def _allowed(pid: int, tid: int) -> str:
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    return next(ln.split()[1] for ln in status.splitlines()
                if ln.startswith("Cpus_allowed_list:"))


def test_vcpu_pin_and_credit_hold_across_save_and_restore(
        qemu_sv: Sanvisor, guest: GuestShell, tmp_path: Path) -> None:
    sv = qemu_sv
    out = sv.run("vcpu-list", NAME).stdout.splitlines()
    assert out[0].split() == ["Name", "ID", "VCPU", "CPU", "State", "Time(s)", "CPU",
                              "Affinity"]
    assert [ln.split()[2] for ln in out[1:]] == ["0", "1"]
    ncpus = os.cpu_count() or 1
    last = ncpus - 1
    sv.run("vcpu-pin", NAME, "1", str(last))
    pid = sv.domain(NAME)["pid"]
    assert _allowed(pid, _vcpu_threads(pid)[1]) == str(last)  # the host's scheduler says
    row = next(r for r in sv.json("vcpu-list", NAME) if r["vcpu"] == 1)
    assert row["affinity"] == [last] and row["affinity_text"] == str(last)
    assert "does not exist on this host" in sv.fail("vcpu-pin", NAME, "0", str(ncpus))
    assert sv.run("vcpu-pin", NAME, "0", "0-x", check=False).returncode == 2
    if not (CGROUP_V1 / "cpu.shares").exists() and not Path(
            "/sys/fs/cgroup/cgroup.controllers").exists():
        pytest.skip("no cgroup CPU controller on this machine")
    sv.run("sched-credit", "-d", NAME, "-w", "512", "-c", "50")
    table = sv.run("sched-credit").stdout.splitlines()
    assert table[0].split() == ["Name", "ID", "Weight", "Cap"]
    assert next(ln.split() for ln in table if ln.startswith(NAME))[2:] == ["512", "50"]
    uuid = sv.domain(NAME)["uuid"]
    from sanvisor.drivers.qemu import cgroup

    held = cgroup.read(uuid)
    assert held is not None and str(pid) in held["cgroup.procs"].split()
    if held["version"] == "1":
        assert (held["cpu.shares"], held["cpu.cfs_quota_us"]) == ("2048", "50000")
    else:
        assert (held["cpu.weight"], held["cpu.max"]) == ("200", "50000 100000")
    assert "cap: 999 is outside 0..200" in sv.fail("sched-credit", "-d", NAME, "-c", "999")

    save = tmp_path / "xm1.save"
    sv.run("save", NAME, str(save))
    assert cgroup.read(uuid) is None  # its QEMU gone, its group too
    sv.run("restore", str(save))
    new_pid = sv.domain(NAME)["pid"]
    assert new_pid != pid
    assert _allowed(new_pid, _vcpu_threads(new_pid)[1]) == str(last)
    assert _allowed(new_pid, _vcpu_threads(new_pid)[0]) == (f"0-{last}" if last else "0")
    held = cgroup.read(uuid)
    assert held is not None and str(new_pid) in held["cgroup.procs"].split()
    assert sv.json("list", NAME)[0]["credit"] == {"weight": 512, "cap": 50}
    guest.run("true")  # the guest answers after all that


def test_console_history_dmesg_and_log(qemu_sv: Sanvisor, guest: GuestShell) -> None:
    sv = qemu_sv
    guest.run("echo console-history-mark")
    wait_until("the mark in the console log", lambda: "console-history-mark" in sv.run(
        "console", "--history", "-n", "5", NAME).stdout, 10)
    assert len(sv.run("console", "--history", "-n", "2", NAME).stdout.splitlines()) <= 2
    text = sv.run("dmesg").stdout
    assert f"{NAME}: started (id " in text and "accelerator: " in text
    assert ", restored" in text and f"{NAME}: gone from this host" in text  # the save
    assert all(line.startswith("(20") for line in text.splitlines())
    assert "agent up" in sv.run("log", "-n", "200").stdout
    assert "does not exist" in sv.fail("console", "--history", "nosuch")


def test_sysrq_and_nmi_reach_the_guests_kernel(qemu_sv: Sanvisor, guest: GuestShell) -> None:
    sv = qemu_sv

    def console() -> str:
        return str(sv.json("console", "--history", NAME)["text"])

    sv.run("sysrq", NAME, "s")
    wait_until("the kernel's sysrq line", lambda: "sysrq: Emergency Sync" in console(), 15)
    sv.run("trigger", NAME, "nmi")
    wait_until("the kernel's NMI line", lambda: "NMI received" in console(), 15)
    assert sv.run("sysrq", NAME, "S", check=False).returncode == 2
    assert sv.run("trigger", NAME, "init", check=False).returncode == 2
    assert sv.domain(NAME)["state"] in ("running", "blocked")
    guest.run("true")


def test_dump_core_is_an_elf_core_and_the_guest_runs_on(
        qemu_sv: Sanvisor, guest: GuestShell, tmp_path: Path) -> None:
    core = tmp_path / "xm1.core"
    c1 = guest.counter()
    out = qemu_sv.run("dump-core", NAME, str(core)).stdout
    assert out.strip() == f"Dumping core of domain: {NAME} ..."
    data = core.open("rb")
    ident = data.read(64)
    assert ident[:4] == b"\x7fELF" and ident[4] == 2  # ELF64
    e_type, = struct.unpack_from("<H", ident, 16)
    e_phoff, = struct.unpack_from("<Q", ident, 32)
    e_phentsize, e_phnum = struct.unpack_from("<HH", ident, 54)
    assert e_type == 4  # ET_CORE
    data.seek(e_phoff)
    types, loaded = [], 0
    for _ in range(e_phnum):
        p_type, _flags, _off, _va, _pa, filesz, _memsz, _align = struct.unpack(
            "<IIQQQQQQ", data.read(e_phentsize)[:56])
        types.append(p_type)
        loaded += filesz if p_type == 1 else 0
    data.close()
    assert 4 in types and 1 in types  # PT_NOTE (registers), PT_LOAD (memory)
    assert loaded >= 120 << 20  # the guest's 128 MiB
    assert wait_until("the counter to move on", lambda: guest.counter() > c1)
    assert not Path(f"{core}.part").exists()


def test_block_and_network_list_in_xms_columns(qemu_sv: Sanvisor, guest: GuestShell
                                               ) -> None:
    block = qemu_sv.run("block-list", NAME).stdout.splitlines()
    assert block[0].split() == ["Vdev", "BE", "handle", "state", "evt-ch", "ring-ref",
                                "BE-path"]
    assert block[1].split() == ["2048", "0", "2048", "4", "-", "-",
                                "/machine/peripheral/dev-sda"]
    net = qemu_sv.run("network-list", NAME).stdout.splitlines()
    assert net[0].split() == ["Idx", "BE", "Mac", "Addr.", "handle", "state", "evt-ch",
                              "tx-/rx-ring-ref", "BE-path"]
    mac = qemu_sv.domain(NAME)["vifs"][0]["mac"]
    assert net[1].split()[:3] == ["0", "0", mac]
    rows = qemu_sv.json("block-list", NAME)
    assert rows[0]["target"] == "sda" and rows[0]["backend"] == "file"


def test_list_long_is_sxp_and_info_is_xms(qemu_sv: Sanvisor, guest: GuestShell) -> None:
    (node,) = sxp.parse(qemu_sv.run("list", "-l", NAME).stdout)
    d = dict(node[1])  # type: ignore[arg-type]
    info = qemu_sv.domain(NAME)
    assert node[0] == "domain" and d["name"] == NAME and d["uuid"] == info["uuid"]
    assert d["domid"] == str(info["domid"]) and d["vcpus"] == "2"
    assert d["cpus"] == [("vcpu1", str((os.cpu_count() or 1) - 1))]
    nodes = sxp.parse(qemu_sv.run("list", "-l").stdout)
    assert dict(nodes[0][1])["name"] == "Domain-0"  # type: ignore[arg-type]
    lines = qemu_sv.run("info").stdout.splitlines()
    keys = [ln.split(":", 1)[0].rstrip() for ln in lines]
    assert keys[:5] == ["host", "release", "version", "machine", "nr_cpus"]
    assert all(ln[23:25] == ": " for ln in lines)
    assert {"total_memory", "free_memory", "accelerator", "driver"} <= set(keys)


def test_rename_keeps_uuid_mac_and_id(qemu_sv: Sanvisor, guest: GuestShell) -> None:
    before = qemu_sv.domain(NAME)
    qemu_sv.run("rename", NAME, "xm1b")
    try:
        after = qemu_sv.domain("xm1b")
        assert (after["uuid"], after["domid"], after["vifs"]) == (
            before["uuid"], before["domid"], before["vifs"])
        assert NAME not in qemu_sv.names()
        assert "rename: name" in qemu_sv.fail("rename", "xm1b", "bad/name")
        guest.run("true")
    finally:
        qemu_sv.run("rename", "xm1b", NAME)


def test_reboot_wait_returns_with_a_new_id(qemu_sv: Sanvisor, guest: GuestShell) -> None:
    before = qemu_sv.domain(NAME)
    guest.run("echo gone-after-reboot > /run/mark")
    t0 = time.monotonic()
    after = qemu_sv.json("reboot", "-w", NAME)
    took = time.monotonic() - t0
    assert after["domid"] != before["domid"] and after["state"] in ("running", "blocked")
    assert after["pid"] == before["pid"]  # the same QEMU, reset (see docs/verbs.md)
    assert qemu_sv.run("domid", NAME).stdout.strip() == str(after["domid"])
    qemu_sv.wait_marker(NAME)
    wait_until("a fresh boot", lambda: "mark" not in guest.run("ls /run"))
    pid = after["pid"]
    assert _allowed(pid, _vcpu_threads(pid)[1]) == str((os.cpu_count() or 1) - 1)
    print(f"reboot -w took {took:.2f}s")


def test_top_is_xentop(qemu_sv: Sanvisor, guest: GuestShell) -> None:
    out = qemu_sv.run("top", "-b", "-i", "2", "-d", "0.5", "-x", "--networks").stdout
    frames = [f for f in out.split("\n\n") if f.strip()]
    assert len(frames) == 2
    lines = frames[1].splitlines()
    assert all(len(ln) <= 80 for ln in lines), max(lines, key=len)
    assert lines[0].split() == ["NAME", "STATE", "CPU(sec)", "CPU(%)", "MEM(k)", "MEM(%)",
                                "VCPUS", "NETTX(k)", "NETRX(k)"]
    assert lines[1].split()[0] == "Domain-0"
    row = next(ln.split() for ln in lines if ln.split()[0] == NAME)
    assert row[4] == str(128 << 10) and row[6] == "2"
    assert any(ln.strip().startswith("VBDs RD") for ln in lines)

    pid, fd = pty.fork()  # keys on a real terminal
    if pid == 0:
        argv = qemu_sv.argv("top", "-d", "0.3")
        os.execv(argv[0], argv)
    try:
        buf = b""
        deadline = time.monotonic() + 30

        def read_until(token: bytes) -> None:
            nonlocal buf
            while token not in buf:
                assert time.monotonic() < deadline, buf[-400:]
                if select.select([fd], [], [], 1)[0]:
                    buf += os.read(fd, 65536)

        read_until(b"sorted by name")
        os.write(fd, b"M")
        read_until(b"sorted by MEM(k)")
        os.write(fd, b"q")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)


# ---- an agent of their own: managed domains, autostart, every domain at once -----------
@pytest.fixture(scope="module")
def own(kit: object, netns: str | None) -> Iterator[Sanvisor]:
    home = Path(tempfile.mkdtemp(prefix="svxm", dir="/tmp"))
    s = Sanvisor(home, netns)
    try:
        s.start_agent()
        yield s
    finally:
        with contextlib.suppress(Exception):  # an agent that died: the rest still runs
            for r in s.json("list"):
                if r["domid"] != 0:
                    s.run("destroy", r["name"], check=False)
                    s.run("delete", r["name"], check=False)
        s.run("agent", "stop", check=False)
        for pid in qemu_pids(home):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)


def test_managed_domains_and_autostart_after_a_crash(own: Sanvisor, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "m1.cfg", name="m1", memory=96, vif=["type=user"],
                       on_xend_start="start")
    own.run("new", str(cfg))
    rows = own.run("list").stdout.splitlines()
    assert next(ln.split() for ln in rows if ln.startswith("m1 ")) == [
        "m1", "-", "96", "1", "------", "0.0"]
    assert own.run("domid", "m1").stdout.strip() == "-"
    assert "registered (managed)" in own.fail("create", str(cfg))
    out = own.run("start", "m1").stdout
    first = own.domain("m1")
    assert out.strip() == f"Started domain m1 (id={first['domid']})" and first["managed"]
    assert "delete needs a domain that does not run" in own.fail("delete", "m1")
    own.wait_marker("m1")
    # the host "crashes": the agent and the guest's QEMU die; the agent comes back
    own.kill_agent()
    os.kill(first["pid"], signal.SIGKILL)
    wait_until("QEMU to die", lambda: first["pid"] not in qemu_pids(own.home), 10)
    own.start_agent()
    back = own.domain("m1")
    assert back["state"] in ("running", "blocked") and back["pid"] != first["pid"]
    assert back["uuid"] == first["uuid"] and back["vifs"][0]["mac"] == first["vifs"][0]["mac"]
    own.wait_marker("m1")
    own.run("shutdown", "-w", "m1")
    assert own.json("list", "m1")[0]["state"] == "stopped"
    own.run("delete", "m1")
    assert "m1" not in {r["name"] for r in own.json("list")}


def test_start_on_another_host_moves_the_registration(own: Sanvisor, qemu_sv: Sanvisor,
                                                      tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "mv1.cfg", name="mv1", memory=96, vif=["type=user"])
    own.run("new", str(cfg))
    uuid = own.json("list", "mv1")[0]["uuid"]
    try:
        out = own.run("start", "mv1", "--host", str(qemu_sv.home)).stdout
        there = qemu_sv.domain("mv1")
        assert out.strip() == f"Started domain mv1 (id={there['domid']})"
        assert there["uuid"] == uuid and there["managed"]
        assert "mv1" not in {r["name"] for r in own.json("list")}  # registered there now
        assert "not registered" in own.fail("start", "mv1")
        assert "not registered" in own.fail("start", "mv1", "--host", str(qemu_sv.home))
        assert "no agent for host" in own.fail("start", "mv1", "--host", str(tmp_path))
    finally:
        qemu_sv.run("destroy", "mv1", check=False)
        qemu_sv.run("delete", "mv1", check=False)
        own.run("delete", "mv1", check=False)


def test_shutdown_and_reboot_every_domain(own: Sanvisor, tmp_path: Path) -> None:
    for name in ("all1", "all2"):
        own.run("create", str(write_config(tmp_path / f"{name}.cfg", name=name, memory=96,
                                           vif=["type=user"])))
    for name in ("all1", "all2"):
        own.wait_marker(name)
    ids = {n: own.domain(n)["domid"] for n in ("all1", "all2")}
    rows = json.loads(own.run("--json", "reboot", "-a", "-w").stdout)
    assert sorted(r["name"] for r in rows) == ["all1", "all2"]
    assert all(r["domid"] != ids[r["name"]] for r in rows)
    for name in ("all1", "all2"):  # a guest still booting may miss the ACPI button
        own.wait_marker(name, count=2)
    assert own.run("shutdown", "-a", "-w", "-t", "60").returncode == 0
    assert own.names() == set()
    assert own.run("shutdown", "all1", "-a", check=False).returncode == 2
