"""Config files on real guests (the seed's V-G file, MAC persistence), and bad input:
every refusal is one line, a non-zero exit, and leaves nothing behind."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanvisor.lab.guestshell import GuestCommandError, GuestShell
from tests.guest.conftest import ROOT, write_config
from tests.guest.helpers import Sanvisor, qemu_pids, wait_until

pytestmark = pytest.mark.guest
SEED = Path(__file__).parent.parent / "unit" / "data" / "seed-vg.cfg"


def _links(sv: Sanvisor) -> set[str]:
    """The network interfaces where the agent makes its taps (its namespace as root)."""
    if sv.netns is None:
        return set(os.listdir("/sys/class/net"))
    out = subprocess.run(["ip", "-n", sv.netns, "-o", "link", "show"], capture_output=True,
                         text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _snapshot(sv: Sanvisor) -> tuple[set[str], list[int], set[str], set[str]]:
    return (sv.names(), sorted(qemu_pids(sv.home)), set(os.listdir(sv.home / "dom")),
            _links(sv))


@pytest.fixture(scope="module")
def seed_guest(sv: Sanvisor, kit: object, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[dict[str, object]]:
    """The seed's V-G config as is, only its paths substituted."""
    d = tmp_path_factory.mktemp("seed")
    disk = d / "lvsysteme.img"
    disk.write_bytes(b"\0" * (4 << 20))
    text = SEED.read_text()
    text = text.replace("/boot/vmlinuz-2.6.18-6-xen-686", str(kit.kernel))  # type: ignore[attr-defined]
    text = text.replace("/boot/initrd.img-2.6.18-6-xen-686", str(kit.initrd))  # type: ignore[attr-defined]
    text = text.replace("/dev/vgvirtualdebian/lvsysteme", str(disk))
    cfg = d / "virtualdebian.cfg"
    cfg.write_text(text)
    sv.run("create", str(cfg))
    try:
        sv.wait_marker("virtualdebian")
        yield sv.domain("virtualdebian")
    finally:
        sv.run("destroy", "virtualdebian", check=False)


def test_the_seed_config_runs(sv: Sanvisor, seed_guest: dict[str, object]) -> None:
    row = next(ln.split() for ln in sv.run("list").stdout.splitlines()
               if ln.startswith("virtualdebian "))
    assert row[2:4] == ["2048", "2"]  # memory = 2048, vcpus = 2, as in the seed
    assert seed_guest["vifs"][0]["mac"] == "00:16:3e:00:00:01"  # type: ignore[index]
    shell = GuestShell(str(seed_guest["console_socket"]))
    assert shell.run("cat /sys/class/net/eth0/address") == "00:16:3e:00:00:01"
    assert shell.run("cat /sys/devices/system/cpu/online") == "0-1"
    assert "root=/dev/mapper/VolGroup00-lvroot ro" in shell.run("cat /proc/cmdline")


