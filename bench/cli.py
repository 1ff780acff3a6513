"""How fast the CLI answers, beside the interpreter's own start-up.

Read-only verbs (`list`, `domid`, `uptime`, `info`) against a real agent with N
paused guest-kit domains, each command run R times; baselines in the same run:
the venv's bare `python -c pass`, and `python -c "import sanvisor.cli.main"`.
Goal (issue 14): each read-only verb under 3x the bare interpreter's start.
``--driver fake --guests 1000``: the same against an agent on the fake driver (no
hypervisor) holding 1,000 domains (the pool's goal: `list` well under 0.5 s).
Prints a table (medians) and writes JSON to bench/results/cli.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def timed(argv: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        out.append(time.perf_counter() - t0)
    return out


def create_many(home: Path, cfg: Path, n: int) -> None:
    """n paused domains, through the API (the CLI's own start-up is not what is measured
    here)."""
    from sanvisor.api.client import AgentClient
    from sanvisor.model.config import parse_config

    client = AgentClient(home / "agent.sock")
    for i in range(n):
        spec = parse_config(cfg.read_text(), overrides=[f"name=cli{i}"]).spec
        client.create(spec.to_dict(), paused=True)


def destroy_all(home: Path) -> None:
    from sanvisor.api.client import AgentClient
    from sanvisor.errors import SanvisorError

    client = AgentClient(home / "agent.sock")
    try:
        names = [r["name"] for r in client.domains() if r["domid"]]
    except SanvisorError:
        return
    for name in names:
        with contextlib.suppress(SanvisorError):
            client.destroy(name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--guests", type=int, default=5)
    ap.add_argument("--driver", choices=["qemu", "fake"], default="qemu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="svcli", dir="/tmp"))
    home = tmp / "home"
    cfg = tmp / "b.cfg"
    cfg.write_text('name = "cli0"\nmemory = 128\n')
    sv = [str(VENV_BIN / "sanvisor"), "--home", str(home)]
    rows: dict[str, list[float]] = {}
    out = args.out or ROOT / "bench" / "results" / f"cli-{args.driver}.json"
    try:
        if args.driver == "fake":
            home.mkdir(parents=True, mode=0o700)
            (home / "host.json").write_text(json.dumps({"driver": "fake"}))
        subprocess.run([*sv, "agent", "start"], check=True, capture_output=True)
        create_many(home, cfg, args.guests)
        rows["python -c pass (baseline)"] = timed([sys.executable, "-c", "pass"], args.runs)
        rows["import sanvisor.cli.main"] = timed(
            [sys.executable, "-c", "import sanvisor.cli.main"], args.runs)
        for verb in (["list"], ["domid", "cli0"], ["uptime"], ["info"], ["--json", "list"]):
            rows["sanvisor " + " ".join(verb)] = timed([*sv, *verb], args.runs)
    finally:
        destroy_all(home)
        subprocess.run([*sv, "agent", "stop"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    base = statistics.median(rows["python -c pass (baseline)"])
    result = {name: {"median_ms": statistics.median(v) * 1e3,
                     "ratio_to_bare_python": statistics.median(v) / base,
                     "runs_ms": [x * 1e3 for x in v]} for name, v in rows.items()}
    print(f"{'command (' + str(args.guests) + ' domains)':<34} {'median':>9} {'x python':>9}")
    for name, r in result.items():
        print(f"{name:<34} {r['median_ms']:>7.1f}ms {r['ratio_to_bare_python']:>8.2f}x")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"driver": args.driver, "guests": args.guests,
                               "runs": args.runs, "commands": result}, indent=2))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
