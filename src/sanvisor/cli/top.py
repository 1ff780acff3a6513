"""`sanvisor top`, as xentop: per-domain CPU, memory, vCPUs, network and disk I/O,
Domain-0 (the host) first, in 80 columns.

Flags as xentop: ``-b`` batch (plain frames for scripts), ``-i N`` frames then
exit (``-n N`` is the same: sanvisor's older spelling), ``-d SEC`` delay, ``-f``
full names, ``-x`` a VBD line and ``--networks`` a network line under each domain.
Keys on a terminal: ``q`` quits, ``D`` asks for the delay, ``S`` cycles the sort
column, ``N`` ``C`` ``M`` ``T`` ``V`` sort by name, CPU %, memory, CPU seconds,
vCPUs (again: the other way round), ``R`` repeats the header every 10 lines, ``B``
and ``W`` toggle the VBD and network lines, ``F`` full names. (xentop's ``N`` toggles
the network lines; here it sorts by name, ``W`` toggles them.)
``--json``: one JSON object per frame and line (JSON Lines).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: (header, width, key of the row) for each column; NAME is right-aligned as xentop
COLUMNS = [("NAME", 10, "name"), ("STATE", 6, "letters"), ("CPU(sec)", 9, "cpu_sec"),
           ("CPU(%)", 6, "cpu_pct"), ("MEM(k)", 9, "mem_kib"), ("MEM(%)", 6, "mem_pct"),
           ("VCPUS", 5, "vcpus"), ("NETTX(k)", 8, "net_tx_kib"),
           ("NETRX(k)", 8, "net_rx_kib")]
WIDTH = 80
SORTS = ["name", "cpu_pct", "mem_kib", "cpu_sec", "vcpus"]
SORT_KEYS = {"N": "name", "C": "cpu_pct", "M": "mem_kib", "T": "cpu_sec", "V": "vcpus"}


@dataclass
class View:
    sort: str = "name"
    reverse: bool = False
    full_names: bool = False
    vbds: bool = False
    networks: bool = False
    repeat_header: bool = False
    delay: float = 1.0
    message: str = ""
    done: bool = False
    pending: list[str] = field(default_factory=list)


def rows_of(prev: dict[str, Any], cur: list[dict[str, Any]], dt: float
            ) -> list[dict[str, Any]]:
    """Each domain's values: totals from its counters, rates from two samples."""
    host = next((d for d in cur if d.get("domid") == 0), None)
    total_kib = int((host or {}).get("host_mem_kib") or 0)
    out = []
    for d in cur:
        st = d.get("stats") or {}
        p = (prev.get(d.get("uuid") or d["name"]) or {}).get("stats") or {}
        cpu = float(st.get("cpu_seconds", d.get("cpu_seconds", 0.0)))
        pct = (cpu - float(p.get("cpu_seconds", cpu))) / dt * 100 if p and dt > 0 else 0.0
        mem = int(st.get("mem_kib", int(d.get("mem_mib", 0)) << 10))

        def rate(key: str, st: dict[str, Any] = st, p: dict[str, Any] = p) -> int:
            if not p or dt <= 0:
                return 0
            return int(max(0, st.get(key, 0) - p.get(key, 0)) / dt)

        has_io = d.get("domid") != 0 and bool(st)
        out.append({
            "name": d["name"], "domid": d.get("domid"), "letters": d.get("letters", ""),
            "cpu_sec": cpu, "cpu_pct": max(0.0, pct), "mem_kib": mem,
            "mem_pct": mem * 100 / total_kib if total_kib else 0.0,
            "maxmem_kib": int(d.get("maxmem_mib", d.get("mem_mib", 0))) << 10,
            "vcpus": int(st.get("vcpus", d.get("vcpus", 0))),
            "net_tx_kib": st.get("net_tx_bytes", 0) >> 10 if has_io else None,
            "net_rx_kib": st.get("net_rx_bytes", 0) >> 10 if has_io else None,
            "vbd_rd": st.get("blk_rd_ops") if has_io else None,
            "vbd_wr": st.get("blk_wr_ops") if has_io else None,
            "vbd_rsect": st.get("blk_rd_bytes", 0) // 512 if has_io else None,
            "vbd_wsect": st.get("blk_wr_bytes", 0) // 512 if has_io else None,
            "rd_bytes_per_s": rate("blk_rd_bytes"), "wr_bytes_per_s": rate("blk_wr_bytes"),
            "net_rx_bytes_per_s": rate("net_rx_bytes"),
            "net_tx_bytes_per_s": rate("net_tx_bytes"),
        })
    return out


