"""The verbs through the agent on a nested Xen lab host (`lab up --xen-hosts 1`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from sanvisor.waiting import wait_until
from tests.labcli import LabCli

pytestmark = [pytest.mark.xen,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
              pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                 reason="qemu-system-x86_64 is not installed")]


class XLab(LabCli):
    def row(self, name: str) -> list[str]:
        out = self.sv("-H", "xen1", "list").stdout.splitlines()
        return next((ln.split() for ln in out if ln.startswith(name + " ")), [])

    def top(self, name: str) -> list[str]:
        out = self.sv("-H", "xen1", "top", "-b", "-n", "1").stdout.splitlines()
        return next(ln.split() for ln in out if ln.split() and ln.split()[0] == name)


@pytest.fixture(scope="module")
def xlab(xen_lab: Path) -> XLab:
    return XLab(xen_lab)


def _until(what: str, fn: Callable[[], object], timeout: float = 120) -> None:
    wait_until(what, fn, timeout, interval=0.3)


def _what_xg1_shows(xlab: XLab) -> str:
    """What a hung shutdown leaves to read: xg1's row, its vCPUs (which physical CPU,
    their state and time: a vCPU stuck running on one CPU points below the guest),
    its console's last lines, and the nested Xen's own console."""
    rows = xlab.sv("--json", "-H", "xen1", "list", "xg1", check=False).stdout
    vcpus = xlab.sv("--json", "-H", "xen1", "vcpu-list", "xg1", check=False).stdout
    log = xlab.root / "xen1" / "vm" / "console.log"
    xen = log.read_text(errors="replace")[-600:] if log.exists() else "no log"
    guest = xlab.sv("-H", "xen1", "console", "--history", "xg1", check=False).stdout
    return (f"rows={rows.strip()!r} vcpus={vcpus.strip()!r} "
            f"console tail={guest[-400:]!r} xen console tail={xen!r}")


def test_xm_verbs_on_a_xen_host(xlab: XLab, tmp_path: Path) -> None:
    cfg = tmp_path / "xg1.cfg"
    cfg.write_text('name = "xg1"\nmemory = 128\nmaxmem = 256\nvcpus = 1\nmaxvcpus = 2\n')
    xlab.sv("-H", "xen1", "create", str(cfg))
    try:
        header = xlab.sv("-H", "xen1", "list").stdout.splitlines()[0].split()
        assert header == ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)"]
        row = xlab.row("xg1")
        assert row[2:4] == ["128", "1"] and row[4] in ("r-----", "-b----")
        xlab.sv("-H", "xen1", "pause", "xg1")
        assert xlab.row("xg1")[4] == "--p---"
        assert xlab.top("xg1")[1] == "--p---"  # what xl itself says
        xlab.sv("-H", "xen1", "unpause", "xg1")
        _until("running again", lambda: xlab.top("xg1")[1] in ("r-----", "-b----"))
        xlab.sv("-H", "xen1", "mem-set", "xg1", "100")
        _until("the balloon", lambda: xlab.top("xg1")[4] == str(100 * 1024))
        bad = xlab.sv("-H", "xen1", "create", str(cfg), "name=huge", "memory=65536",
                      "maxmem=65536", check=False)
        assert bad.returncode != 0 and bad.stderr.startswith("sanvisor: error: xl create ")
        assert len(bad.stderr.strip().splitlines()) == 1
        assert xlab.row("huge") == []
        nok = xlab.sv("-H", "xen1", "create", str(cfg), "name=nokernel",
                      "kernel=/srv/domu/no-such-kernel", check=False)
        assert nok.returncode != 0 and nok.stderr.startswith("sanvisor: error: xl create ")
        assert len(nok.stderr.strip().splitlines()) == 1, nok.stderr
        assert "/srv/domu/no-such-kernel" in nok.stderr  # which file: libxc does not say
        assert xlab.row("nokernel") == []
        # once an xfail (issue 10, item 8): "acked but the guest did not halt", seen once
        # in CI on 2026-11-26 after pause, unpause and mem-set; not reproduced since
        # (docs/xen.md, "Tested on the real nested Xen"). A hang fails the test.
        down = xlab.sv("-H", "xen1", "shutdown", "-w", "-t", "90", "xg1", check=False)
        assert down.returncode == 0, f"{down.stderr.strip()}; {_what_xg1_shows(xlab)}"
        assert xlab.row("xg1") == []
    finally:
        xlab.sv("-H", "xen1", "destroy", "xg1", check=False)


def test_the_rest_of_xm_on_a_xen_host(xlab: XLab, tmp_path: Path) -> None:
    """vcpu-list/-pin, sched-credit2, dmesg, sysrq, xm's device tables, list -l, rename,
    dump-core and reboot -w, each through xl on the nested Xen (the lab shared by
    this module)."""
    from sanvisor.cli import sxp

    def sv(*args: str, check: bool = True) -> str:
        return xlab.sv("-H", "xen1", *args, check=check).stdout

    cfg = tmp_path / "xg2.cfg"
    cfg.write_text('name = "xg2"\nmemory = 128\nvcpus = 2\nmaxvcpus = 2\n'
                   "disk = [ 'phy:/srv/domu/initrd.cpio,xvda,r' ]\n"
                   "vif = [ 'bridge=xenbr0' ]\n")
    sv("create", str(cfg))
    try:
        row = xlab.js("-H", "xen1", "list", "xg2")[0]
        log = Path(row["console_log"])
        _until("xg2's ready marker", lambda: log.exists()
               and b"SANVISOR-READY" in log.read_bytes())
        vcpus = xlab.js("-H", "xen1", "vcpu-list", "xg2")
        assert [v["vcpu"] for v in vcpus] == [0, 1]
        sv("vcpu-pin", "xg2", "1", "0")
        assert next(v for v in xlab.js("-H", "xen1", "vcpu-list", "xg2")
                    if v["vcpu"] == 1)["affinity"] == [0]  # xl vcpu-list's own view
        sv("sched-credit", "-d", "xg2", "-w", "512", "-c", "50")
        credit = next(ln.split() for ln in sv("sched-credit").splitlines()
                      if ln.startswith("xg2 "))
        assert credit[2:] == ["512", "50"]  # read back from xl sched-credit2
        assert "Xen version 4.17" in sv("dmesg")
        sv("sysrq", "xg2", "s")
        _until("the guest's sysrq line", lambda: "Emergency Sync" in sv(
            "console", "--history", "xg2"), 30)
        block = sv("block-list", "xg2").splitlines()
        assert block[1].split()[0] == "51712" and block[1].split()[3] == "4"
        assert block[1].split()[6].startswith("/local/domain/0/backend/vbd/")
        net = sv("network-list", "xg2").splitlines()
        assert net[1].split()[2] == row["vifs"][0]["mac"]
        (node,) = sxp.parse(sv("list", "-l", "xg2"))
        assert dict(node[1])["name"] == "xg2"  # type: ignore[arg-type]
        info = xlab.js("-H", "xen1", "info")
        assert info["driver"] == "xen" and "xen_caps" in info
        sv("rename", "xg2", "xg3")
        assert len(xlab.js("-H", "xen1", "vcpu-list", "xg3")) == 2  # xl knows the name
        sv("rename", "xg3", "xg2")
        core = tmp_path / "xg2.core"
        sv("dump-core", "xg2", str(core))
        assert core.read_bytes()[:4] == b"\x7fELF" and core.stat().st_size > 100 << 20
        before = xlab.js("-H", "xen1", "list", "xg2")[0]["domid"]
        after = xlab.js("-H", "xen1", "reboot", "-w", "-t", "120", "xg2")
        assert after["domid"] != before and after["state"] in ("running", "blocked")
    finally:
        xlab.sv("-H", "xen1", "destroy", "xg2", check=False)
        xlab.sv("-H", "xen1", "destroy", "xg3", check=False)
