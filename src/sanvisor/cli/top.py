"""`sanvisor top`: live per-domain CPU %, memory, vCPUs, block and network I/O.

Rates come from two samples of the counters. ``-b -n N`` prints N plain-text
frames for scripts; otherwise a rich live table refreshes every DELAY seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

JSON_KEYS = ["name", "state", "cpu_seconds", "cpu_percent", "mem_kib", "vcpus",
             "rd_bytes_per_s", "wr_bytes_per_s", "net_rx_bytes_per_s", "net_tx_bytes_per_s"]
COLUMNS = ["NAME", "STATE", "CPU(sec)", "CPU(%)", "MEM(k)", "VCPUS", "RD(B/s)", "WR(B/s)",
           "NETRX(B/s)", "NETTX(B/s)"]


def _rows(prev: dict[str, Any], cur: list[dict[str, Any]], dt: float) -> list[list[str]]:
    out = []
    for d in cur:
        st = d.get("stats") or {}
        p = (prev.get(d["uuid"]) or {}).get("stats") or {}

        def rate(key: str, st: dict[str, Any] = st, p: dict[str, Any] = p) -> str:
            if not p or dt <= 0:
                return "0"
            return str(int(max(0, st.get(key, 0) - p.get(key, 0)) / dt))

        cpu = st.get("cpu_seconds", 0.0)
        pct = (cpu - p.get("cpu_seconds", cpu)) / dt * 100 if p and dt > 0 else 0.0
        out.append([d["name"], d["letters"], f"{cpu:.1f}", f"{pct:.1f}",
                    str(st.get("mem_kib", d["mem_mib"] * 1024)), str(st.get("vcpus", d["vcpus"])),
                    rate("blk_rd_bytes"), rate("blk_wr_bytes"), rate("net_rx_bytes"),
                    rate("net_tx_bytes")])
    return out


def _text(rows: list[list[str]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
              for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    for r in rows:
        lines.append("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))
    return "\n".join(lines)


def _json_frame(prev: dict[str, Any], cur: list[dict[str, Any]], dt: float) -> str:
    rows: list[dict[str, Any]] = []
    for r in _rows(prev, cur, dt):
        row: dict[str, Any] = dict(zip(JSON_KEYS[:2], r[:2], strict=True))
        for k, v in zip(JSON_KEYS[2:], r[2:], strict=True):
            row[k] = float(v) if "." in v else int(v)
        rows.append(row)
    return json.dumps({"time": round(time.time(), 3), "domains": rows}, sort_keys=True)


def run(fetch: Callable[[], list[dict[str, Any]]], *, batch: bool, iterations: int,
        delay: float, as_json: bool = False) -> int:
    """``as_json``: one JSON object per frame and per line (JSON Lines), for scripts."""
    prev: dict[str, Any] = {}
    t_prev = time.monotonic()
    if batch or as_json:
        n = 0
        while iterations <= 0 or n < iterations:
            if n:
                time.sleep(delay)
            cur = fetch()
            now = time.monotonic()
            if as_json:
                print(_json_frame(prev, cur, now - t_prev), flush=True)
            else:
                print(_text(_rows(prev, cur, now - t_prev)), flush=True)
                print(flush=True)
            prev, t_prev = {d["uuid"]: d for d in cur}, now
            n += 1
        return 0
    from rich.live import Live
    from rich.table import Table

    def table(rows: list[list[str]]) -> Table:
        t = Table(title="sanvisor top (Ctrl-C to quit)")
        for c in COLUMNS:
            t.add_column(c, justify="right" if c != "NAME" else "left")
        for r in rows:
            t.add_row(*r)
        return t

    n = 0
    try:
        with Live(table([]), refresh_per_second=4, screen=False) as live:
            while iterations <= 0 or n < iterations:
                cur = fetch()
                now = time.monotonic()
                live.update(table(_rows(prev, cur, now - t_prev)))
                prev, t_prev = {d["uuid"]: d for d in cur}, now
                n += 1
                time.sleep(delay)
    except KeyboardInterrupt:
        pass
    return 0
