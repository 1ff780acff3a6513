"""`sanvisor demo`: the seed's xm session, for real, on this machine.

Starts a private agent (inside a network namespace of its own when root, so
nothing touches the host's network), creates a guest from an xm config file,
and runs the seed's verbs on it, printing each command as a user would type
it; then (as root) the SAN lab: multipath, an HBA cut, a live migration between
two hosts (:mod:`sanvisor.lab.sandemo`); then the same verbs on two nested Xen
hosts, with a migration between them (:mod:`sanvisor.lab.xendemo`). Everything it
made is removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sanvisor.errors import TimeoutError_
from sanvisor.lab.guestshell import GuestShell
from sanvisor.waiting import wait_until

CONFIG = """\
# A guest in the style of the seed's section V-G (kernel and ramdisk: the guest kit)
name = "demo1"
memory = 128
maxmem = 384
vcpus = 1
maxvcpus = 2
vif = [ 'mac=00:16:3e:00:00:01, bridge=xenbr0, ip=10.213.7.2/24' ]
disk = [ 'file:{disk},sda,w' ]
on_poweroff = "destroy"
on_reboot = "restart"
"""


def run_cli(cmd: list[str], shown: tuple[str, ...], *, env: dict[str, str] | None = None,
            show: bool = True, check: bool = True) -> str:
    """Run a sanvisor command line, printed as ``sanvisor SHOWN`` with its output, as a
    user would see it; exit the demo when it fails (``check``). Returns stdout."""
    if show:
        print(f"\n$ sanvisor {' '.join(shown)}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    out = proc.stdout + proc.stderr
    if show and out.strip():
        print(out.rstrip(), flush=True)
    if check and proc.returncode != 0:
        raise SystemExit(f"demo: 'sanvisor {' '.join(shown)}' failed")
    return proc.stdout


def wait_marker(log: Path, count: int = 1, timeout: float = 90) -> float:
    """Seconds until the guest's console log holds ``count`` ready markers."""
    t0 = time.monotonic()
    try:
        wait_until("the guest's ready marker", lambda: log.exists()
                   and log.read_bytes().count(b"SANVISOR-READY") >= count, timeout, 0.02)
    except TimeoutError_:
        raise SystemExit("demo: the guest did not reach its ready marker") from None
    return time.monotonic() - t0


def show_tails(items: list[tuple[str, Path]], count: int = 15) -> None:
    """A step failed: print the last lines of each log (CI keeps only the output).
    Warnings and errors anywhere in a log are shown too: xl's full stderr, say."""
    for what, path in items:
        with contextlib.suppress(OSError):
            lines = path.read_text(errors="replace").splitlines()
            flagged = [ln for ln in lines[:-count] if " WARNING " in ln or " ERROR " in ln]
            shown = flagged[-10:] + lines[-count:]
            print(f"\n# {what} ({path}), last lines:\n" + "\n".join(shown), flush=True)


def lab_logs(home: Path) -> list[tuple[str, Path]]:
    """Each lab host's agent log, its machine's console (a Xen host's serial line)
    and its guests' consoles."""
    items: list[tuple[str, Path]] = []
    for host in sorted(p for p in home.glob("*") if (p / "agent.log").exists()):
        items.append((f"{host.name}'s agent log", host / "agent.log"))
        items.append((f"{host.name}'s console", host / "vm" / "console.log"))
        items += [(f"console of a guest on {host.name}", c)
                  for c in sorted(host.glob("dom/*/console.log"))]
    return items


