"""Move one guest back and forth until it breaks (or N moves): the reproducer of
docs/migration.md's "QEMU 7.2 and live migration" (about one live move in nine of an
idling guest broke it on 7.2; none in 125 on QEMU 10, the default now; set
SANVISOR_QEMU=/usr/bin/qemu-system-x86_64 to run the system's 7.2).

The SAN lab with two hosts (bench.migratekit.Lab), one 128 MiB guest-kit guest on
the LUN with a NIC on the lab's LAN, rewriting 16 MiB of its memory then sleeping 1 s
(bench.migrate's "slow" rate), moved with `migrate -l` host1 -> host2 -> host1 ...
After each move its counter must go on and a 4 MiB RAM canary keep its checksum. At
the first guest that does not answer, the run stops and prints what its QEMU shows:
the agent holding the QMP monitor is killed (SIGKILL) so the monitor can be read
(state, local APIC, registers), and the lab is then removed. A guest the migration
reported moved but that is not on the target stops the run too, with the last lines of
each agent's log and each guest console.

    .venv/bin/python -m bench.migrate_soak --moves 30 [--unix] [--no-postcopy]
        [--no-nic | --no-disk] [--extra 'nohz=off'] [--out FILE.json]

Root only (namespaces). Not run by CI: a soak, minutes long.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from bench.migratekit import Lab, canary, start_dirtier
from sanvisor.lab.guestshell import GuestCommandError, GuestShell

NAME = "g128"


def _agent_pid(home: Path) -> int | None:
    """The pid of the agent whose SANVISOR_HOME is ``home`` (from /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if b"agent" in cmd and f"SANVISOR_HOME={home}".encode() in env:
            return int(proc.name)
    return None


async def _qmp(sock: Path, lines: list[str]) -> dict[str, Any]:
    c = QMPClient("soak")
    await asyncio.wait_for(c.connect(str(sock)), 10)
    try:
        out: dict[str, Any] = {"status": await c.execute("query-status")}
        for line in lines:
            out[line] = await c.execute("human-monitor-command", {"command-line": line})
        return out
    finally:
        await c.disconnect()


def diagnose(lab: Lab, host: str) -> dict[str, Any]:
    """What the hung guest's QEMU shows (its agent killed to free the monitor)."""
    row = lab.row(host, NAME)
    rundir = Path(row["console_log"]).parent
    pid = _agent_pid(lab.root / host)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    seen = asyncio.run(_qmp(rundir / "qmp.sock", ["info lapic", "info registers",
                                                  "info irq"]))
    regs = str(seen["info registers"]).splitlines()
    return {"status": seen["status"], "lapic": str(seen["info lapic"]),
            "rip": next((ln for ln in regs if ln.startswith("RIP=")), ""),
            "irq": str(seen["info irq"])}


def _tails(root: Path, count: int = 25) -> dict[str, list[str]]:
    """The last lines of each host's agent log and of its guests' consoles."""
    out: dict[str, list[str]] = {}
    for log in sorted([*root.glob("host*/agent.log"), *root.glob("host*/dom/*/console.log")]):
        try:
            out[str(log.relative_to(root))] = log.read_text(errors="replace").splitlines()[-count:]
        except OSError:
            continue
    return out


def _config_edit(lab: Lab, args: argparse.Namespace) -> None:
    """The guest's config as the options say (the lab writes it, we edit it)."""
    plain = lab.sv

    def sv(*a: str) -> str:
        if len(a) >= 4 and a[0] == "-H" and a[2] == "create":
            cfg = Path(a[3])
            lines = cfg.read_text().splitlines(True)
            if args.no_nic:
                lines = [ln for ln in lines if not ln.startswith("vif")]
            if args.no_disk:
                lines = [ln for ln in lines if not ln.startswith("disk")]
            if args.extra:
                lines.append(f'extra = "{args.extra}"\n')
            cfg.write_text("".join(lines))
        return plain(*a)

    lab.sv = sv  # type: ignore[method-assign]


def soak(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="soak", dir="/tmp"))
    shutil.rmtree(root)
    lab = Lab(root)
    _config_edit(lab, args)
    moves: list[dict[str, Any]] = []
    result: dict[str, Any] = {"options": vars(args), "moves": moves, "hung": None,
                              "lost": None}
    try:
        lab.up()
        shell = lab.create(128)
        start_dirtier(shell, 128, "slow")
        sums = canary(shell)
        host, other = "host1", "host2"
        flags = ["--no-postcopy"] if args.no_postcopy else []
        for i in range(args.moves):
            target = str(root / other) if args.unix else other
            t0 = time.monotonic()
            try:
                info = lab.js("-H", host, "migrate", "-l", *flags, NAME, target)
            except RuntimeError as exc:  # the migration itself failed: why, and stop
                moves.append({"n": i + 1, "intact": False, "error": str(exc)[:400]})
                result["lost"] = {"move": i + 1, "logs": _tails(root)}
                print(json.dumps(moves[-1]), json.dumps(result["lost"], indent=1), flush=True)
                break
            m = info["migration"]
            host, other = other, host
            move = {"n": i + 1, "to": host, "cli_s": round(time.monotonic() - t0, 2),
                    "total_ms": m["total_ms"], "downtime_ms": m["downtime_ms"]}
            try:
                shell = GuestShell(lab.row(host, NAME)["console_socket"])
            except StopIteration:  # reported moved, yet not there
                move["intact"], move["error"] = False, f"not on {host} after the move"
                moves.append(move)
                result["lost"] = {"move": i + 1, "logs": _tails(root)}
                print(json.dumps(move), json.dumps(result["lost"], indent=1), flush=True)
                break
            try:
                move["counter"] = shell.counter()
                move["intact"] = canary(shell) == sums
            except GuestCommandError as exc:
                move["intact"], move["error"] = False, str(exc)[:200]
            moves.append(move)
            print(json.dumps(move), flush=True)
            if not move["intact"]:
                if not any(r["name"] == NAME for r in lab.js("-H", host, "list")):
                    result["lost"] = {"move": i + 1, "logs": _tails(root, 60)}  # it died
                    print(json.dumps(result["lost"], indent=1), flush=True)
                    break
                result["hung"] = {"move": i + 1, "host": host, **diagnose(lab, host)}
                print(json.dumps(result["hung"], indent=1), flush=True)
                break
    finally:
        if result["hung"] or result["lost"]:  # the whole logs, kept for reading
            keep = Path(tempfile.mkdtemp(prefix="soak-logs-", dir="/tmp"))
            for log in [*root.glob("host*/agent.log"), *root.glob("host*/dom/*/*.log")]:
                dest = keep / log.relative_to(root)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(log, dest)
            print(f"logs kept in {keep}", flush=True)
        try:
            lab.sv("lab", "down")
        except Exception as exc:  # say it; the rest is removed by hand
            print(f"lab down: {exc}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)
    ok = sum(1 for m in moves if m.get("intact"))
    print(f"{ok} of {len(moves)} moves left the guest intact"
          + (f"; hung after move {result['hung']['move']}" if result["hung"] else "")
          + (f"; gone after move {result['lost']['move']}" if result["lost"] else ""))
    return result


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench.migrate_soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moves", type=int, default=30)
    ap.add_argument("--unix", action="store_true",
                    help="move through the agents' unix sockets (no TLS, no TCP)")
    ap.add_argument("--no-postcopy", action="store_true")
    nic = ap.add_mutually_exclusive_group()
    nic.add_argument("--no-nic", action="store_true", help="the guest has no vif")
    nic.add_argument("--no-disk", action="store_true", help="the guest has no disk")
    ap.add_argument("--extra", default="", help="more kernel arguments for the guest")
    ap.add_argument("--out", type=Path, help="write the moves and any hang as JSON")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench.migrate_soak: root only (the lab's namespaces)", file=sys.stderr)
        return 2
    result = soak(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=str))
    return 1 if result["hung"] or result["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