def sort_rows(rows: list[dict[str, Any]], view: View) -> list[dict[str, Any]]:
    """Domain-0 stays first (as in xentop's default order); the others by the column."""
    head = [r for r in rows if r.get("domid") == 0]
    rest = [r for r in rows if r.get("domid") != 0]
    numeric = view.sort != "name"
    rest.sort(key=lambda r: r[view.sort] if numeric else str(r["name"]),
              reverse=view.reverse != numeric)  # numbers: biggest first by default
    return head + rest


def _cell(value: Any, width: int) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:.1f}"
    else:
        text = str(value)
    return text.rjust(width)


def table(rows: list[dict[str, Any]], view: View) -> list[str]:
    header = " ".join(h.rjust(w) for h, w, _ in COLUMNS)
    lines = [header]
    for i, r in enumerate(rows):
        if view.repeat_header and i and i % 10 == 0:
            lines.append(header)
        name = str(r["name"]) if view.full_names else str(r["name"])[:10]
        cells = [name.rjust(10)] + [_cell(r[k], w) for _, w, k in COLUMNS[1:]]
        lines.append(" ".join(cells))
        if view.vbds and r.get("vbd_rd") is not None:
            lines.append(f"{'':11}VBDs RD {r['vbd_rd']:>9} WR {r['vbd_wr']:>9} "
                         f"RSECT {r['vbd_rsect']:>11} WSECT {r['vbd_wsect']:>11}")
        if view.networks and r.get("net_rx_kib") is not None:
            lines.append(f"{'':11}Net  RX {r['net_rx_kib']:>9}k {r['net_rx_bytes_per_s']:>9}"
                         f"B/s TX {r['net_tx_kib']:>9}k {r['net_tx_bytes_per_s']:>9}B/s")
    return lines


def summary(rows: list[dict[str, Any]], cur: list[dict[str, Any]], view: View) -> list[str]:
    """xentop's three lines above the table."""
    states = {"r": "running", "b": "blocked", "p": "paused", "c": "crashed", "d": "dying",
              "s": "shutdown"}
    counts = dict.fromkeys(states.values(), 0)
    for r in rows:
        if r.get("domid") == 0:
            continue
        letter = next((c for c in str(r["letters"]) if c != "-"), "")
        if letter in states:
            counts[states[letter]] += 1
    host = next((d for d in cur if d.get("domid") == 0), {})
    total = int(host.get("host_mem_kib") or 0)
    used = int((host.get("stats") or {}).get("mem_kib") or 0)
    by = {"N": "name", "C": "CPU(%)", "M": "MEM(k)", "T": "CPU(sec)", "V": "VCPUS"}
    sort = next(v for k, v in by.items() if SORT_KEYS[k] == view.sort)
    ndoms = sum(1 for r in rows if r.get("domid") != 0)
    return [
        f"sanvisor top - {time.strftime('%H:%M:%S')}   sorted by {sort}"
        f"{' (reversed)' if view.reverse else ''}   delay {view.delay:g}s",
        f"{ndoms} domains: " + ", ".join(f"{n} {s}" for s, n in counts.items()),
        f"Mem: {total}k total, {used}k used, {max(0, total - used)}k free    "
        f"CPUs: {host.get('vcpus', '?')}",
    ]


