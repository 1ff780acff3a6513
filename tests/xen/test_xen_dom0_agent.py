"""The sanvisor agent itself in a nested Xen host's dom0: a real Xen host's plain case.

On a real Xen host the agent runs in dom0 and runs xl there (drivers/xen/local.py):
no command channel. Here the lab's host ``xen2`` (the session's Xen lab) lends its
dom0: its lab agent is stopped (the channel takes one client), the whole agent is
unpacked in dom0 (xenhost/agentbundle.py) and started there with a host.json that
names no transport, and this machine's CLI reaches it through a forward of its
unix socket over the channel (xenhost/forward.py). create, list and shutdown -w go
through it; xl in dom0 is the oracle. Everything is undone at the end, the lab's
agent started again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanvisor.waiting import wait_until
from sanvisor.xenhost import agentbundle
from sanvisor.xenhost.build import DOMU_KERNEL, DOMU_RAMDISK
from sanvisor.xenhost.forward import UnixForward
from sanvisor.xenhost.link import Dom0Link

pytestmark = [pytest.mark.xen,
              pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
              pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                 reason="qemu-system-x86_64 is not installed")]
HOME = "/var/lib/sanvisor"  # the agent's home in dom0 (root's default)


def _sv(*args: str, home: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sanvisor", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k != "SANVISOR_HOME"})


class Dom0Agent:
    def __init__(self, link: Dom0Link, client_home: Path) -> None:
        self.link, self.home = link, client_home
        self.timings: dict[str, float] = {}

    def dom0(self, argv: list[str], timeout: float = 120) -> str:
        rc, out, err = self.link.run(argv, timeout=timeout)
        assert rc == 0, f"dom0: {argv[:3]}... exited {rc}: {err[-600:]}"
        return out

    def sv(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _sv(*args, home=self.home)

    def xl_names(self) -> list[str]:
        return [ln.split()[0] for ln in self.dom0(["xl", "list"]).splitlines()[1:]]


@pytest.fixture(scope="module")
def agent(xen_lab: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dom0Agent]:
    lab_home = xen_lab / "xen2"
    stop = _sv("agent", "stop", home=lab_home)
    assert stop.returncode == 0, stop.stderr
    link = Dom0Link(str(lab_home / "vm" / "ctl.sock"))
    client = tmp_path_factory.mktemp("dom0-client")
    forward = UnixForward(link.spawn, agentbundle.python_argv(), f"{HOME}/agent.sock",
                          client / "agent.sock")
    a = Dom0Agent(link, client)
    try:
        t0 = time.monotonic()
        tar = link.spawn(["tar", "xzf", "-", "-C", "/"])
        tar.write(agentbundle.tarball(), time.monotonic() + 180)
        tar.close_stdin()
        assert tar.wait(180) == 0, bytes(tar.err).decode(errors="replace")
        a.timings["unpack"] = time.monotonic() - t0
        conf = {"name": "xen2", "driver": "xen",  # no "ctl": xl runs in this dom0
                "guest_kit": {"kernel": DOMU_KERNEL, "initrd": DOMU_RAMDISK}}
        link.put_file(f"{HOME}/host.json", json.dumps(conf).encode())
        t0 = time.monotonic()
        a.dom0(agentbundle.python_argv("-m", "sanvisor", "--home", HOME, "agent", "start"),
               timeout=240)
        a.timings["agent start"] = time.monotonic() - t0
        forward.start()
        yield a
    finally:
        forward.close()
        # xd1 is gone already when the test passed; then the dom0 agent and its files
        link.run(["xl", "destroy", "xd1"], timeout=60)
        link.run(agentbundle.python_argv("-m", "sanvisor", "--home", HOME, "agent", "stop"),
                 timeout=60)
        link.run(["rm", "-rf", HOME, agentbundle.AGENT_HOME], timeout=60)
        link.close()
        start = _sv("agent", "start", home=lab_home)
        assert start.returncode == 0, start.stderr


def test_the_agent_runs_in_dom0_and_calls_xl_itself(agent: Dom0Agent, tmp_path: Path
                                                    ) -> None:
    log = agent.dom0(["cat", f"{HOME}/agent.log"])
    assert "driver: xen, in this dom0 (xl run locally)" in log
    info = json.loads(agent.sv("--json", "info").stdout)
    assert info["driver"] == "xen" and info["host"] == "xen2"  # dom0's own xl info
    cfg = tmp_path / "xd1.cfg"  # read by the client here, the kernel is the host's kit
    cfg.write_text('name = "xd1"\nmemory = 128\nvcpus = 1\n')
    t0 = time.monotonic()
    made = agent.sv("create", str(cfg))
    assert made.returncode == 0, made.stderr
    agent.timings["create"] = time.monotonic() - t0
    assert "xd1" in agent.xl_names()  # xl itself, in dom0
    rows = [ln.split() for ln in agent.sv("list").stdout.splitlines()]
    row = next(r for r in rows if r[0] == "xd1")
    assert row[2:4] == ["128", "1"] and row[4] in ("r-----", "-b----")
    wait_until("xd1's init (it can power off then)", lambda: "SANVISOR-READY xd1" in
               agent.dom0(["cat", "/var/log/xen/console/guest-xd1.log"]), 90, interval=0.5)
    t0 = time.monotonic()
    down = agent.sv("shutdown", "-w", "-t", "90", "xd1")
    assert down.returncode == 0, down.stderr
    agent.timings["shutdown -w"] = time.monotonic() - t0
    assert "xd1" not in agent.xl_names()
    assert "xd1" not in agent.sv("list").stdout
    print("dom0 agent timings:", {k: round(v, 1) for k, v in agent.timings.items()})
