"""bench/xen.py's migration part: a lab of two nested Xen hosts (`lab up --xen-hosts
2`), a 128 MiB idle PVH guest on the lab's LAN, moved live back and forth with
`sanvisor migrate -l` while a pinger in the LAN's namespace pings it every 10 ms."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

GUEST = "xbm"
GUEST_IP = "10.213.100.200"
CONFIG = f"""name = "{GUEST}"
type = "pvh"
memory = 128
vif = [ 'bridge=xenbr0, ip={GUEST_IP}/24' ]
"""
#: what send() logs on the source (drivers/xen/migrate.py)
XL_LOG = re.compile(r"xl migrate (\S+): downtime (\d+) ms by xl's log")


class Pinger:
    """`ping -D` from the LAN's namespace; the reply times, kept as they come."""

    def __init__(self, netns: str, ip: str) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, "ping", "-D", "-n",
                                      "-i", "0.01", ip], stdout=subprocess.PIPE, text=True)
        self.replies: list[float] = []
        self.first = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = re.match(r"\[(\d+\.\d+)\] \d+ bytes from", line)
            if m:
                self.replies.append(float(m.group(1)))
                self.first.set()

    def gap_ms(self, t0: float, t1: float) -> float:
        """The longest time without a reply between wall-clock times t0 and t1."""
        ts = [t0, *[t for t in list(self.replies) if t0 < t < t1], t1]
        return max(b - a for a, b in itertools.pairwise(ts)) * 1000

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _qemu_rss(lab: Path) -> dict[str, int]:
    from bench.xen import rss_mib

    out = {}
    for pidfile in sorted(lab.glob("xen*/vm/qemu.pid")):
        out[pidfile.parent.parent.name] = rss_mib(int(pidfile.read_text()))
    return out


def migrations(moves: int) -> dict[str, Any]:
    from sanvisor.lab.demo import wait_marker

    tmp = Path(tempfile.mkdtemp(prefix="svxm", dir="/tmp"))
    lab = tmp / "lab"
    env = dict(os.environ, SANVISOR_LAB_HOME=str(lab))

    def sv(*args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "sanvisor", *args], env=env,
                             capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise SystemExit(f"bench: sanvisor {' '.join(args)}: {res.stderr.strip()}")
        return res.stdout

    out: dict[str, Any] = {"moves": []}
    pinger: Pinger | None = None
    try:
        t0 = time.monotonic()
        sv("lab", "up", "--hosts", "0", "--xen-hosts", "2", "--loopback")
        out["lab_up_s"] = time.monotonic() - t0
        out["rss_lab_up_mib"] = _qemu_rss(lab)
        netns = json.loads((lab / "lab.json").read_text()).get("lan_netns", "")
        if not netns:
            raise SystemExit("bench: the lab has no LAN (not root?): nothing to measure")
        cfg = tmp / f"{GUEST}.cfg"
        cfg.write_text(CONFIG)
        sv("-H", "xen1", "create", str(cfg))
        row = json.loads(sv("-H", "xen1", "--json", "list", GUEST))[0]
        wait_marker(Path(row["console_log"]))
        pinger = Pinger(netns, GUEST_IP)
        if not pinger.first.wait(60):
            raise SystemExit(f"bench: no ping reply from the guest at {GUEST_IP}")
        here, there = "xen1", "xen2"
        for _ in range(moves):
            w0, t0 = time.time(), time.monotonic()
            sv("-H", here, "--json", "migrate", "-l", GUEST, there)
            total = time.monotonic() - t0
            w1 = time.time()
            wait_until_reply(pinger, w1)
            logged = [m for m in XL_LOG.finditer((lab / here / "agent.log").read_text())
                      if m.group(1) == GUEST]
            out["moves"].append({
                "from": here, "to": there, "total_s": total,
                "downtime_xl_ms": int(logged[-1].group(2)) if logged else None,
                "ping_gap_ms": pinger.gap_ms(w0, time.time())})
            here, there = there, here
        out["rss_after_mib"] = _qemu_rss(lab)
        sv("-H", here, "destroy", GUEST)
    finally:
        if pinger is not None:
            pinger.stop()
        subprocess.run([sys.executable, "-m", "sanvisor", "lab", "down"], env=env,
                       capture_output=True, timeout=300)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def wait_until_reply(pinger: Pinger, after: float, timeout: float = 30) -> None:
    """Until the guest answers again after wall-clock time ``after``."""
    from sanvisor.waiting import wait_until

    wait_until("a ping reply after the move",
               lambda: bool(pinger.replies) and pinger.replies[-1] > after, timeout, 0.02)


def report(m: dict[str, Any]) -> None:
    print(f"\nlab of two Xen hosts up in {m['lab_up_s']:.0f} s; QEMU RSS after boot "
          f"{m['rss_lab_up_mib']}, after the moves {m['rss_after_mib']} (MiB)")
    print(f"\n{'live move (128 MiB PVH)':<26} {'total':>8} {'downtime (xl)':>14} "
          f"{'ping gap':>9}")
    for r in m["moves"]:
        dt = "-" if r["downtime_xl_ms"] is None else f"{r['downtime_xl_ms']} ms"
        print(f"{r['from'] + ' -> ' + r['to']:<26} {r['total_s']:>6.1f} s {dt:>14} "
              f"{r['ping_gap_ms']:>6.0f} ms")
    if m["moves"]:
        print(f"{'median':<26} {statistics.median(r['total_s'] for r in m['moves']):>6.1f} s")