class Demo:
    def __init__(self, keep: bool = False, xen: bool = True, san: bool = True) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="svdemo", dir="/tmp"))
        self.home = self.tmp / "home"
        self.netns = f"svdemo{os.getpid()}" if os.geteuid() == 0 else None
        self.keep = keep
        self.xen = xen and os.geteuid() == 0  # the Xen lab needs root
        self.san = san and os.geteuid() == 0  # so does the SAN lab

    def sv(self, *args: str, show: bool = True, check: bool = True) -> str:
        cmd = [sys.executable, "-m", "sanvisor", "--home", str(self.home), *args]
        if self.netns and args[:2] == ("agent", "start"):
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        return run_cli(cmd, args, show=show, check=check)

    def run(self) -> int:
        if self.netns:
            subprocess.run(["ip", "netns", "add", self.netns], check=True)
        try:
            return self._steps()
        except SystemExit:
            self.diagnose()
            raise
        finally:
            self.cleanup()

    def _steps(self) -> int:
        disk = self.tmp / "demo1-sda.img"
        with open(disk, "wb") as fh:
            fh.truncate(64 << 20)
        cfg = self.tmp / "demo1.cfg"
        cfg.write_text(CONFIG.format(disk=disk))
        print(f"# the config file ({cfg}):\n{cfg.read_text()}")
        self.sv("agent", "start")
        t0 = time.monotonic()
        self.sv("create", str(cfg))
        info = self._info()
        log = Path(info["console_log"])
        wait_marker(log)
        took = time.monotonic() - t0
        marker = next(ln for ln in log.read_text(errors="replace").splitlines()
                      if "SANVISOR-READY" in ln)
        print(f"\n# console: {marker.strip()!r} ({took:.1f} s after create)")
        self.sv("list")
        shell = GuestShell(info["console_socket"])
        print("\n# in the guest:", shell.run("uname -r; cat /sys/block/sda/size; ip -o -4 addr "
                                             "show eth0 | awk '{print $4}'").replace("\n", " | "))
        c1 = shell.counter()
        self.sv("pause", "demo1")
        self.sv("list", "demo1")
        held = time.monotonic()
        time.sleep(1.0)  # let wall-clock time pass while paused (the point of the demo)
        self.sv("unpause", "demo1")
        c2 = shell.counter()
        print(f"\n# guest counter: {c1} before pause, {c2} after "
              f"{time.monotonic() - held:.1f} s paused (it does not tick while paused)")
        self.sv("vcpu-set", "demo1", "2")
        self.sv("mem-set", "demo1", "256")
        online = self.poll(lambda: shell.run("cat /sys/devices/system/cpu/online") == "0-1")
        mem = shell.run("grep MemTotal /proc/meminfo")
        print(f"\n# in the guest: cpus online {online}, {' '.join(mem.split())}")
        save = self.tmp / "demo1.save"
        c3 = shell.counter()
        self.sv("save", "demo1", str(save))
        self.sv("list")
        self.sv("restore", str(save))
        c4 = shell.counter()
        print(f"\n# guest counter: {c3} before save, {c4} after restore (no reboot)")
        self.sv("top", "-b", "-n", "1")
        self.sv("shutdown", "-w", "demo1")
        self.sv("list")
        if self.san:
            from sanvisor.lab.sandemo import SanAct

            SanAct(self.tmp).run()
        if self.xen:
            from sanvisor.lab.xendemo import XenAct

            XenAct(self.tmp).run()
        return 0

    @staticmethod
    def poll(fn: Callable[[], bool], timeout: float = 30) -> bool:
        try:
            return wait_until("the guest", fn, timeout, 0.1)
        except TimeoutError_:
            return False

    def _info(self) -> dict[str, str]:
        import json

        rows = json.loads(self.sv("--json", "list", "demo1", show=False))
        return dict(next(r for r in rows if r["domid"] != 0))

    def diagnose(self) -> None:
        """A step failed: what the agent and the guest said last (CI keeps only this)."""
        show_tails([("agent log", self.home / "agent.log"),
                    *((f"console of {d.name}", d / "console.log")
                      for d in sorted((self.home / "dom").glob("*")))])

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.sv("destroy", "demo1", show=False, check=False)
        self.sv("agent", "stop", show=False, check=False)
        if self.netns:
            subprocess.run(["ip", "netns", "del", self.netns], check=False)
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


def main(keep: bool = False, xen: bool = True, san: bool = True) -> int:
    return Demo(keep=keep, xen=xen, san=san).run()
