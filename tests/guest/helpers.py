"""Helpers for tests on real guests: the CLI, the serial console, deadlines."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sanvisor import waiting
from sanvisor.errors import TimeoutError_

T = TypeVar("T")
BOOT_TIMEOUT = 60.0


def wait_until(what: str, fn: Callable[[], T | None], timeout: float = 30.0,
               interval: float = 0.05) -> T:
    """sanvisor's own wait (sanvisor.waiting), failing the test with ``what`` and the
    last value seen at the deadline."""
    last: list[T | None] = [None]

    def probe() -> T | None:
        last[0] = fn()
        return last[0]

    try:
        return waiting.wait_until(what, probe, timeout, interval)
    except TimeoutError_:
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} "
                             f"(last: {last[0]!r})") from None


class Sanvisor:
    """Runs the real CLI against one agent home (as a user would)."""

    def __init__(self, home: Path, netns: str | None) -> None:
        self.home = home
        self.netns = netns

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "sanvisor", "--home", str(self.home), *args]

    def run(self, *args: str, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True,
                              timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"sanvisor {' '.join(args)} failed rc={proc.returncode}:\n"
                                 f"{proc.stderr}{proc.stdout}")
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.run("--json", *args).stdout)

    def fail(self, *args: str) -> str:
        """Run a command that must fail with a one-line error; return that line."""
        proc = self.run(*args, check=False)
        assert proc.returncode != 0, f"sanvisor {' '.join(args)} should have failed"
        lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("sanvisor: warn")]
        assert len(lines) == 1, f"expected a one-line error, got: {proc.stderr!r}"
        assert lines[0].startswith("sanvisor: error: "), lines[0]
        return lines[0]

    def domain(self, ref: str) -> dict[str, Any]:
        rows = self.json("list", ref)
        return next(r for r in rows if r["domid"] != 0)

    def names(self) -> set[str]:
        return {r["name"] for r in self.json("list") if r["domid"] != 0}

    def wait_marker(self, ref: str, timeout: float = BOOT_TIMEOUT, count: int = 1) -> None:
        log = Path(self.domain(ref)["console_log"])
        wait_until(f"{ref}'s ready marker", lambda: log.exists()
                   and log.read_bytes().count(b"SANVISOR-READY") >= count, timeout)

    def start_agent(self) -> None:
        cmd = self.argv("agent", "start")
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def kill_agent(self) -> None:
        pid = self.agent_pid()
        if pid:
            os.kill(pid, signal.SIGKILL)
            wait_until("the agent to die", lambda: not Path(f"/proc/{pid}").exists()
                       or "zombie" in Path(f"/proc/{pid}/status").read_text().lower(), 10)

    def agent_pid(self) -> int | None:
        proc = self.run("--json", "agent", "status", check=False)
        data = json.loads(proc.stdout)
        pid = data.get("pid")
        return int(pid) if pid else None


def qemu_pids(home: Path) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (d / "cmdline").read_bytes()
                if str(home).encode() in cmd and b"qemu-system" in cmd:
                    out.append(int(d.name))
    return out
