"""Read a QEMU process's CPU use and a tap's counters from /proc and /sys."""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(path: Path) -> list[str]:
    raw = path.read_text()
    # the command name is in parentheses and may hold spaces
    return raw[raw.rindex(")") + 2 :].split()


def cpu_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds used by the process, number of vCPU threads running now)."""
    try:
        f = _stat_fields(Path(f"/proc/{pid}/stat"))
    except (OSError, ValueError):
        return 0.0, 0
    seconds = (int(f[11]) + int(f[12])) / _TICK
    busy = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                name = (task / "comm").read_text().strip()
                if name.startswith("CPU ") and _stat_fields(task / "stat")[0] == "R":
                    busy += 1
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    return seconds, busy


def tap_bytes(ifname: str) -> tuple[int, int]:
    base = Path("/sys/class/net") / ifname / "statistics"
    try:
        return int((base / "rx_bytes").read_text()), int((base / "tx_bytes").read_text())
    except (OSError, ValueError):
        return 0, 0