def test_refusals_leave_nothing_behind(sv: Sanvisor, seed_guest: dict[str, object],
                                      workdir: Path, kit: object) -> None:
    good = dict(name="bad1", memory=128)
    cases: list[tuple[list[str], str]] = []

    def cfg(fname: str, **keys: object) -> str:
        return str(write_config(workdir / fname, **keys))

    broken = workdir / "broken.cfg"
    broken.write_text('name = "x"\nmemory = 128\nvif = [ "mac=00:16:3e:00:00:09"\n')
    cases.append((["create", str(broken)], r"broken\.cfg:3: list is not closed"))
    pyexec = workdir / "exec.cfg"
    pyexec.write_text("name = 'x'\nmemory = __import__('os').system('true')\n")
    cases.append((["create", str(pyexec)], r"exec\.cfg:2: "))
    cases.append((["create", str(workdir / "nope.cfg")], r"nope\.cfg: no such file"))
    cases.append((["create", cfg("k.cfg", **good, kernel="/nonexistent/vmlinuz")],
                  r"kernel: /nonexistent/vmlinuz: no such file"))
    cases.append((["create", cfg("d.cfg", **good, disk=["phy:/dev/nonexistent-lun,sda,w"])],
                  r"disk sda: /dev/nonexistent-lun: no such file"))
    cases.append((["create", cfg("dup.cfg", name="virtualdebian", memory=128)],
                  r"domain virtualdebian already exists"))
    cases.append((["create", cfg("mem.cfg", name="huge", memory=64 * 1024 * 1024)],
                  r"not enough memory: 67108864 MiB asked"))
    cases.append((["create", cfg("mm.cfg", **good, maxmem=64)],
                  r"mm\.cfg:3: maxmem: 64 MiB is less than memory"))
    cases.append((["create", cfg("vc.cfg", **good, vcpus=4, maxvcpus=2)],
                  r"vc\.cfg:\d: .*4 is more than maxvcpus"))
    cases.append((["create", cfg("mac.cfg", **good, vif=["mac=00:16:3e:00:00:01"])],
                  r"MAC 00:16:3e:00:00:01 is already used by domain virtualdebian"))
    cases.append((["create", cfg("ov.cfg", **good), "memory=lots"],
                  r"command line:1: memory: expected an integer"))
    notakernel, ramdisk = workdir / "notakernel", workdir / "ramdisk"
    notakernel.write_bytes(b"\0" * 4096)  # QEMU refuses it after the tap is made
    ramdisk.write_bytes(b"\0" * 512)
    cases.append((["create", cfg("nk.cfg", **good, kernel=str(notakernel),
                                 ramdisk=str(ramdisk), vif=["bridge=xenbr0"])],
                  r"QEMU could not start bad1: .*kernel too old"))
    cases.append((["create", cfg("lo.cfg", **good, vif=["bridge=xenbr0, vifname=lo"])],
                  r"an interface named lo exists"))  # vifname=lo once deleted lo
    cases.append((["pause", "no-such-domain"], r"domain 'no-such-domain' does not exist"))
    cases.append((["block-detach", "virtualdebian", "sdq"], r"virtualdebian has no disk sdq"))
    cases.append((["mem-set", "virtualdebian", "lots"], r"invalid memory amount"))
    garbage = workdir / "garbage.save"
    garbage.write_bytes(b"\x7fELF" + os.urandom(4096))
    cases.append((["restore", str(garbage)], r"not a sanvisor save file"))
    cases.append((["restore", str(workdir / "missing.save")], r"cannot open"))
    before = _snapshot(sv)
    assert "lo" in before[3] and (not ROOT or sv.netns is not None)
    for args, pattern in cases:
        line = sv.fail(*args)
        assert re.search(pattern, line), (args, line)
        assert _snapshot(sv) == before, f"{args} left something behind"


def test_a_damaged_save_file_is_refused(sv: Sanvisor, seed_guest: dict[str, object],
                                        workdir: Path) -> None:
    """Save the seed guest, damage copies of the file, restore the good one."""
    save = workdir / "vd.save"
    sv.run("save", "virtualdebian", str(save))
    data = save.read_bytes()
    truncated = workdir / "truncated.save"
    truncated.write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) - 100] ^= 0xFF
    corrupt = workdir / "corrupt.save"
    corrupt.write_bytes(bytes(flipped))
    before = _snapshot(sv)
    assert "truncated save file" in sv.fail("restore", str(truncated))
    assert "checksum mismatch" in sv.fail("restore", str(corrupt))
    assert _snapshot(sv) == before
    sv.run("restore", str(save))
    assert "already exists" in sv.fail("restore", str(save))
    assert sv.domain("virtualdebian")["state"] in ("running", "blocked")


def test_mac_is_assigned_once_and_kept(sv: Sanvisor, workdir: Path) -> None:
    cfg = write_config(workdir / "m.cfg", name="mackeeper", memory=128,
                       vif=["bridge=svbr1"])
    macs = []
    for _ in range(2):
        info = sv.json("create", str(cfg))
        try:
            macs.append(info["vifs"][0]["mac"])
        finally:
            sv.run("destroy", "mackeeper")
    assert macs[0] == macs[1]
    assert macs[0].startswith("00:16:3e:")


