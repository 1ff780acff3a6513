"""The verbs through the agent on a nested Xen lab host (`lab up --xen-hosts 1`)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

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


def _until(what: str, fn: object, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not fn():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


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
        down = xlab.sv("-H", "xen1", "shutdown", "-w", "-t", "90", "xg1", check=False)
        if down.returncode != 0 and "did not shut down" in down.stderr:
            # Seen in CI on 2026-11-26, not understood yet (issue 4 note): after pause,
            # unpause and mem-set through the agent, xl shutdown is acked but the guest
            # never halts (xl list: r-----, CPU time frozen). The same sequence with
            # xl alone halts in 3 s; the lifecycle suite's shutdown passes.
            rows = xlab.js("-H", "xen1", "list", "xg1")
            log = next((r["console_log"] for r in rows if r.get("console_log")), "")
            tail = Path(log).read_text(errors="replace")[-400:] if log else "no log"
            pytest.xfail(f"xl shutdown acked but the guest did not halt (open); "
                         f"rows={rows!r} console tail={tail!r}")
        assert down.returncode == 0, down.stderr
        assert xlab.row("xg1") == []
    finally:
        xlab.sv("-H", "xen1", "destroy", "xg1", check=False)
