"""Xen: time to bring a nested Xen host up and its QEMU's memory (RSS), per-verb latency
of sanvisor's Xen driver against xl run directly in the same dom0 (same run, same
domain), and (unless --no-migrate) live migration of a 128 MiB idle PVH guest between
the two Xen hosts of a lab, its stream dom0 to dom0 over the lab's LAN.

"xl in dom0" is timed inside dom0 (date before and after, in one shell); "via the
channel" is the same xl command timed from the outer host (what any caller of
dom0 pays); "sanvisor driver" is the driver's verb (Python, the xl lock, the
channel). The driver's overhead is its time minus xl's own.

Migration: "total" is `sanvisor migrate -l` as the user waits for it; "downtime (xl)"
is from xl's own log on the source (the guest's last round to the target's
report that it started it, see drivers/xen/migrate.py); "ping gap" is the longest
silence a pinger on the lab's LAN (10 ms interval) saw from the guest during the move.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def rss_mib(pid: int) -> int:
    """A process's resident memory (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def main() -> int:
    from sanvisor.drivers.base import LaunchPlan
    from sanvisor.drivers.xen.driver import XenDriver
    from sanvisor.model.config import parse_config
    from sanvisor.xenhost import XenHost, build_xen_kit
    from sanvisor.xenhost.build import DOMU_KERNEL, DOMU_RAMDISK

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "xen.json")
    ap.add_argument("--moves", type=int, default=3, help="live migrations to time")
    ap.add_argument("--no-migrate", action="store_true", help="skip the lab of two hosts")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="svxb", dir="/tmp"))
    host = XenHost(build_xen_kit(), work, name="xb1")
    results: dict[str, Any] = {}
    loop = asyncio.new_event_loop()  # one loop: the domain's console relay lives in it
    run = loop.run_until_complete
    try:
        t0 = time.monotonic()
        host.start(timeout=240)
        results["host_up_s"] = time.monotonic() - t0
        assert host.proc is not None
        pid = host.proc.pid
        results["rss_boot_mib"] = rss_mib(pid)
        drv = XenDriver(lambda a, s: host.run(a, stdin=s), host.put_file, spawn=host.spawn,
                        poll=3600)
        spec = parse_config("name='xb'\nmemory=128\nmaxmem=256\n").spec
        plan = LaunchPlan(spec=spec, rundir=work, kernel=Path(DOMU_KERNEL),
                          initrd=Path(DOMU_RAMDISK), cmdline="console=hvc0")

        async def noop(name: str, data: dict[str, Any]) -> None:
            return None

        t0 = time.monotonic()
        inst = loop.run_until_complete(drv.launch(plan, noop))
        results["create_s"] = time.monotonic() - t0

        def in_dom0(cmd: str) -> float:
            # busybox date has no %N: dom0's /proc/uptime (10 ms ticks) before and after
            rc, out, err = host.run(["sh", "-c", f"read a _ </proc/uptime; {cmd} >/dev/null; "
                                     "read b _ </proc/uptime; echo $a $b"])
            assert rc == 0, err
            a, b = (float(x) for x in out.split())
            return (b - a) * 1e3

        def timed(fn: Any) -> float:
            t = time.monotonic()
            fn()
            return (time.monotonic() - t) * 1e3

        verbs = {
            "pause": ("xl pause xb", lambda: run(inst.pause())),
            "unpause": ("xl unpause xb", lambda: run(inst.unpause())),
            "mem-set": ("xl mem-set xb 120m", lambda: run(inst.set_balloon(120))),
            "list": ("xl list", lambda: drv.xl.list()),
        }
        rows = []
        for verb, (cmd, ours) in verbs.items():
            xl_ms = [in_dom0(cmd) for _ in range(args.runs)]
            chan_ms = [timed(lambda c=cmd: host.run(["sh", "-c", c]))
                       for _ in range(args.runs)]
            our_ms = [timed(ours) for _ in range(args.runs)]
            rows.append({"verb": verb, "xl_in_dom0_ms": statistics.median(xl_ms),
                         "xl_via_channel_ms": statistics.median(chan_ms),
                         "sanvisor_driver_ms": statistics.median(our_ms)})
        results["verbs"] = rows
        loop.run_until_complete(inst.destroy())
        loop.run_until_complete(inst.close())
        results["noop_channel_ms"] = statistics.median(
            [timed(lambda: host.run(["true"])) for _ in range(args.runs)])
        results["rss_after_mib"] = rss_mib(pid)
        # the driver's xl watcher sleeps between polls: end it, not leave it pending
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    finally:
        loop.close()
        host.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"nested Xen host up: {results['host_up_s']:.1f} s (QEMU RSS "
          f"{results['rss_boot_mib']} MiB; after the verbs {results['rss_after_mib']} MiB); "
          f"create of a 128 MiB PV domU through the driver: {results['create_s']:.1f} s; "
          f"empty channel round trip: {results['noop_channel_ms']:.0f} ms\n")
    print(f"{'verb':<10} {'xl in dom0':>12} {'xl via channel':>15} {'sanvisor driver':>16} "
          f"{'overhead':>9}")
    for r in results["verbs"]:
        print(f"{r['verb']:<10} {r['xl_in_dom0_ms']:>10.0f}ms {r['xl_via_channel_ms']:>13.0f}ms "
              f"{r['sanvisor_driver_ms']:>14.0f}ms "
              f"{r['sanvisor_driver_ms'] - r['xl_in_dom0_ms']:>7.0f}ms")
    if not args.no_migrate:
        from bench.xenmig import migrations, report

        results["migration"] = migrations(args.moves)
        report(results["migration"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
