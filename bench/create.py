"""Toolstack overhead: `sanvisor create` -> ready marker, vs bare QEMU, same arguments.

Both runs boot the same guest-kit guest with the argv our driver builds; the
marker is detected the same way (polling the console log every 2 ms). The
difference of the medians is what sanvisor adds (CLI start, config parsing,
the API round trip, the agent's checks and QMP handshake). Then `list`
latency with N domains (created paused: list does not depend on guest load).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = b"SANVISOR-READY"


def wait_marker(log: Path, timeout: float = 60) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if MARKER in log.read_bytes():
                return time.monotonic()
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    raise RuntimeError(f"no marker in {log}")


def sv(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sanvisor", "--home", str(home), *args],
                          capture_output=True, text=True, check=True)


def bare_run(argv: list[str], rundir: Path) -> float:
    shutil.rmtree(rundir, ignore_errors=True)
    rundir.mkdir(parents=True)
    args = [a.replace(str(argv_dir(argv)), str(rundir)) for a in argv]
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return wait_marker(rundir / "console.log") - t0
    finally:
        proc.kill()
        proc.wait()


def argv_dir(argv: list[str]) -> Path:
    qmp = next(a for a in argv if a.startswith("unix:") and "qmp.sock" in a)
    return Path(qmp.removeprefix("unix:").split(",")[0]).parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--guests", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "create.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="svbench", dir="/tmp"))
    home = tmp / "home"
    cfg = tmp / "b.cfg"
    cfg.write_text('name = "bench1"\nmemory = 128\n')
    results: dict[str, object] = {}
    try:
        sv(home, "agent", "start")
        ours: list[float] = []
        bare: list[float] = []
        spawn: list[float] = []
        argv: list[str] = []
        for i in range(args.runs):
            wall, t0 = time.time(), time.monotonic()
            info = json.loads(sv(home, "--json", "create", str(cfg)).stdout)
            ours.append(wait_marker(Path(info["console_log"])) - t0)
            argv_file = Path(info["console_log"]).parent / "qemu.argv"
            spawn.append(argv_file.stat().st_mtime - wall)  # written just before the spawn
            argv = argv_file.read_text().split("\0")
            sv(home, "destroy", "bench1")
            bare.append(bare_run(argv, tmp / f"bare{i}"))
        med_ours, med_bare = statistics.median(ours), statistics.median(bare)
        results["create_to_marker"] = {
            "runs": args.runs, "sanvisor_s": ours, "bare_qemu_s": bare,
            "median_sanvisor_s": med_ours, "median_bare_qemu_s": med_bare,
            "overhead_ms": (med_ours - med_bare) * 1000,
            "spawn_offset_s": spawn, "median_spawn_offset_ms": statistics.median(spawn) * 1000,
            # from QEMU's spawn to the marker: does QEMU boot slower beside the agent?
            "median_boot_after_spawn_s": statistics.median(
                [o - sp for o, sp in zip(ours, spawn, strict=True)]),
        }
        for i in range(args.guests):
            sv(home, "create", "-p", str(cfg), f"name=lg{i}")
        lat = []
        for _ in range(20):
            t0 = time.monotonic()
            sv(home, "list")
            lat.append(time.monotonic() - t0)
        api = []
        from sanvisor.api.client import AgentClient

        client = AgentClient(home / "agent.sock")
        for _ in range(50):
            t0 = time.monotonic()
            client.domains()
            api.append(time.monotonic() - t0)
        results["list"] = {"domains": args.guests, "cli_median_ms": statistics.median(lat) * 1e3,
                           "api_median_ms": statistics.median(api) * 1e3}
    finally:
        subprocess.run([sys.executable, "-m", "sanvisor", "--home", str(home), "--json", "list"],
                       capture_output=True)
        for i in range(args.guests):
            subprocess.run([sys.executable, "-m", "sanvisor", "--home", str(home), "destroy",
                            f"lg{i}"], capture_output=True)
        subprocess.run([sys.executable, "-m", "sanvisor", "--home", str(home), "agent", "stop"],
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    c = results["create_to_marker"]
    lst = results["list"]
    assert isinstance(c, dict) and isinstance(lst, dict)
    print(f"{'measure':<44} {'value':>12}")
    print(f"{'create -> marker, bare QEMU (median)':<44} {c['median_bare_qemu_s']:>11.3f}s")
    print(f"{'create -> marker, sanvisor create (median)':<44} {c['median_sanvisor_s']:>11.3f}s")
    print(f"{'toolstack overhead (difference of medians)':<44} {c['overhead_ms']:>10.1f}ms")
    print(f"{'sanvisor create -> QEMU spawned (median)':<44} "
          f"{c['median_spawn_offset_ms']:>10.1f}ms")
    print(f"{'QEMU spawned -> marker under sanvisor':<44} "
          f"{c['median_boot_after_spawn_s']:>11.3f}s")
    print(f"{'list with ' + str(lst['domains']) + ' domains, CLI (median)':<44} "
          f"{lst['cli_median_ms']:>10.1f}ms")
    print(f"{'list with ' + str(lst['domains']) + ' domains, API only (median)':<44} "
          f"{lst['api_median_ms']:>10.1f}ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    raise SystemExit(main())