def test_a_guest_whose_qemu_died_is_reported(sv: Sanvisor, workdir: Path) -> None:
    cfg = write_config(workdir / "v.cfg", name="victim", memory=128)
    pid = sv.json("create", str(cfg))["pid"]
    sv.kill_agent()
    os.kill(pid, 9)
    sv.start_agent()
    row = sv.domain("victim")
    assert row["state"] == "lost" and row["letters"] == "----c-"
    assert "exited while the agent was away" in row["reason"]
    assert "victim is lost" in sv.fail("pause", "victim")
    sv.run("destroy", "victim")
    assert "victim" not in sv.names()
    # and while the agent watches
    pid = sv.json("create", str(cfg))["pid"]
    os.kill(pid, 9)
    from tests.guest.helpers import wait_until

    wait_until("the death to be seen", lambda: sv.domain("victim")["state"] == "lost", 10)
    assert "exited unexpectedly" in sv.domain("victim")["reason"]
    sv.run("destroy", "victim")


def test_on_crash_and_on_poweroff_preserve(sv: Sanvisor, workdir: Path) -> None:
    from tests.guest.helpers import wait_until

    cfg = write_config(workdir / "p.cfg", name="keeper", memory=128,
                       on_crash="preserve", on_poweroff="preserve")
    sv.run("create", str(cfg))
    try:
        sv.wait_marker("keeper")
        shell = GuestShell(sv.domain("keeper")["console_socket"])
        shell.n = 100
        with pytest.raises((GuestCommandError, OSError)):  # the guest dies under it
            shell.run("echo c > /proc/sysrq-trigger", timeout=5)
        wait_until("the crash", lambda: sv.domain("keeper")["state"] == "crashed", 30)
        assert sv.domain("keeper")["letters"] == "----c-"
    finally:
        sv.run("destroy", "keeper", check=False)
    sv.run("create", str(cfg))
    try:
        sv.wait_marker("keeper")
        sv.run("shutdown", "-w", "keeper")
        assert sv.domain("keeper")["state"] == "shutdown"
        assert sv.domain("keeper")["letters"] == "---s--"
    finally:
        sv.run("destroy", "keeper", check=False)


def test_create_dash_c_shows_the_boot_and_detaches(sv: Sanvisor, workdir: Path) -> None:
    """`create -c`: the console from the first byte (the seed's V-H), Ctrl-] leaves it."""
    import pty
    import select
    import time

    cfg = write_config(workdir / "c.cfg", name="watched", memory=128)
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sv.argv("create", "-c", str(cfg))[0], sv.argv("create", "-c", str(cfg)))
    try:
        buf = b""
        deadline = time.monotonic() + 60
        while b"SANVISOR-READY watched" not in buf:
            assert time.monotonic() < deadline, buf[-300:]
            if select.select([fd], [], [], 1)[0]:
                buf += os.read(fd, 65536)
        os.write(fd, b"\x1d")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)
        sv.run("destroy", "watched", check=False)
    info = sv.run("info").stdout
    assert "total_memory" in info and "driver" in info


def _by_serial(shell: GuestShell, serial: str) -> str:
    """The guest's sdX whose SCSI serial (the config's target) is ``serial``."""
    return shell.run("for b in /sys/block/sd*; do "
                     f"[ \"$(tail -c +5 $b/device/vpd_pg80)\" = {serial} ] && echo ${{b##*/}}; "
                     "done; true")


