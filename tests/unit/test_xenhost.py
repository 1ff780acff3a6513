"""Pure parts of sanvisor.xenhost: channel framing, package resolution, argv building."""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from sanvisor.xenhost import XenKit, pv_config
from sanvisor.xenhost.channel import (
    ChannelError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from sanvisor.xenhost.host import qemu_argv, xen_cmdline
from sanvisor.xenhost.packages import (
    deb_name,
    parse_depends,
    parse_ldd,
    resolve_packages,
    wanted_dependency,
)
from sanvisor.xenhost.scripts import SERVER, init_script

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


def test_request_roundtrip_quotes_argv() -> None:
    raw = encode_request(7, ["sh", "-c", "echo 'a b' $X"], b"in\x00put", 30)
    assert raw.count(b"\n") == 1
    req_id, timeout, script, stdin = decode_request(raw)
    assert (req_id, timeout, stdin) == (7, 30, b"in\x00put")
    assert script == "sh -c 'echo '\"'\"'a b'\"'\"' $X'\n"


def test_request_empty_stdin_and_min_timeout() -> None:
    raw = encode_request(1, ["true"], None, 0)
    assert raw.startswith(b"REQ 1 1 8 0\n") and decode_request(raw)[3] == b""
    with pytest.raises(ValueError):
        encode_request(1, [], None, 5)


def test_response_roundtrip_and_filtering() -> None:
    line = encode_response(9, 3, b"out\nput", b"").decode()
    assert decode_response(line, 9) == (3, "out\nput", "")
    assert decode_response(line, 8) is None  # a stale reply
    assert decode_response("HELLO sv-xenctl 1", 9) is None


def test_response_truncated_or_garbled() -> None:
    with pytest.raises(ChannelError):
        decode_response("RSP 9 0 b3V0 -", 9)
    with pytest.raises(ChannelError):
        decode_response("RSP 9 0 !!!! - END", 9)
    with pytest.raises(ChannelError):
        decode_response("RSP 9 x - - END", 9)


def test_qemu_argv_and_cmdlines(tmp_path: Path) -> None:
    kit = XenKit(tmp_path / "xen", tmp_path / "vmlinuz", tmp_path / "dom0.cpio", "4.17")
    argv = qemu_argv(kit, tmp_path, "xen1", 3072, 1536)
    assert argv[argv.index("-kernel") + 1] == str(tmp_path / "xen")
    assert "console=com1" in xen_cmdline(1536) and "com2" not in xen_cmdline(1536)
    initrd = argv[argv.index("-initrd") + 1]
    assert initrd.endswith(f",{tmp_path / 'dom0.cpio'}") and "sv.hostname=xen1" in initrd
    assert f"socket,id=ctl,path={tmp_path / 'ctl.sock'},server=on,wait=off" in argv
    assert argv.count("-serial") == 2


def test_scripts_and_pv_config() -> None:
    assert "@" not in init_script()
    assert "exec /sbin/sv-xenctl /dev/ttyS1" in init_script()
    cfg = pv_config("g1")
    assert 'type = "pv"' in cfg and "memory = 128" in cfg and "sv.hostname=g1" in cfg


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="needs busybox")
def test_server_script_over_a_pty(tmp_path: Path) -> None:
    """The dom0 server, run by busybox sh on a pty, answers framed requests."""
    script = tmp_path / "sv-xenctl"
    script.write_text(SERVER.replace("W=/tmp/sv-xenctl", f"W={tmp_path}/w"))
    master, slave = pty.openpty()
    tty = os.ttyname(slave)
    env = dict(os.environ, PATH=f"{tmp_path}/bin:" + os.environ.get("PATH", ""))
    (tmp_path / "bin").mkdir()
    for applet in ("base64", "timeout", "stty"):
        if shutil.which(applet) is None:
            os.symlink("/bin/busybox", tmp_path / "bin" / applet)
    proc = subprocess.Popen(["/bin/busybox", "sh", str(script), tty], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    buf = b""

    def line(deadline: float) -> str:
        nonlocal buf
        while b"\n" not in buf:
            assert time.monotonic() < deadline, buf
            buf += os.read(master, 65536)
        out, buf = buf.split(b"\n", 1)
        return out.decode()

    try:
        deadline = time.monotonic() + 10
        assert line(deadline) == "HELLO sv-xenctl 1"
        os.write(master, encode_request(5, ["sh", "-c", "cat; echo oops >&2; exit 4"],
                                        b"hello\n", 5))
        assert decode_response(line(deadline), 5) == (4, "hello\n", "oops\n")
        os.write(master, encode_request(6, ["printf", "%s|", "a b", "c"], None, 5))
        assert decode_response(line(deadline), 6) == (0, "a b|c|", "")
        big = os.urandom(200_000)
        os.write(master, encode_request(7, ["sh", "-c", "wc -c; echo x >&2"], big, 5))
        assert decode_response(line(deadline), 7) == (0, "200000\n", "x\n")
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
        os.close(slave)
