"""The demo's third act: the seed's own hypervisor. Two real Xen 4.17 hosts nested
under QEMU (`lab up --xen-hosts 2`), a PVH guest created on xen1 from an xm config,
then moved live to xen2 with `migrate -l`, its memory with it. Removed at the end."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from sanvisor.lab.demo import lab_logs, run_cli, show_tails, wait_marker
from sanvisor.lab.guestshell import GuestShell

CONFIG = """\
# A guest for a Xen host: paths are dom0's (the guest kit ships in /srv/domu).
# PVH: it migrates live (a PV guest cannot here: this Xen has no shadow paging)
name = "xdemo"
type = "pvh"
memory = 128
vif = [ 'bridge=xenbr0, ip=10.213.8.2/24' ]
disk = [ 'phy:/srv/domu/initrd.cpio,xvda,r' ]
"""


class XenAct:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = dict(os.environ, SANVISOR_LAB_HOME=str(tmp / "lab"))

    def sv(self, *args: str, show: bool = True, check: bool = True) -> str:
        return run_cli([sys.executable, "-m", "sanvisor", *args], args, env=self.env,
                       show=show, check=check)

    def info(self, host: str) -> dict[str, Any]:
        rows = json.loads(self.sv("-H", host, "--json", "list", "xdemo", show=False))
        return dict(next(r for r in rows if r["domid"] != 0))

    def run(self) -> None:
        print("\n# ---- act 3: Xen, the seed's hypervisor (two nested Xen 4.17 hosts) ----")
        t0 = time.monotonic()
        self.sv("lab", "up", "--hosts", "0", "--xen-hosts", "2", "--loopback", show=False)
        print(f"\n# two Xen hosts up in {time.monotonic() - t0:.0f} s: xen1, xen2")
        try:
            self._steps()
        except SystemExit:
            show_tails(lab_logs(self.tmp / "lab"))
            raise
        finally:
            self.sv("lab", "down", show=False, check=False)

    def _steps(self) -> None:
        cfg = self.tmp / "xdemo.cfg"
        cfg.write_text(CONFIG)
        print(f"# the config file ({cfg}):\n{cfg.read_text()}")
        self.sv("-H", "xen1", "create", str(cfg))
        wait_marker(Path(self.info("xen1")["console_log"]))
        self.sv("-H", "xen1", "list")
        shell = GuestShell(self.info("xen1")["console_socket"])
        shell.run("echo written-on-xen1 > /run/mark")
        print("\n# in the guest: /run/mark (a tmpfs) =", shell.run("cat /run/mark"),
              "; guest type:", shell.run("cat /sys/hypervisor/guest_type"))
        t0 = time.monotonic()
        self.sv("-H", "xen1", "migrate", "-l", "xdemo", "xen2")
        print(f"# moved live in {time.monotonic() - t0:.0f} s (xl's stream dom0 to dom0 "
              "over the lab's LAN, the agents arranging it)")
        self.sv("-H", "xen1", "list")
        self.sv("-H", "xen2", "list")
        moved = GuestShell(self.info("xen2")["console_socket"])
        print("\n# in the guest, now on xen2: /run/mark =", moved.run("cat /run/mark"))
        self.sv("-H", "xen2", "destroy", "xdemo")
