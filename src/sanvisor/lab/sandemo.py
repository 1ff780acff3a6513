"""The demo's SAN act: the seed's pool on one machine. A disk array serving a LUN
over two fabrics, two hosts with two HBAs each (`lab up --hosts 2`), one
multipath.conf pushed to both (one alias per WWID: the seed's fix), a guest
booted on host1 from the LUN, an HBA cut under its writes, then the guest moved
live to host2 with `migrate -l`, its memory and its disk with it; then volumes
(:mod:`sanvisor.lab.voldemo`). Removed at the end."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from sanvisor.lab.demo import lab_logs, run_cli, show_tails, wait_marker
from sanvisor.lab.guestshell import GuestShell

WWPNS = ["10:00:00:00:c9:00:01:00", "10:00:00:00:c9:00:01:01",
         "10:00:00:00:c9:00:02:00", "10:00:00:00:c9:00:02:01"]
CONFIG = """\
# A guest on the SAN: its disk is the LUN's multipath map, its NIC on the pool's LAN
name = "web1"
memory = 128
vif = [ 'mac=00:16:3e:00:aa:01, bridge=xenbr0, ip=10.213.100.50/24' ]
disk = [ 'phy:/dev/mapper/web1-sys,sda,w' ]
"""
MULTIPATH = """\
defaults {{
  user_friendly_names yes
}}
multipaths {{
  multipath {{
    wwid  {wwid}
    alias web1-sys
  }}
}}
"""
WRITE = ("i=0; while [ $i -lt {n} ]; do printf 'REC %06d\\n' $((i+{base})) | dd of=/dev/sda "
         "bs=512 seek=$((i+{base})) conv=sync,fsync 2>/dev/null || break; i=$((i+1)); done; "
         "echo $i")


class SanAct:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = dict(os.environ, SANVISOR_LAB_HOME=str(tmp / "san"))

    def sv(self, *args: str, show: bool = True, check: bool = True) -> str:
        return run_cli([sys.executable, "-m", "sanvisor", *args], args, env=self.env,
                       show=show, check=check)

    def js(self, *args: str) -> Any:
        return json.loads(self.sv("--json", *args, show=False))

    def shell(self, host: str) -> GuestShell:
        row = next(r for r in self.js("-H", host, "list") if r["name"] == "web1")
        return GuestShell(row["console_socket"])

    def run(self) -> None:
        print("\n# ---- act 2: the SAN (an array, two fabrics, two hosts with two HBAs "
              "each), multipath, live migration ----")
        t0 = time.monotonic()
        self.sv("lab", "up", "--hosts", "2", "--name", f"sd{os.getpid() % 100000}",
                show=False)
        print(f"\n# the lab is up in {time.monotonic() - t0:.0f} s")
        try:
            self._steps()
        except SystemExit:
            show_tails(lab_logs(self.tmp / "san"))
            raise
        finally:
            self.sv("lab", "down", show=False, check=False)

    def _steps(self) -> None:
        self.sv("lab", "status")
        self.sv("array", "lun", "create", "sys", "--size", "64M")
        for wwpn in WWPNS:  # zoning: the LUN is shown to both HBAs of both hosts
            self.sv("array", "zone", "add", "sys", wwpn)
        self.sv("-H", "host1", "scsi", "rescan")
        self.sv("-H", "host2", "scsi", "rescan", show=False)
        wwid = next(x["wwid"] for x in self.js("array", "lun", "list") if x["name"] == "sys")
        conf = self.tmp / "multipath.conf"
        conf.write_text(MULTIPATH.format(wwid=wwid))
        print(f"\n# one multipath.conf for the pool ({conf}):\n{conf.read_text()}")
        self.sv("multipath", "push", str(conf))
        self.sv("-H", "host1", "multipath", "-ll")
        cfg = self.tmp / "web1.cfg"
        cfg.write_text(CONFIG)
        print(f"\n# the config file ({cfg}):\n{cfg.read_text()}")
        self.sv("-H", "host1", "create", str(cfg))
        row = next(r for r in self.js("-H", "host1", "list") if r["name"] == "web1")
        wait_marker(Path(row["console_log"]))
        guest = self.shell("host1")
        guest.run("echo booted-on-host1 > /run/mark")
        print("\n# in the guest: 100 records written to /dev/sda:",
              guest.run(WRITE.format(n=100, base=0), timeout=120))
        self.sv("lab", "fault", "hba-down", "host1", "0")
        print("\n# in the guest, one HBA dead: 100 more records:",
              guest.run(WRITE.format(n=100, base=100), timeout=120))
        self.sv("-H", "host1", "multipath", "-ll")
        self.sv("lab", "fault", "hba-up", "host1", "0")
        c1 = guest.counter()
        self.sv("-H", "host1", "migrate", "-l", "web1", "host2")
        self.sv("list", "--pool")
        moved = self.shell("host2")
        print(f"\n# on host2: /run/mark (a tmpfs) = {moved.run('cat /run/mark')!r}, "
              f"counter {c1} before, {moved.counter()} after (not rebooted); records "
              "on the LUN:", moved.run("dd if=/dev/sda bs=512 count=200 2>/dev/null | "
                                       "tr '\\000' '\\n' | grep -c '^REC '", timeout=60))
        from sanvisor.lab import voldemo

        voldemo.run(self, WWPNS)
