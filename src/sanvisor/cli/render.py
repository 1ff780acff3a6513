"""Output shapes: xm's tables, and --json everywhere."""

from __future__ import annotations

import json
import sys
from typing import Any


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def list_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'Name':<40} {'ID':>3} {'Mem':>5} {'VCPUs':>5} {'State':>10} {'Time(s)':>9}"]
    for r in rows:
        lines.append(f"{r['name']:<40} {r['domid']:>3} {r['mem_mib']:>5} {r['vcpus']:>5} "
                     f"{r['letters']:>10} {r['cpu_seconds']:>9.1f}")
    return "\n".join(lines)


def fmt_uptime(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    clock = f"{h}:{m:02d}:{s:02d}"
    return f"{days} day{'s' if days != 1 else ''}, {clock}" if days else clock


def uptime_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'Name':<40} {'ID':>3} {'Uptime':>20}"]
    for r in rows:
        lines.append(f"{r['name']:<40} {r['domid']:>3} {fmt_uptime(r['uptime']):>20}")
    return "\n".join(lines)


def parse_mib(text: str) -> int:
    """xl memory amounts: 256, 256m, 262144k, 1g (default unit: MiB)."""
    t = text.strip().lower()
    mult = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}
    try:
        value = float(t[:-1]) * mult[t[-1]] if t and t[-1] in mult else float(t)
    except ValueError:
        raise ValueError(f"invalid memory amount {text!r} (e.g. 256, 256m, 1g)") from None
    if value <= 0 or value != int(value):
        raise ValueError(f"invalid memory amount {text!r}")
    return int(value)
