"""What bench/migrate.py drives: the SAN lab with one LUN, a client on its LAN that
pings and echoes the guest every 10 ms, the in-guest memory dirtier and RAM canary,
and bare QEMU moved by QMP alone (the baseline)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from sanvisor.lab.guestshell import GuestCommandError, GuestShell
from sanvisor.waiting import wait_until

WWPNS = ["10:00:00:00:c9:00:01:00", "10:00:00:00:c9:00:01:01",
         "10:00:00:00:c9:00:02:00", "10:00:00:00:c9:00:02:01"]
GUEST_IP = "10.213.100.60"
RATES = ("idle", "slow", "fast")
DIRTY = ("(head -c 1048576 /dev/urandom > /run/blk; i=0; while [ $i -lt {mib} ]; do "
         "cat /run/blk; i=$((i+1)); done > /run/src; cp /run/src /run/dirty; n=0; while :; "
         "do dd if=/run/src of=/run/dirty bs=1048576 conv=notrunc 2>/dev/null; n=$((n+1)); "
         "echo $n > /run/dirty.n; {pause} done) </dev/null >/dev/null 2>&1 & "
         "echo $! > /run/dirty.pid")
CLIENT = r"""
import json, re, socket, subprocess, sys, threading, time
ip = sys.argv[1]
ping = subprocess.Popen(["ping", "-D", "-n", "-i", "0.01", ip], stdout=subprocess.PIPE,
                        text=True)
pongs, seqs, echoes, state = [], [], [], {"sent": 0}
stop = threading.Event()
def read_ping():
    for line in ping.stdout:
        m = re.match(r"\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)", line)
        if m:
            pongs.append(float(m.group(1)))
            seqs.append(int(m.group(2)))
def tcp():
    while True:
        try:
            s = socket.create_connection((ip, 7), timeout=10)
            break
        except OSError:
            time.sleep(0.1)
    f = s.makefile("rb")
    while not stop.is_set():
        s.sendall(b"x\n"); state["sent"] += 1
        if f.readline():
            echoes.append(time.time())
        time.sleep(0.01)
