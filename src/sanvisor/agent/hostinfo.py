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


def cpu_topology() -> dict[str, object]:
    """xm info's CPU lines: nr_nodes, cores_per_socket, threads_per_core, cpu_mhz
    (from /proc/cpuinfo and /sys; what cannot be read is left out)."""
    out: dict[str, object] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return out
    first = text.split("\n\n", 1)[0]
    info = {k.strip(): v.strip() for k, _, v in
            (ln.partition(":") for ln in first.splitlines())}
    nodes = [p for p in Path("/sys/devices/system/node").glob("node[0-9]*")]
    out["nr_nodes"] = max(1, len(nodes))
    cores, siblings = info.get("cpu cores", ""), info.get("siblings", "")
    if cores.isdigit():
        out["cores_per_socket"] = int(cores)
        if siblings.isdigit() and int(cores):
            out["threads_per_core"] = max(1, int(siblings) // int(cores))
    if info.get("cpu MHz"):
        out["cpu_mhz"] = round(float(info["cpu MHz"]))
    return out



def uptime() -> float:
    """Seconds since this host booted."""
    return round(float(Path("/proc/uptime").read_text().split()[0]), 1)
