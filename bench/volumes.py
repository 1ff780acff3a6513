"""Volumes (issue 9): an LV served by the engine against the raw multipath map it
sits on and against a direct qemu-storage-daemon export of the same LUN file;
writes to an origin with one fresh snapshot against none; lvcreate/lvextend/lvs
latency against lvm2's own ``--driverloaded n`` commands on the same VG; backup of
a 1 GiB LV of a running guest against ``dd`` of the same LV's block device.

Runs in a lab of its own (one host; LUN a 512 MiB, LUN b 1.5 GiB). fio's nbd engine
drives the NBD targets with the same jobs as bench/storage.py. Every ratio is
against a baseline measured in the same run.
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
from typing import Any

from bench.storage import JOBS, start_qsd, sv

ROOT = Path(__file__).resolve().parent.parent
VG = "vgb"
MIB = 1 << 20
WRITE_JOBS = [j for j in JOBS if "write" in j[1]]
PARTS = ("throughput", "snapshot", "metadata", "backup")


def fio(uri: str, job: tuple[str, str, str, int], seconds: float, size: str,
        offset: int = 0, once: bool = False) -> float:
    """One fio job on [offset, offset + size) of ``uri`` (an NBD URI); ``once``: at most
    one pass over it (every block written once: no wrap-around), else ``seconds``."""
    _label, rw, bs, depth = job
    cmd = ["fio", "--name=b", f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}",
           f"--size={size}", f"--offset={offset}", f"--runtime={seconds}",
           "--output-format=json"] + ([] if once else ["--time_based"])
    cmd += ["--ioengine=nbd", f"--uri={uri}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    side = json.loads(out[out.index("{"):])["jobs"][0]
    side = side["read"] if "read" in rw else side["write"]
    return float(side["bw_bytes"] / MIB if bs == "1M" else side["iops"])


def median(fn: Any, runs: int) -> float:
    return statistics.median(fn() for _ in range(runs))


class Lvm2:
    """lvm2 confined to the given devices (its own LVM_SYSTEM_DIR), no device-mapper."""

    def __init__(self, devices: list[str], home: Path) -> None:
        sysdir = home / "lvm2"
        (sysdir / "lock").mkdir(parents=True, exist_ok=True)
        accept = ", ".join(f'"a|^{d}$|"' for d in devices)
        (sysdir / "lvm.conf").write_text(
            f"devices {{\n filter = [ {accept}, \"r|.*|\" ]\n global_filter = [ {accept}, "
            "\"r|.*|\" ]\n use_devicesfile = 0\n obtain_device_list_from_udev = 0\n"
            " external_device_info_source = \"none\"\n}\n"
            f"global {{\n locking_dir = \"{sysdir / 'lock'}\"\n use_lvmlockd = 0\n}}\n"
            "backup {\n backup = 0\n archive = 0\n}\nactivation {\n udev_sync = 0\n"
            " udev_rules = 0\n monitoring = 0\n}\n")
        self.env = dict(os.environ, LVM_SYSTEM_DIR=str(sysdir), LVM_SUPPRESS_FD_WARNINGS="1")

    def run(self, *args: str) -> float:
        t0 = time.perf_counter()
        subprocess.run(["lvm", args[0], "--driverloaded", "n", *args[1:]], env=self.env,
                       check=True, capture_output=True, stdin=subprocess.DEVNULL)
        return time.perf_counter() - t0


def timed(env: dict[str, str], *args: str) -> float:
    t0 = time.perf_counter()
    sv(env, *args)
    return time.perf_counter() - t0


def lvmap(home: Path, lv: str) -> dict[str, Any]:
    from sanvisor.api.client import AgentClient

    client = AgentClient(home / "agent.sock")
    return dict(client.call("POST", "/v1/lvm/lvmap", {"args": {"lv": lv}})["data"])


def fill(root: Path, m: dict[str, Any]) -> None:
    """Random data over an LV, straight into the array's LUN files."""
    for s in m["segments"]:
        f = root / "array" / "luns" / f"{s['map_id']}.img"
        subprocess.run(["dd", "if=/dev/urandom", f"of={f}", "bs=1M",
                        f"seek={s['map_offset'] // MIB}", f"count={s['length'] // MIB}",
                        "conv=notrunc"], check=True, capture_output=True)


def throughput(env: dict[str, str], root: Path, home: Path, maps: dict[str, str],
               args: argparse.Namespace) -> list[dict[str, Any]]:
    a_wwid = next(w for w, n in maps.items() if n == "a")
    qsock = root / "qsd.sock"
    qsd = start_qsd(["--blockdev", f"driver=file,filename={root}/array/luns/{a_wwid}.img,"
                     "node-name=f", "--nbd-server", f"addr.type=unix,addr.path={qsock}",
                     "--export", "type=nbd,id=e,node-name=f,name=d,writable=on"], qsock)
    try:
        # the same bytes of LUN a each time: the LV's, past the PV's label and metadata
        at = lvmap(home, f"{VG}/lv")["segments"][0]["map_offset"]
        uris = {"direct": (f"nbd+unix:///d?socket={qsock}", at),
                "map": (f"nbd+unix:///a?socket={home}/mapper/a.sock", at),
                "lv": (f"nbd+unix:///{VG}-lv?socket={home}/mapper/{VG}-lv.sock", 0)}
        rows = []
        for job in JOBS:
            row: dict[str, Any] = {"job": job[0], "depth": job[3],
                                   "unit": "MiB/s" if job[2] == "1M" else "IOPS"}
            for k, (uri, off) in uris.items():
                row[k] = median(lambda u=uri, o=off, j=job: fio(u, j, args.seconds, "384M", o),
                                args.runs)
            rows.append(row)
        return rows
    finally:
        qsd.kill()
        qsd.wait()


