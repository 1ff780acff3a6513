"""Live migration: total time, downtime, and what a client on the LAN sees.

sanvisor: `migrate -l` back and forth between the two hosts of the SAN lab (the
guest's disk a multipath LUN, its NIC on the pool's LAN). A client in the LAN's
namespace pings the guest every 10 ms and keeps a TCP echo session going (a line
every 10 ms) across each migration: packets lost, the longest gap between answers.

Baseline, same run: bare QEMU, the same guest (the argv our driver builds, without
disk or NIC), moved over a unix socket with QMP alone: downtime-limit 50 ms,
bandwidth uncapped, no post-copy, given up after 30 s.

Cells: 128 and 512 MiB guests; idle, rewriting an eighth of their memory once a
second ("slow"), and continuously ("fast"). After every migration the guest is
checked: a 4 MiB RAM canary's checksum and its counter going on. Root only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.migratekit import (
    RATES,
    Bare,
    Lab,
    bare_template,
    canary,
    check,
    dirtied,
    rate_mib_s,
    start_dirtier,
)
from sanvisor.lab.guestshell import GuestShell

ROOT = Path(__file__).resolve().parent.parent


def ours(lab: Lab, memory: int, rate: str, runs: int) -> list[dict[str, Any]]:
    """One cell on the lab: a fresh guest, migrated ``runs`` times back and forth."""
    name = f"g{memory}"
    shell = lab.create(memory)
    host, other = "host1", "host2"
    cell: list[dict[str, Any]] = []
    try:
        start_dirtier(shell, memory, rate)
        sums, c0, d0 = canary(shell), shell.counter(), dirtied(shell)
        for _ in range(runs):
            client = lab.client()
            t0 = time.monotonic()
            info = lab.js("-H", host, "migrate", "-l", name, other)
            wall = time.monotonic() - t0
            out, _ = client.communicate("stop\n", timeout=60)
            host, other = other, host
            row = lab.row(host, name)
            shell = GuestShell(row["console_socket"])
            ok, why = check(shell, Path(row["console_log"]), sums, c0)
            m = info["migration"]
            cell.append({"cli_s": wall, "total_ms": m["total_ms"],
                         "downtime_ms": m["downtime_ms"], "passes": m["passes"],
                         "mib": m["transferred_bytes"] / (1 << 20),
                         "postcopy": m["postcopy"], "intact": ok, "damage": why,
                         **json.loads(out.strip().splitlines()[-1])})
            if not ok:
                break
        if cell[-1]["intact"]:
            rate_now = rate_mib_s(memory, d0, dirtied(shell))
            for r in cell:
                r["dirty_mib_s"] = rate_now
    finally:
        with contextlib.suppress(Exception):
            lab.sv("-H", host, "destroy", name)
    return cell


def stress(tmp: Path, migrations: int) -> dict[str, Any]:
    """``migrations`` bare migrations of a 128 MiB guest rewriting its memory
    continuously, under multi- and single-threaded TCG: how many damaged it."""
    argv, template = bare_template(tmp / "ts", 128)
    out: dict[str, Any] = {}
    for threads in ("multi", "single"):
        variant = [a.replace("tcg,thread=multi", f"tcg,thread={threads}") for a in argv]
        bare = Bare(tmp / f"s{threads}", variant, template)
        done, damage = 0, []
        while done < migrations:
            cell = bare.cell(128, "fast", migrations - done)
            done += len(cell)
            damage += [r["damage"] for r in cell if not r["intact"]]
        out[threads] = {"migrations": done, "damaged": len(damage), "damage": damage}
        print(f"TCG thread={threads}: {len(damage)} of {done} migrations damaged the guest"
              + "".join(f"\n  {d}" for d in damage), flush=True)
    return out


def med(cell: list[dict[str, Any]], key: str) -> float | None:
    vals = [float(r[key]) for r in cell if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def table(results: dict[str, Any]) -> None:
    def f(v: float | None, unit: str = "") -> str:
        return "-" if v is None else f"{v:.0f}{unit}" if v >= 10 else f"{v:.1f}{unit}"

    print(f"\n{'guest':<12}{'path':<10}{'dirty':>8}{'wall':>8}{'total':>8}{'downtime':>10}"
          f"{'ping gap':>10}"
          f"{'tcp gap':>9}{'lost':>6}{'MiB':>6}{'post':>6}{'ok':>4}")
    for size, by in results["cells"].items():
        for rate in RATES:
            for path in ("bare", "sanvisor"):
                cell = by[path][rate]
                lost = [r["ping_sent"] - r["ping_received"] for r in cell
                        if r.get("ping_sent") is not None]
                wall = med(cell, "cli_s")
                print(f"{size + ' ' + rate:<12}{path:<10}"
                      f"{f(med(cell, 'dirty_mib_s')):>8}"
                      f"{f(None if wall is None else wall * 1000, 'ms'):>8}"
                      f"{f(med(cell, 'total_ms'), 'ms'):>8}"
                      f"{f(med(cell, 'downtime_ms'), 'ms'):>10}"
                      f"{f(med(cell, 'ping_gap_ms'), 'ms'):>10}"
                      f"{f(med(cell, 'tcp_gap_ms'), 'ms'):>9}"
                      f"{(str(max(lost)) if lost else '-'):>6}{f(med(cell, 'mib')):>6}"
                      f"{sum(bool(r.get('postcopy')) for r in cell):>6}"
                      f"{('yes' if all(r['intact'] for r in cell) else 'NO'):>4}")
    for size, by in results["cells"].items():
        for path, cells in by.items():
            for rate, cell in cells.items():
                for r in cell:
                    if not r["intact"]:
                        print(f"DAMAGED: {size} {rate} {path}: {r['damage']}")
    print("(medians of the runs; dirty: MiB/s the guest rewrote; wall: the migrate "
          "command, preflight included; total/downtime: QEMU's own measures; gaps: the longest "
          "silence seen by the LAN client; lost: most pings lost in one run; post: runs "
          "that switched to post-copy; ok: RAM canary and counter intact in every run)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="migrations per cell (default 3)")
    ap.add_argument("--sizes", default="128,512", help="guest sizes in MiB (default 128,512)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "migrate.json")
    ap.add_argument("--stress", type=int, default=0, metavar="N",
                    help="instead: N bare migrations of a guest rewriting its memory, "
                    "under multi- and single-threaded TCG; how many damaged it")
    args = ap.parse_args()
    if args.stress:
        tmp = Path(tempfile.mkdtemp(prefix="svbmig", dir="/tmp"))
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            found = stress(tmp, args.stress)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        path = args.out.with_name("migrate-stress.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(found, indent=2))
        print(f"JSON: {path}")
        return 0
    if os.geteuid() != 0:
        print("bench.migrate: the SAN lab needs root", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on a kill too
    tmp = Path(tempfile.mkdtemp(prefix="svbmig", dir="/tmp"))
    lab = Lab(tmp / "lab")
    results: dict[str, Any] = {"runs": args.runs, "cells": {}}
    try:
        lab.up()
        for memory in (int(x) for x in args.sizes.split(",")):
            argv, template = bare_template(tmp / f"t{memory}", memory)
            bare = Bare(tmp / f"b{memory}", argv, template)
            by: dict[str, dict[str, Any]] = {"bare": {}, "sanvisor": {}}
            results["cells"][f"{memory}M"] = by
            for rate in RATES:
                by["bare"][rate] = bare.cell(memory, rate, args.runs)
                by["sanvisor"][rate] = ours(lab, memory, rate, args.runs)
    finally:
        lab.down()
        shutil.rmtree(tmp, ignore_errors=True)
    table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