threading.Thread(target=read_ping, daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
deadline = time.monotonic() + 60
while not (pongs and echoes) and time.monotonic() < deadline:
    time.sleep(0.01)
print("ready" if pongs and echoes else
      f"no answer from the guest: {len(pongs)} pongs, {len(echoes)} echoes", flush=True)
first = len(seqs)
sys.stdin.readline()
stop.set(); ping.send_signal(2); ping.wait(10)
def gap(ts):
    return max((b - a for a, b in zip(ts, ts[1:])), default=0.0) * 1000
window = seqs[first - 1:] if first else seqs
print(json.dumps({"ping_sent": window[-1] - window[0] + 1 if window else None,
                  "ping_received": len(window),
                  "ping_gap_ms": gap(pongs), "tcp_sent": state["sent"],
                  "tcp_answered": len(echoes), "tcp_gap_ms": gap(echoes)}))
"""


class Lab:
    """The SAN lab with two hosts and one LUN, driven through the CLI."""

    def __init__(self, root: Path) -> None:
        self.root, self.name = root, f"bm{os.getpid() % 100000}"
        self.env = dict(os.environ, SANVISOR_LAB_HOME=str(root))

    def sv(self, *args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "sanvisor", *args], capture_output=True,
                              text=True, env=self.env, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"sanvisor {' '.join(args)}: {proc.stderr}{proc.stdout}")
        return proc.stdout

    def js(self, *args: str) -> Any:
        return json.loads(self.sv("--json", *args))

    def up(self) -> None:
        self.sv("lab", "up", "--hosts", "2", "--name", self.name)
        self.sv("array", "lun", "create", "sys", "--size", "64M")
        for w in WWPNS:
            self.sv("array", "zone", "add", "sys", w)
        for h in ("host1", "host2"):
            self.sv("-H", h, "scsi", "rescan")
        wwid = next(x["wwid"] for x in self.js("array", "lun", "list") if x["name"] == "sys")
        conf = self.root.parent / "multipath.conf"
        conf.write_text("multipaths {\n  multipath {\n"
                        f"    wwid {wwid}\n    alias sys\n  }}\n}}\n")
        self.sv("multipath", "push", str(conf))

    def create(self, memory: int) -> GuestShell:
        cfg = self.root.parent / f"g{memory}.cfg"
        cfg.write_text(f'name = "g{memory}"\nmemory = {memory}\n'
                       f'vif = [ "bridge=xenbr0, ip={GUEST_IP}/24" ]\n'
                       'disk = [ "phy:/dev/mapper/sys,sda,w" ]\n')
        self.sv("-H", "host1", "create", str(cfg))
        row = self.row("host1", f"g{memory}")
        log = Path(row["console_log"])
        wait_until("the guest's marker", lambda: b"SANVISOR-READY" in log.read_bytes(), 120)
        return GuestShell(row["console_socket"])

    def row(self, host: str, name: str) -> dict[str, Any]:
        return dict(next(r for r in self.js("-H", host, "list") if r["name"] == name))

    def client(self) -> subprocess.Popen[str]:
        proc = subprocess.Popen(["ip", "netns", "exec", f"{self.name}-lan", sys.executable,
                                 "-c", CLIENT, GUEST_IP], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "ready":
            proc.kill()
            raise RuntimeError(f"the LAN client did not start: {line}")
        return proc

    def down(self) -> None:
        with contextlib.suppress(Exception):
            self.sv("lab", "down")


def start_dirtier(shell: GuestShell, memory: int, rate: str) -> None:
    if rate != "idle":
        pause = "sleep 1;" if rate == "slow" else ""
        shell.run(DIRTY.format(mib=memory // 8, pause=pause))
        wait_until("the dirtier", lambda: shell.run("cat /run/dirty.n 2>/dev/null || "
                                                    "echo 0") != "0", 120, 0.2)


def dirtied(shell: GuestShell) -> tuple[int, float]:
    return int(shell.run("cat /run/dirty.n 2>/dev/null || echo 0")), time.monotonic()


def rate_mib_s(memory: int, before: tuple[int, float], after: tuple[int, float]) -> float:
    return (after[0] - before[0]) * memory / 8 / max(after[1] - before[1], 1e-3)


def canary(shell: GuestShell) -> str:
    shell.run("[ -e /run/canary ] || head -c 4194304 /dev/urandom > /run/canary", 60)
    return shell.run("md5sum /run/canary | cut -c1-32", 60)


def check(shell: GuestShell, log: Path, sums: str, c0: int) -> tuple[bool, str]:
    """The guest after a migration: its RAM canary, its counter going on. A guest that
    does not answer is reported with the kernel's first complaint on its console."""
    try:
        if canary(shell) != sums:
            return False, "the RAM canary changed"
        if shell.counter() <= c0:
            return False, "the counter did not go on"
        return True, ""
    except GuestCommandError:
        text = log.read_text(errors="replace") if log.exists() else ""
        bad = [ln for ln in text.splitlines() if "BUG" in ln or "Oops" in ln
               or "panic" in ln]
        tail = " | ".join(ln.strip() for ln in text.splitlines()[-3:])
        return False, "the guest does not answer: " + (bad[0].strip() if bad else tail)


class Bare:
    """Bare QEMU moved by QMP alone: a running source, a fresh incoming each run."""

    def __init__(self, tmp: Path, argv: list[str], template: Path) -> None:
        self.tmp, self.argv, self.template = tmp, argv, template
        self.n = 0

    def spawn(self, incoming: bool) -> tuple[subprocess.Popen[bytes], Path]:
        self.n += 1
        rd = self.tmp / f"bare{self.n}"
        rd.mkdir(parents=True)
        argv = [a.replace(str(self.template), str(rd)) for a in self.argv]
        if incoming:
            argv += ["-incoming", "defer"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until("QEMU's QMP socket", lambda: (rd / "qmp.sock").exists(), 30, 0.02)
        return proc, rd

    async def migrate(self, src: Path, dst: Path) -> dict[str, Any]:
        a, b = QMPClient("src"), QMPClient("dst")
        await a.connect(str(src / "qmp.sock"))
        await b.connect(str(dst / "qmp.sock"))
        try:
            caps = {"capabilities": [{"capability": "events", "state": True}]}
            for c in (a, b):
                await c.execute("migrate-set-capabilities", caps)
            await a.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40,
                                                       "downtime-limit": 50})
            uri = f"unix:{dst / 'in.sock'}"
            await b.execute("migrate-incoming", {"uri": uri})
            await a.execute("migrate", {"uri": uri})
            t0 = time.monotonic()
            while True:
                info: Any = await a.execute("query-migrate")
                status = info.get("status")
                if status in ("failed", "cancelled") or (status == "completed"
                                                         and info.get("total-time")):
                    break
                if time.monotonic() - t0 > 30:
                    await a.execute("migrate_cancel")
                    return {"converged": False, "total_ms": 30000.0, "downtime_ms": None}
                await asyncio.sleep(0.02)
            for _ in range(500):  # then the target runs it (or says why not)
                st: Any = await b.execute("query-status")
                if st.get("status") == "running":
                    break
                await asyncio.sleep(0.01)
            ram = info.get("ram", {})
            return {"converged": info["status"] == "completed",
                    "total_ms": float(info.get("total-time", 0)),
                    "downtime_ms": float(info.get("downtime", 0)),
                    "passes": int(ram.get("dirty-sync-count", 0)),
                    "mib": int(ram.get("transferred", 0)) / (1 << 20)}
        finally:
            await a.disconnect()
            await b.disconnect()

    def cell(self, memory: int, rate: str, runs: int) -> list[dict[str, Any]]:
        """A fresh guest, migrated ``runs`` times from QEMU to QEMU."""
        procs: list[subprocess.Popen[bytes]] = []
        try:
            proc, rd = self.spawn(False)
            procs.append(proc)
            log = rd / "console.log"
            wait_until("the marker", lambda: log.exists() and b"SANVISOR-READY" in
                       log.read_bytes(), 120, 0.05)
            shell = GuestShell(str(rd / "console.sock"))
            start_dirtier(shell, memory, rate)
            sums, c0, d0 = canary(shell), shell.counter(), dirtied(shell)
            cell: list[dict[str, Any]] = []
            for _ in range(runs):
                nproc, nrd = self.spawn(True)
                procs.append(nproc)
                r = asyncio.run(self.migrate(rd, nrd))
                if r["converged"]:
                    proc.kill()
                    proc, rd = nproc, nrd
                else:
                    nproc.kill()
                shell = GuestShell(str(rd / "console.sock"))
                r["intact"], r["damage"] = check(shell, rd / "console.log", sums, c0)
                cell.append(r)
                if not r["intact"]:
                    break
            if cell[-1]["intact"]:
                rate_now = rate_mib_s(memory, d0, dirtied(shell))
                for r in cell:
                    r["dirty_mib_s"] = rate_now
            return cell
        finally:
            for p in procs:
                p.kill()
                p.wait()


def bare_template(tmp: Path, memory: int) -> tuple[list[str], Path]:
    """The argv our driver builds for a diskless, NIC-less guest of that size."""
    home = tmp / "agent"
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "sanvisor", "--home", str(home)]
    subprocess.run([*cmd, "agent", "start"], check=True, capture_output=True, env=env)
    try:
        cfg = tmp / "bare.cfg"
        cfg.write_text(f'name = "bare"\nmemory = {memory}\n')
        info = json.loads(subprocess.run([*cmd, "--json", "create", "-p", str(cfg)],
                                         check=True, capture_output=True, text=True).stdout)
        rd = Path(info["console_log"]).parent
        argv = (rd / "qemu.argv").read_text().split("\0")
        subprocess.run([*cmd, "destroy", "bare"], check=True, capture_output=True)
        return [a for a in argv if a != "-S"], rd
    finally:
        subprocess.run([*cmd, "agent", "stop"], capture_output=True)