def snapshot_penalty(env: dict[str, str], home: Path,
                     args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every write of the snapshot's run is a first write: one pass over the LV at most
    (a time-based run would wrap around onto chunks already copied); the baseline
    runs the same way."""
    uri = f"nbd+unix:///{VG}-lv?socket={home}/mapper/{VG}-lv.sock"
    rows = []
    for chunk in ("4k", "64k"):  # lvm2's default chunk, and a larger one
        for job in WRITE_JOBS:
            none, one = [], []
            for _ in range(args.runs):
                none.append(fio(uri, job, args.seconds, "384M", once=True))
                sv(env, "-H", "host1", "lvcreate", "-s", "-c", chunk, "-L", "400M", "-n",
                   "snap", f"{VG}/lv")
                try:
                    one.append(fio(uri, job, args.seconds, "384M", once=True))
                finally:
                    sv(env, "-H", "host1", "lvremove", "-f", f"{VG}/snap")
            rows.append({"job": job[0], "depth": job[3], "chunk": chunk,
                         "unit": "MiB/s" if job[2] == "1M" else "IOPS",
                         "none": statistics.median(none), "snapshot": statistics.median(one)})
    return rows


def metadata(env: dict[str, str], root: Path, home: Path, maps: dict[str, str],
             n: int) -> dict[str, Any]:
    """Per-command latency: sanvisor's CLI, its agent's API alone, lvm2 (loop devices
    over the same LUN files; one after the other, never at once)."""
    from sanvisor.api.client import AgentClient

    client = AgentClient(home / "agent.sock")
    api: dict[str, list[float]] = {"lvcreate": [], "lvextend": [], "lvs": []}
    cli: dict[str, list[float]] = {"lvcreate": [], "lvextend": [], "lvs": []}
    lvm: dict[str, list[float]] = {"lvcreate": [], "lvextend": [], "lvs": []}

    def call(cmd: str, a: dict[str, Any]) -> float:
        t0 = time.perf_counter()
        client.call("POST", f"/v1/lvm/{cmd}", {"args": a})
        return time.perf_counter() - t0

    for i in range(n):
        cli["lvcreate"].append(timed(env, "-H", "host1", "lvcreate", "-a", "n", "-n", f"c{i}",
                                     "-L", "4M", VG))
        cli["lvextend"].append(timed(env, "-H", "host1", "lvextend", "-L", "+4M",
                                     f"{VG}/c{i}"))
        cli["lvs"].append(timed(env, "-H", "host1", "lvs", VG))
        api["lvcreate"].append(call("lvcreate", {"vg": VG, "name": f"a{i}", "size": "4M",
                                                 "activate": "n", "zero": "y"}))
        api["lvextend"].append(call("lvextend", {"lv": f"{VG}/a{i}", "size": "+4M"}))
        api["lvs"].append(call("lvs", {"select": [VG], "options": []}))
    loops = [subprocess.run(["losetup", "-f", "--show", str(root / "array" / "luns" /
                                                          f"{w}.img")],
                            check=True, capture_output=True, text=True).stdout.strip()
             for w in maps]
    try:
        lv2 = Lvm2(loops, root)
        for i in range(n):
            lvm["lvcreate"].append(lv2.run("lvcreate", "-an", "-Zn", "-L", "4M", "-n",
                                           f"m{i}", VG))
            lvm["lvextend"].append(lv2.run("lvextend", "-L", "+4M", f"{VG}/m{i}"))
            lvm["lvs"].append(lv2.run("lvs", VG))
    finally:
        for dev in loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
    return {k: {"cli_ms": statistics.median(cli[k]) * 1e3,
                "api_ms": statistics.median(api[k]) * 1e3,
                "lvm2_ms": statistics.median(lvm[k]) * 1e3} for k in api}


def backup(env: dict[str, str], root: Path, home: Path) -> dict[str, Any]:
    """A 1 GiB LV of a running guest: `backup` against dd of its block device."""
    sv(env, "-H", "host1", "lvcreate", "-n", "big", "-L", "1G", VG, "/dev/mapper/b")
    fill(root, lvmap(home, f"{VG}/big"))
    cfg = root / "bk.cfg"
    cfg.write_text(f'name = "bk"\nmemory = 128\ndisk = [ "phy:/dev/{VG}/big,sda,w" ]\n')
    sv(env, "-H", "host1", "create", str(cfg))
    try:
        out = root / "big.img"
        job = json.loads(sv(env, "--json", "-H", "host1", "backup", "bk", "sda", "--to",
                            str(out), "-L", "256M"))
        out.unlink()
        dev = home / "dev" / VG / "big"
        t0 = time.perf_counter()
        subprocess.run(["dd", f"if={dev}", f"of={out}", "bs=1M", "iflag=direct"],
                       check=True, capture_output=True)
        dd = time.perf_counter() - t0
        out.unlink()
        return {"bytes": job["total"], "backup_s": job["seconds"], "backup_mib_s":
                job["total"] / MIB / job["seconds"], "dd_s": dd,
                "dd_mib_s": job["total"] / MIB / dd}
    finally:
        sv(env, "-H", "host1", "destroy", "bk")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0, help="per fio job")
    ap.add_argument("--runs", type=int, default=1, help="runs per cell (the median)")
    ap.add_argument("--ops", type=int, default=10, help="metadata commands of each kind")
    ap.add_argument("--only", action="append", choices=PARTS,
                    help="run only this part (repeatable); default: all")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "volumes.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/volumes needs root (the lab)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="svbv", dir="/tmp"))
    shutil.rmtree(root)
    env = dict(os.environ, SANVISOR_LAB_HOME=str(root))
    results: dict[str, Any] = {"seconds": args.seconds, "runs": args.runs}
    try:
        sv(env, "lab", "up", "--hosts", "1", "--name", f"v{os.getpid() % 10000}")
        home = root / "host1"
        maps: dict[str, str] = {}
        for name, size in (("a", "512M"), ("b", "1536M")):
            lun = json.loads(sv(env, "--json", "array", "lun", "create", name, "--size", size))
            maps[lun["wwid"]] = name
            for k in (0, 1):
                sv(env, "array", "zone", "add", name, f"10:00:00:00:c9:00:01:0{k}")
        conf = root / "mp.conf"
        conf.write_text("defaults {\n user_friendly_names yes\n}\nmultipaths {\n" + "".join(
            f" multipath {{\n  wwid {w}\n  alias {n}\n }}\n" for w, n in maps.items()) + "}\n")
        sv(env, "multipath", "push", str(conf))
        sv(env, "-H", "host1", "scsi", "rescan")
        sv(env, "-H", "host1", "vgcreate", VG, "/dev/mapper/a", "/dev/mapper/b")
        sv(env, "-H", "host1", "lvcreate", "-n", "lv", "-L", "384M", VG, "/dev/mapper/a")
        fill(root, lvmap(home, f"{VG}/lv"))
        parts = args.only or PARTS
        if "throughput" in parts:
            results["throughput"] = throughput(env, root, home, maps, args)
        if "snapshot" in parts:
            results["snapshot"] = snapshot_penalty(env, home, args)
        if "metadata" in parts:
            results["metadata"] = metadata(env, root, home, maps, args.ops)
        if "backup" in parts:
            results["backup"] = backup(env, root, home)
    finally:
        subprocess.run([sys.executable, "-m", "sanvisor", "lab", "down"], env=env,
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    report(results, args.out)
    return 0


def report(results: dict[str, Any], out: Path) -> None:
    print(f"{'job':<14} {'qd':>3} {'unit':>6} {'direct':>8} {'map':>8} {'LV':>8} "
          f"{'LV/map':>7} {'LV/direct':>9}")
    for r in results.get("throughput", []):
        print(f"{r['job']:<14} {r['depth']:>3} {r['unit']:>6} {r['direct']:>8.0f} "
              f"{r['map']:>8.0f} {r['lv']:>8.0f} {r['lv'] / (r['map'] or 1):>7.2f} "
              f"{r['lv'] / (r['direct'] or 1):>9.2f}")
    print("\nwrites to the origin, one fresh snapshot vs none (goal: penalty < 50 %):")
    for r in results.get("snapshot", []):
        pen = 1 - r["snapshot"] / (r["none"] or 1)
        print(f"{r['job']:<14} {r['depth']:>3} {r['unit']:>6} chunk {r['chunk']:>3} "
              f"{r['none']:>8.0f} "
              f"{r['snapshot']:>8.0f}  penalty {pen * 100:5.1f} %")
    print("\nmetadata latency, median ms: sanvisor CLI / its agent's API / lvm2 "
          "--driverloaded n")
    for k, v in results.get("metadata", {}).items():
        print(f"{k:<9} {v['cli_ms']:>7.1f} {v['api_ms']:>7.1f} {v['lvm2_ms']:>7.1f}  "
              f"(API/lvm2 {v['api_ms'] / v['lvm2_ms']:.2f})")
    b = results.get("backup")
    if b:
        print(f"\nbackup of a running guest's 1 GiB LV: {b['backup_mib_s']:.0f} MiB/s "
              f"({b['backup_s']:.2f} s); dd of its block device: {b['dd_mib_s']:.0f} MiB/s "
              f"({b['dd_s']:.2f} s); ratio {b['backup_mib_s'] / b['dd_mib_s']:.2f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    raise SystemExit(main())
