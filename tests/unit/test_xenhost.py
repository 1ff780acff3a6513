"""Pure parts of sanvisor.xenhost: package resolution, argv building, scripts."""

from __future__ import annotations

from pathlib import Path

from sanvisor.xenhost import XenKit, pv_config
from sanvisor.xenhost.host import qemu_argv, xen_cmdline
from sanvisor.xenhost.packages import (
    deb_name,
    parse_depends,
    parse_ldd,
    resolve_packages,
    wanted_dependency,
)
from sanvisor.xenhost.scripts import init_script

XEN_UTILS = """xen-utils-4.17
  Depends: libc6
  Depends: libxencall1
  Depends: libxenmisc4.17
  Depends: libyajl2
  Depends: <python3:any>
    python3
  Depends: python3
  Depends: xen-utils-common
  Recommends: qemu-system-xen
"""
FAKE = {
    "xen-hypervisor-4.17-amd64": "xen-hypervisor-4.17-amd64\n  Recommends: xen-utils-4.17\n",
    "xen-utils-4.17": XEN_UTILS,
    "xen-utils-common": "xen-utils-common\n |Depends: sysvinit-utils\n  Depends: libxenhypfs1\n",
    "xenstore-utils": "xenstore-utils\n  Depends: libc6\n  Depends: libxenstore4\n",
    "libxenmisc4.17": "libxenmisc4.17\n  Depends: libxencall1\n  Depends: libxentoolcore1\n"
                      "  Depends: zlib1g\n",
}


def test_parse_depends_skips_virtual_and_other_relations() -> None:
    assert parse_depends(XEN_UTILS) == [
        "libc6", "libxencall1", "libxenmisc4.17", "libyajl2", "python3", "xen-utils-common"]
    assert parse_depends(FAKE["xen-utils-common"]) == ["sysvinit-utils", "libxenhypfs1"]


def test_resolve_packages_follows_xen_libs_and_missing_libs() -> None:
    installed = {"libc6", "zlib1g"}
    pkgs = resolve_packages(lambda p: FAKE.get(p, p + "\n"), installed.__contains__)
    assert pkgs == [
        "xen-hypervisor-4.17-amd64", "xen-utils-4.17", "xen-utils-common", "xenstore-utils",
        "libxencall1", "libxenmisc4.17", "libyajl2", "libxenhypfs1", "libxenstore4",
        "libxentoolcore1",
    ]


def test_wanted_dependency() -> None:
    assert wanted_dependency("libxenstore4", lambda _p: True)
    assert not wanted_dependency("libc6", lambda _p: True)
    assert wanted_dependency("libyajl2", lambda _p: False)
    assert not wanted_dependency("python3", lambda _p: False)


def test_deb_name_escapes_epoch() -> None:
    assert deb_name("busybox", "1:1.35.0-4") == "busybox_1%3a1.35.0-4_amd64.deb"


def test_parse_ldd() -> None:
    text = ("\tlinux-vdso.so.1 (0x00007ffd)\n"
            "\tlibyajl.so.2 => not found\n"
            "\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f63)\n"
            "\t/lib64/ld-linux-x86-64.so.2 (0x00007f63)\n")
    assert parse_ldd(text) == {"libyajl.so.2": None,
                               "libc.so.6": "/lib/x86_64-linux-gnu/libc.so.6"}


def test_qemu_argv_and_cmdlines(tmp_path: Path) -> None:
    kit = XenKit(tmp_path / "xen", tmp_path / "vmlinuz", tmp_path / "dom0.cpio", "4.17")
    argv = qemu_argv(kit, tmp_path, "xen1", 3072, 1536)
    assert argv[argv.index("-kernel") + 1] == str(tmp_path / "xen")
    assert "console=com1" in xen_cmdline(1536) and "com2" not in xen_cmdline(1536)
    initrd = argv[argv.index("-initrd") + 1]
    assert initrd.endswith(f",{tmp_path / 'dom0.cpio'}") and "sv.hostname=xen1" in initrd
    assert f"socket,id=ctl,path={tmp_path / 'ctl.sock'},server=on,wait=off" in argv
    assert argv.count("-serial") == 1
    assert "virtserialport,bus=vser0.0,chardev=ctl,name=sanvisor.ctl" in argv


def test_scripts_and_pv_config() -> None:
    assert "@" not in init_script()
    assert "/usr/lib/sv-dom0/sanvisor/xenhost/dom0server.py" in init_script()
    cfg = pv_config("g1")
    assert 'type = "pv"' in cfg and "memory = 128" in cfg and "sv.hostname=g1" in cfg
