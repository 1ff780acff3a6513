"""Unit tests for the pure parts of the driver and the agent (no QEMU here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sanvisor.agent import savefile
from sanvisor.agent.records import DomainRecord, Registry
from sanvisor.cli.render import list_table
from sanvisor.drivers.base import LaunchPlan, NicPlan
from sanvisor.drivers.qemu.argv import build_argv, disk_lun, memory_arg
from sanvisor.errors import ConflictError, SaveFileError, from_dict
from sanvisor.model.config import parse_config
from sanvisor.model.domain import State
from sanvisor.model.units import parse_mib


def _plan(tmp: Path, text: str) -> LaunchPlan:
    spec = parse_config(text, filename="t.cfg").spec
    nics = [NicPlan(index=i, vif=v, mac=v.mac or f"00:16:3e:00:00:{i:02x}", tap=f"vif1.{i}")
            for i, v in enumerate(spec.vifs)]
    return LaunchPlan(spec=spec, rundir=tmp, kernel=tmp / "k", initrd=tmp / "i",
                      cmdline="console=ttyS0", nics=nics)


def test_argv_for_the_seed_shape(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "name='vd'\nmemory=2048\nmaxmem=4096\nvcpus=2\n"
                 "vif=['mac=00:16:3e:00:00:01, bridge=xenbr0']\n"
                 "disk=['phy:/dev/loop7,sda,w', 'file:/srv/b.img,sdb,r']\n"
                 "on_reboot='destroy'\n")
    argv = build_argv(plan, qemu="qemu", accel="tcg")
    joined = " ".join(argv)
    assert "-m 2048M,slots=8,maxmem=4096M" in joined
    assert "-smp 2,maxcpus=2" in joined
    assert "driver=raw,node-name=disk-sda,file.driver=host_device,file.filename=/dev/loop7" \
        in joined
    assert "file.driver=file,file.filename=/srv/b.img,file.node-name=proto-sdb," \
           "file.read-only=on" in joined
    assert "scsi-hd,id=dev-sdb,bus=scsi0.0,channel=0,scsi-id=0,lun=1,drive=disk-sdb" in joined
    assert "tap,id=net0,ifname=vif1.0,script=no,downscript=no" in joined
    assert "virtio-net-pci,id=nic0,netdev=net0,mac=00:16:3e:00:00:01" in joined
    assert "-no-reboot" in argv and "-no-shutdown" in argv
    assert "-incoming" not in argv


def test_argv_escapes_commas_in_paths(tmp_path: Path) -> None:
    plan = _plan(tmp_path / "a,b", "name='c'\ndisk=['vdev=sda, access=w, target=/srv/a,b.img']\n")
    argv = build_argv(plan, qemu="q", accel="tcg")
    assert "file.filename=/srv/a,,b.img" in " ".join(argv)
    qmp = argv[argv.index("-qmp") + 1]
    assert qmp == f"unix:{tmp_path}/a,,b/qmp.sock,server=on,wait=off"
    for opt in (a for a in argv if "path=" in a):  # every unescaped comma separates options
        assert ",,b/" in opt


def test_disk_lun_and_memory() -> None:
    assert [disk_lun(t) for t in ("sda", "sdb", "xvdc", "hdd", "sdz", "sdaa")] == \
        [0, 1, 2, 3, 25, 26]
    assert memory_arg(128, 128) == "128M"
    assert memory_arg(128, 200) == "128M,slots=8,maxmem=256M"


def test_registry_keeps_macs_and_uuids(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r.json")
    mac = reg.mac_for("web", 0, None)
    assert mac.startswith("00:16:3e:")
    uuid = reg.uuid_for("web", None)
    again = Registry(tmp_path / "r.json")  # a restarted agent
    assert again.mac_for("web", 0, None) == mac
    assert again.uuid_for("web", None) == uuid
    assert again.mac_for("db", 0, None) != mac
    assert again.next_domid() == 1 and again.next_domid() == 2


def test_record_round_trip(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "name='r'\nvif=['bridge=br0']\n")
    rec = DomainRecord(uuid="u1", domid=3, spec=plan.spec, nics=plan.nics, kernel="/k",
                       state=State.PAUSED)
    rec.save(tmp_path / "d")
    back = DomainRecord.from_dict(json.loads((tmp_path / "d" / "domain.json").read_text()))
    assert back == rec


def _saved(tmp_path: Path, stream: bytes) -> Path:
    path = tmp_path / "s.save"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(fd, stream, savefile.HEADER_SIZE)
    savefile.write_header(fd, {"spec": {"name": "x"}}, "qemu")
    os.close(fd)
    return path


def test_save_file_checks(tmp_path: Path) -> None:
    path = _saved(tmp_path, b"QEVM" + os.urandom(100000))
    fd, hdr = savefile.read_header(path)
    try:
        assert os.lseek(fd, 0, os.SEEK_CUR) == savefile.HEADER_SIZE
        assert hdr["hypervisor"] == "qemu"
    finally:
        os.close(fd)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(SaveFileError, match="truncated"):
        savefile.read_header(path)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(SaveFileError, match="checksum"):
        savefile.read_header(path)
    path.write_bytes(b"QEVM" + data[4:])
    with pytest.raises(SaveFileError, match="not a sanvisor save file"):
        savefile.read_header(path)


def test_parse_mib() -> None:
    assert [parse_mib(x) for x in ("256", "256m", "1g", "262144k", "1G")] == \
        [256, 256, 1024, 256, 1024]
    for bad in ("", "lots", "-5", "0", "1.5m"):
        with pytest.raises(ValueError):
            parse_mib(bad)


def test_list_table_shape() -> None:
    out = list_table([{"name": "Domain-0", "domid": 0, "mem_mib": 512, "vcpus": 1,
                       "letters": "r-----", "cpu_seconds": 12.34}])
    assert out.splitlines()[0].split() == ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)"]
    assert out.splitlines()[1].split() == ["Domain-0", "0", "512", "1", "r-----", "12.3"]


def test_errors_cross_the_api_with_their_class() -> None:
    err = ConflictError("domain x already exists", domain="x")
    back = from_dict(json.loads(json.dumps(err.to_dict())))
    assert isinstance(back, ConflictError)
    assert str(back) == "domain x already exists" and back.context == {"domain": "x"}


def test_user_mode_nic_when_there_is_no_tap(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "name='u'\nvif=['type=user']\n")
    plan.nics[0].tap = None
    joined = " ".join(build_argv(plan, qemu="q", accel="tcg"))
    assert "-netdev user,id=net0,restrict=off" in joined


def test_kernel_command_line_for_the_guest_kit() -> None:
    from sanvisor.agent.host import kernel_cmdline

    spec = parse_config("name='k'\nroot='/dev/sda1 ro'\nextra='x=1'\n"
                        "vif=['ip=10.0.0.2/24, gateway=10.0.0.1']\n").spec
    nics = [NicPlan(index=0, vif=spec.vifs[0], mac="00:16:3e:00:00:01", tap=None)]
    line = kernel_cmdline(spec, nics)
    assert line.startswith("console=ttyS0 quiet")
    assert "root=/dev/sda1 ro" in line and line.endswith("x=1")
    assert "sv.ip0=10.0.0.2/24" in line and "sv.gw=10.0.0.1" in line
    spec.kernel = "/boot/vmlinuz"
    assert kernel_cmdline(spec, nics).split()[0] == "console=ttyS0"
    assert "quiet" not in kernel_cmdline(spec, nics)


def test_a_reused_pid_is_not_taken_for_our_qemu(tmp_path: Path) -> None:
    from sanvisor.drivers.qemu.driver import _is_qemu, _pid_alive

    assert _pid_alive(os.getpid())
    assert not _is_qemu(os.getpid(), tmp_path)  # alive, but not a QEMU of this rundir
    assert not _is_qemu(2 ** 22 + 12345, tmp_path)  # no such process
