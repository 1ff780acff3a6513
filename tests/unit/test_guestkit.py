"""Pure parts of the guest kit: newc writer, module ordering, vmlinux extraction."""

from __future__ import annotations

import io
import lzma
import stat
import struct
from pathlib import Path

import pytest

from sanvisor.drivers.qemu.guestdisks import BY_ID
from sanvisor.errors import GuestKitError
from sanvisor.guestkit import GuestKit, default_cache_dir
from sanvisor.guestkit.build import SCRIPTS, input_hash, script_text, write_initrd
from sanvisor.guestkit.cpio import Entry, NewcWriter, read_newc
from sanvisor.guestkit.kernel import extract_vmlinux, parse_depends
from sanvisor.guestkit.modules import (
    FS_MODULES,
    WANTED_MODULES,
    ModuleSet,
    collect_modules,
    dependency_order,
    modinfo_depends,
    norm,
    parse_builtin,
    parse_modules_dep,
)


def test_newc_round_trip() -> None:
    buf = io.BytesIO()
    w = NewcWriter(buf)
    w.directory("bin")
    w.file("bin/busybox", b"\x7fELF" + b"x" * 1001, 0o755)
    w.symlink("bin/sh", "busybox")
    w.add(Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    w.file("/init", b"#!/bin/sh\n", 0o755)
    w.close()
    blob = buf.getvalue()
    assert len(blob) % 4 == 0
    assert blob.endswith(b"\0") and b"TRAILER!!!" in blob
    entries = list(read_newc(blob))
    assert [e.name for e in entries] == ["bin", "bin/busybox", "bin/sh", "dev/console", "init"]
    assert entries[0].is_dir
    assert entries[1].data == b"\x7fELF" + b"x" * 1001
    assert stat.S_IMODE(entries[1].mode) == 0o755
    assert entries[2].is_symlink and entries[2].data == b"busybox"
    assert entries[3].rdev == (5, 1) and stat.S_ISCHR(entries[3].mode)


def test_newc_closed_writer_rejects() -> None:
    w = NewcWriter(io.BytesIO())
    w.close()
    with pytest.raises(ValueError):
        w.file("x", b"")


def test_dependency_order_deps_first_and_builtin_skipped() -> None:
    deps = {
        "virtio_net": ["net_failover", "virtio", "virtio_ring"],
        "net_failover": ["failover"],
        "virtio_pci": ["virtio_pci_modern_dev", "virtio", "virtio_ring"],
        "virtio": ["virtio_ring"],
        "sd_mod": ["scsi_mod", "crc_t10dif"],
        "scsi_mod": ["scsi_common"],
    }
    order = dependency_order(
        ["virtio_pci", "virtio-net", "sd_mod"], lambda m: deps.get(m, []), {"crc_t10dif"}
    )
    assert "crc_t10dif" not in order
    assert len(order) == len(set(order))
    for mod, ds in deps.items():
        for d in ds:
            if d in order:
                assert order.index(d) < order.index(mod), (d, mod)
    assert order[0] == "virtio_pci_modern_dev"  # DFS follows the listed dep order


def test_dependency_cycle_raises() -> None:
    with pytest.raises(GuestKitError):
        dependency_order(["a"], lambda m: {"a": ["b"], "b": ["a"]}[m])


def test_parsers() -> None:
    dep = "kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz\n"
    assert parse_modules_dep(dep) == {"virtio_net": ["net_failover"]}
    assert parse_builtin("kernel/drivers/acpi/processor.ko\n\n") == {"processor"}
    assert norm("kernel/drivers/misc/pvpanic/pvpanic-mmio.ko.xz") == "pvpanic_mmio"
    text = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n"
    assert parse_depends(text) == "linux-image-6.1.0-56-amd64"
    assert parse_depends("nothing\n") is None


def _fake_module(modinfo: bytes) -> bytes:
    """A minimal ELF64 LE with a .shstrtab and a .modinfo section."""
    shstr = b"\0.shstrtab\0.modinfo\0"
    data_off = 64
    modinfo_off = data_off + len(shstr)
    shoff = (modinfo_off + len(modinfo) + 7) // 8 * 8
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<QHHHH", header, 0x28, shoff, 64, 0, 0, 0)  # e_shoff .. unused
    struct.pack_into("<HHH", header, 0x3A, 64, 3, 1)  # shentsize, shnum, shstrndx
    body = bytes(header) + shstr + modinfo
    body += b"\0" * (shoff - len(body))

    def sh(name: int, off: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, 1, 0, 0, off, size, 0, 0, 1, 0)

    return body + sh(0, 0, 0) + sh(1, data_off, len(shstr)) + sh(11, modinfo_off, len(modinfo))


def test_modinfo_depends_and_collect(tmp_path: Path) -> None:
    elf = _fake_module(b"license=GPL\0depends=virtio,virtio-ring\0name=virtio_net\0")
    assert modinfo_depends(elf) == ["virtio", "virtio_ring"]
    assert modinfo_depends(_fake_module(b"depends=\0")) == []
    kdir = tmp_path / "kernel"
    kdir.mkdir()
    (kdir / "virtio_net.ko.xz").write_bytes(
        lzma.compress(_fake_module(b"depends=virtio,virtio_ring\0"))
    )
    (kdir / "virtio.ko").write_bytes(_fake_module(b"depends=virtio_ring\0"))
    (kdir / "virtio_ring.ko").write_bytes(_fake_module(b"depends=\0"))
    (kdir / "button.ko").write_bytes(_fake_module(b"depends=\0"))
    (tmp_path / "modules.builtin").write_text("kernel/drivers/acpi/button.ko\n")
    mods = collect_modules(tmp_path, ["virtio_net", "button"])
    assert mods.order == ("virtio_ring", "virtio", "virtio_net")
    assert mods.blobs["virtio_net"].startswith(b"\x7fELF")
    with pytest.raises(GuestKitError):
        collect_modules(tmp_path, ["missing_mod"])


def test_extract_vmlinux_from_synthetic_bzimage() -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 64
    decoy = b"\xfd7zXZ\x00garbage"  # a magic that is not a valid stream
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    blob = b"MZ" + b"\0" * 500 + decoy + b"\0" * 13 + payload + b"trailing-bytes" * 10
    assert extract_vmlinux(blob) == elf
    not_elf = lzma.compress(b"hello world", format=lzma.FORMAT_XZ)
    with pytest.raises(GuestKitError):
        extract_vmlinux(b"MZ" + not_elf)


def test_kit_dict_cache_dir_and_hash(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    kit = GuestKit(Path("/k/vmlinux"), Path("/k/initrd.cpio"), "6.1.0-56-amd64")
    assert kit.to_dict() == {
        "kernel": "/k/vmlinux", "initrd": "/k/initrd.cpio", "version": "6.1.0-56-amd64"
    }
    monkeypatch.setenv("SANVISOR_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "guest-kit"
    assert input_hash("a", "b") == input_hash("a", "b") != input_hash("a2", "b")
    for name in SCRIPTS:
        assert script_text(name).startswith(("#!/bin/sh", "#"))
    assert "SANVISOR-READY" in script_text("init.sh")


def test_filesystem_modules_are_in_the_kit_but_loaded_on_demand() -> None:
    mods = ModuleSet(("virtio", "crc16", "ext4"), {m: b"\x7fELF" + m.encode() for m in
                                                    ("virtio", "crc16", "ext4")})
    buf = io.BytesIO()
    write_initrd(buf, b"\x7fELFbusybox", ["sh", "mount"], mods, on_demand=("crc16", "ext4"))
    files = {e.name: e.data for e in read_newc(buf.getvalue())}
    assert files["lib/modules/load.order"] == b"virtio\n"
    assert files["lib/modules/fs.order"] == b"crc16\next4\n"
    assert files["lib/modules/ext4.ko"] == b"\x7fELFext4"
    assert files["sbin/sv-root"] == script_text("sv-root.sh").encode()
    assert "ext4" in FS_MODULES and "crc32c_generic" in FS_MODULES
    assert not set(FS_MODULES) & set(WANTED_MODULES)


def test_init_hands_root_to_sv_root() -> None:
    init = script_text("init.sh")
    assert "root=*) root=${arg#root=}" in init
    assert '/sbin/sv-root "$root"' in init
    assert init.index("/sbin/sv-root") < init.index('echo "SANVISOR-READY')
    sv_root = script_text("sv-root.sh")
    assert "scsi-0QEMU_QEMU_HARDDISK_$serial" in sv_root  # guestdisks.BY_ID, as udev names it
    assert BY_ID == "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_"


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="busybox is not installed")
def test_kit_scripts_parse_with_busybox_sh() -> None:
    import subprocess

    for name in SCRIPTS:
        res = subprocess.run(["/bin/busybox", "sh", "-n", "-c", script_text(name)],
                             capture_output=True, text=True, check=False)
        assert res.returncode == 0, (name, res.stderr)