def on_key(view: View, key: str) -> bool:
    """Apply a key; True when the delay must be asked for (D)."""
    if key in ("q", "Q"):
        view.done = True
    elif key == "D":
        return True
    elif key == "S":
        view.sort = SORTS[(SORTS.index(view.sort) + 1) % len(SORTS)]
        view.reverse = False
    elif key in SORT_KEYS:
        new = SORT_KEYS[key]
        view.reverse = not view.reverse if new == view.sort else False
        view.sort = new
    elif key == "R":
        view.repeat_header = not view.repeat_header
    elif key == "F":
        view.full_names = not view.full_names
    elif key == "B":
        view.vbds = not view.vbds
    elif key == "W":
        view.networks = not view.networks
    return False


def set_delay(view: View, text: str) -> None:
    try:
        value = float(text)
        if not 0 < value <= 3600:
            raise ValueError
    except ValueError:
        view.message = f"delay: {text.strip()!r} is not a number of seconds (0 < N <= 3600)"
        return
    view.delay, view.message = value, ""


def json_frame(rows: list[dict[str, Any]]) -> str:
    keep = ("name", "domid", "cpu_pct", "mem_kib", "mem_pct", "maxmem_kib", "vcpus",
            "net_tx_kib", "net_rx_kib", "vbd_rd", "vbd_wr", "vbd_rsect", "vbd_wsect",
            "rd_bytes_per_s", "wr_bytes_per_s", "net_rx_bytes_per_s", "net_tx_bytes_per_s")
    out = []
    for r in rows:
        row = {k: r[k] for k in keep}
        row.update(state=r["letters"], cpu_seconds=round(r["cpu_sec"], 1),
                   cpu_percent=round(r["cpu_pct"], 1), mem_percent=round(r["mem_pct"], 1))
        out.append(row)
    return json.dumps({"time": round(time.time(), 3), "domains": out}, sort_keys=True)


def run(fetch: Callable[[], list[dict[str, Any]]], *, batch: bool, iterations: int,
        delay: float, as_json: bool = False, view: View | None = None) -> int:
    view = view or View()
    view.delay = delay
    interactive = not (batch or as_json) and os.isatty(sys.stdin.fileno()) \
        and os.isatty(sys.stdout.fileno())
    if interactive:
        return _interactive(fetch, iterations, view)
    prev: dict[str, Any] = {}
    t_prev = time.monotonic()
    n = 0
    while iterations <= 0 or n < iterations:
        if n:
            time.sleep(view.delay)  # the user's -d: the pace of the frames, not a wait
        cur = fetch()
        now = time.monotonic()
        rows = sort_rows(rows_of(prev, cur, now - t_prev), view)
        if as_json:
            print(json_frame(rows), flush=True)
        else:
            print("\n".join(table(rows, view)) + "\n", flush=True)
        prev, t_prev = {d.get("uuid") or d["name"]: d for d in cur}, now
        n += 1
    return 0


def _interactive(fetch: Callable[[], list[dict[str, Any]]], iterations: int,
                 view: View) -> int:
    import select
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    prev: dict[str, Any] = {}
    t_prev = time.monotonic()
    n = 0
    tty.setcbreak(fd)
    try:
        while not view.done and (iterations <= 0 or n < iterations):
            cur = fetch()
            now = time.monotonic()
            rows = sort_rows(rows_of(prev, cur, now - t_prev), view)
            lines = [*summary(rows, cur, view), view.message, *table(rows, view)]
            sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(lines) + "\n")
            sys.stdout.flush()
            prev, t_prev = {d.get("uuid") or d["name"]: d for d in cur}, now
            n += 1
            deadline = time.monotonic() + view.delay
            while not view.done:  # keys until the next frame is due
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    break
                key = os.read(fd, 1).decode(errors="replace")
                if on_key(view, key):
                    sys.stdout.write("Delay(sec): ")
                    sys.stdout.flush()
                    termios.tcsetattr(fd, termios.TCSADRAIN, saved)
                    set_delay(view, sys.stdin.readline())
                    tty.setcbreak(fd)
                break  # redraw at once with the new order
    except KeyboardInterrupt:
        pass
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        sys.stdout.write("\n")
    return 0
