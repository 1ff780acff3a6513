"""The Xen driver's local transport (a real dom0: xl run by the agent itself), with
real processes and a fake `xl` on PATH standing in for Xen's."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from sanvisor.drivers.xen.driver import XenDriver
from sanvisor.drivers.xen.local import LocalDom0
from sanvisor.errors import HypervisorError

FAKE_XL = """#!/bin/sh
case "$1" in
list) printf 'Name  ID   Mem VCPUs\\tState\\tTime(s)\\nDomain-0  0  1536  2  r-----  9.5\\n'
      printf 'guest1  3  128  1  -b----  1.2\\n' ;;
info) printf 'host  : dom0host\\nnr_cpus  : 2\\ntotal_memory  : 3072\\nxen_version : 4.17\\n' ;;
pause) [ "$2" = guest1 ] || { echo "invalid domain identifier $2" >&2; exit 1; } ;;
*) echo "xl: unknown command $1" >&2; exit 1 ;;
esac
"""


@pytest.fixture
def fake_xl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "xl").write_text(FAKE_XL)
    (tmp_path / "xl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    return tmp_path


def test_run_put_file_and_missing_programs(tmp_path: Path) -> None:
    dom0 = LocalDom0()
    assert dom0.run(["cat"], b"bytes in, bytes out") == (0, "bytes in, bytes out", "")
    assert dom0.run(["sh", "-c", "echo oops >&2; exit 3"]) == (3, "", "oops\n")
    assert dom0.run(["no-such-program-here"])[0] == 127
    assert dom0.run(["sleep", "5"], timeout=0.2)[0] == 137
    dom0.put_file(str(tmp_path / "a" / "b.cfg"), b"name='x'\n")
    assert (tmp_path / "a" / "b.cfg").read_bytes() == b"name='x'\n"


def test_spawn_streams_and_a_pty_for_the_console() -> None:
    dom0 = LocalDom0()
    got = bytearray()
    cat = dom0.spawn(["cat"], on_out=got.extend)
    cat.write(b"x" * (1 << 20))
    cat.close_stdin()
    assert cat.wait(30) == 0 and bytes(got) == b"x" * (1 << 20)
    seen = bytearray()
    done = threading.Event()

    def sink(data: bytes) -> None:
        seen.extend(data)
        if b"/dev/pts/" in seen:
            done.set()

    tty = dom0.spawn(["sh", "-c", "tty"], pty=True, on_out=sink)
    assert done.wait(30), seen  # `xl console` needs a terminal: it has one
    assert tty.wait(30) == 0
    slow = dom0.spawn(["sleep", "30"], timeout=0.3)
    assert slow.wait(30) != 0  # killed at its deadline
    with pytest.raises(HypervisorError, match="cannot run"):
        dom0.spawn(["no-such-program-here"])


def test_the_xen_driver_over_the_local_transport(fake_xl: Path) -> None:
    dom0 = LocalDom0()
    drv = XenDriver(dom0.run, dom0.put_file, spawn=dom0.spawn)
    rows = drv.hypervisor_domains()
    assert [(r["name"], r["domid"]) for r in rows] == [("Domain-0", 0), ("guest1", 3)]
    assert drv.host_facts()["total_memory"] == 3072
    drv.xl("pause", "guest1")
    with pytest.raises(Exception, match="invalid domain identifier"):
        drv.xl("pause", "nosuch")