def test_partition_targets_as_xen_tools_writes_them(sv: Sanvisor, workdir: Path) -> None:
    """xen-create-image's shape: swap on xvda1, root on xvda2, root = '/dev/xvda2 ro'.
    On QEMU each volume is a disk of its own; root= is rewritten to the one the guest
    sees, and the guest kit mounts its root from it."""
    tree = workdir / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "marker").write_text("root from xvda2\n")
    rootimg, swap = workdir / "root.img", workdir / "swap.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(rootimg), "8M"],
                   check=True, capture_output=True)
    with swap.open("wb") as f:
        f.truncate(4 << 20)
    cfg = workdir / "xt.cfg"
    cfg.write_text("name = 'xtools'\nmemory = 128\nroot = '/dev/xvda2 ro'\n"
                   f"disk = [ 'file:{rootimg},xvda2,w',\n         'file:{swap},xvda1,w' ]\n"
                   "restart = 'onreboot'\n")
    sv.run("create", str(cfg))
    try:
        sv.wait_marker("xtools")
        shell = GuestShell(sv.domain("xtools")["console_socket"])
        assert shell.run("cat /mnt/root/etc/marker") == "root from xvda2"
        assert "root=/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_xvda2 ro" in \
            shell.run("cat /proc/cmdline")
        mounted = dict(kv.split("=", 1) for kv in shell.run("cat /run/sv-root").split())
        assert (mounted["fstype"], mounted["mode"]) == ("ext4", "ro")
        assert mounted["dev"] == "/dev/" + _by_serial(shell, "xvda2")
        # one vCPU: the scan order docs/config.md gives (by letter, then partition)
        assert (_by_serial(shell, "xvda1"), _by_serial(shell, "xvda2")) == ("sda", "sdb")
        extra = workdir / "extra.img"
        with extra.open("wb") as f:
            f.truncate(1 << 20)
        sv.run("block-attach", "xtools", f"file:{extra}", "xvdb1", "r")  # LUN 1041, hot
        wait_until("the hot-added xvdb1", lambda: _by_serial(shell, "xvdb1") == "sdc", 20)
    finally:
        sv.run("destroy", "xtools", check=False)


def test_an_nbd_disk(sv: Sanvisor, workdir: Path) -> None:
    """xm's 'nbd:HOST PORT' form: QEMU's NBD client on a TCP export (a
    qemu-storage-daemon here, in the agent's network namespace)."""
    img, pidfile = workdir / "nbd.img", workdir / "qsd.pid"
    with img.open("wb") as f:
        f.truncate(8 << 20)
    with socket.socket() as probe:  # a free port (the namespace, when there is one, is new)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    netns = ["ip", "netns", "exec", sv.netns] if sv.netns else []
    qsd = subprocess.Popen(
        [*netns, "qemu-storage-daemon", "--pidfile", str(pidfile),
         "--blockdev", f"driver=file,node-name=f,filename={img}",
         "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
         "--export", "type=nbd,id=e,node-name=f,name=,writable=on"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # the pid file comes once the server listens (qemu-storage-daemon(1))
        wait_until("qemu-storage-daemon to listen",
                   lambda: pidfile.exists() or qsd.poll() is not None, 10)
        assert qsd.poll() is None, qsd.communicate()[1]
        cfg = write_config(workdir / "n.cfg", name="nbdguest", memory=128,
                           disk=[f"nbd:127.0.0.1 {port},sdb,w"])
        sv.run("create", str(cfg))
        try:
            sv.wait_marker("nbdguest")
            assert sv.domain("nbdguest")["disks"][0]["path"] == f"nbd://127.0.0.1:{port}"
            shell = GuestShell(sv.domain("nbdguest")["console_socket"])
            dev = _by_serial(shell, "sdb")
            assert dev == "sda"  # its only disk: the guest's first, whatever its target
            assert shell.run(f"cat /sys/block/{dev}/size") == str((8 << 20) // 512)
            shell.run(f"printf sanvisor-nbd | dd of=/dev/{dev} conv=fsync 2>/dev/null")
            wait_until("the guest's write on the export",
                       lambda: img.read_bytes()[:12] == b"sanvisor-nbd", 10)
        finally:
            sv.run("destroy", "nbdguest", check=False)
    finally:
        qsd.terminate()
        try:
            qsd.wait(10)
        except subprocess.TimeoutExpired:
            qsd.kill()
            qsd.wait()


def test_a_qcow2_file_is_refused(sv: Sanvisor, workdir: Path) -> None:
    img = workdir / "vm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    cfg = write_config(workdir / "q.cfg", name="qcow", memory=128, disk=[f"file:{img},xvda,w"])
    before = _snapshot(sv)
    line = sv.fail("create", str(cfg))
    assert re.search(r"disk xvda: .*vm\.qcow2 is a qcow2 image, not raw", line), line
    assert _snapshot(sv) == before
