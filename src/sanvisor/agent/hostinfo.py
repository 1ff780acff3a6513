"""Facts about this host (the Domain-0 line of `list`, memory checks)."""

from __future__ import annotations

import os
from pathlib import Path


def meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            out[key] = int(parts[0])
    return out


def mem_total_mib() -> int:
    return meminfo().get("MemTotal", 0) // 1024


def mem_available_mib() -> int:
    return meminfo().get("MemAvailable", 0) // 1024


def cpu_seconds() -> float:
    """CPU time this host spent in user and system mode since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system = (int(x) for x in fields[:3])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def cpu_count() -> int:
    return os.cpu_count() or 1



def uptime() -> float:
    """Seconds since this host booted."""
    return round(float(Path("/proc/uptime").read_text().split()[0]), 1)
