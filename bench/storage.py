"""The data path: QEMU's NBD client view of /dev/mapper/NAME (multipath -> array)
against a direct qemu-storage-daemon NBD export of the same file on a unix socket.

Runs in a lab of its own (one host, one 256 MiB LUN on two HBAs, multibus).
fio's nbd engine drives both targets with the same jobs: sequential 1 MiB and
random 4 KiB, read and write, queue depth 1 and 16. Then the I/O stall when an
HBA dies and when it comes back: the longest gap between two completed 4 KiB
writes of a closed loop, around each event.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOBS = [("seq-read-1M", "read", "1M", 1), ("seq-read-1M", "read", "1M", 16),
        ("seq-write-1M", "write", "1M", 1), ("seq-write-1M", "write", "1M", 16),
        ("rand-read-4K", "randread", "4k", 1), ("rand-read-4K", "randread", "4k", 16),
        ("rand-write-4K", "randwrite", "4k", 1), ("rand-write-4K", "randwrite", "4k", 16)]


def sv(env: dict[str, str], *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "sanvisor", *args], env=env, check=True,
                          capture_output=True, text=True).stdout


def fio(uri: str, rw: str, bs: str, depth: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
         f"--iodepth={depth}", "--size=256M", "--time_based", f"--runtime={seconds}",
         "--output-format=json"], check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]  # fio prints a line first
    side = job["read"] if "read" in rw else job["write"]
    return {"MiB/s": side["bw_bytes"] / (1 << 20), "IOPS": side["iops"]}


def stall(env: dict[str, str], sock: str, ns: str) -> dict[str, float]:
    from sanvisor.storage.nbdclient import NbdClient

    gaps: list[tuple[float, float]] = []
    stop = threading.Event()

    def loop() -> None:
        with NbdClient(sock, timeout=60) as c:
            c.go("bench")
            last = time.monotonic()
            block = os.urandom(4096)
            i = 0
            while not stop.is_set():
                c.pwrite(block, (i % 4096) * 4096)
                now = time.monotonic()
                gaps.append((now, now - last))
                last, i = now, i + 1

    t = threading.Thread(target=loop)
    t.start()
    try:
        time.sleep(1.0)  # the loop's normal pace, before the event
        t_down = time.monotonic()
        sv(env, "lab", "fault", "hba-down", "host1", "0")
        time.sleep(2.0)
        t_up = time.monotonic()
        sv(env, "lab", "fault", "hba-up", "host1", "0")
        time.sleep(2.0)
    finally:
        stop.set()
        t.join()

    def worst(a: float, b: float) -> float:
        return max((g for when, g in gaps if a <= when <= b), default=0.0)

    return {"normal_max_gap_ms": worst(0, t_down) * 1e3,
            "hba_down_max_gap_ms": worst(t_down, t_up) * 1e3,
            "hba_up_max_gap_ms": worst(t_up, time.monotonic()) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0, help="per fio job")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "storage.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/storage needs root (the lab)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="svbl", dir="/tmp"))
    shutil.rmtree(root)
    env = dict(os.environ, SANVISOR_LAB_HOME=str(root))
    qsd = None
    results: dict[str, object] = {}
    try:
        sv(env, "lab", "up", "--hosts", "1", "--name", f"b{os.getpid() % 10000}")
        lun = json.loads(sv(env, "--json", "array", "lun", "create", "bench", "--size", "256M"))
        for k in (0, 1):
            sv(env, "array", "zone", "add", "bench", f"10:00:00:00:c9:00:01:0{k}")
        sv(env, "-H", "host1", "scsi", "rescan")
        conf = root / "mp.conf"
        conf.write_text(f"defaults {{\n user_friendly_names yes\n polling_interval 1\n"
                        f" no_path_retry queue\n}}\nmultipaths {{\n multipath {{\n"
                        f"  wwid {lun['wwid']}\n  alias bench\n }}\n}}\ndevices {{\n"
                        f" device {{\n  vendor \"HITACHI\"\n  product \"DF600F\"\n"
                        f"  path_grouping_policy multibus\n }}\n}}\n")
        sv(env, "multipath", "push", str(conf))
        subprocess.run(["dd", "if=/dev/urandom", f"of={lun['backing']}", "bs=1M",
                        "count=256", "conv=notrunc"], check=True, capture_output=True)
        qsock = root / "qsd.sock"
        qsd = subprocess.Popen(
            ["qemu-storage-daemon", "--blockdev",
             f"driver=file,filename={lun['backing']},node-name=f",
             "--nbd-server", f"addr.type=unix,addr.path={qsock}",
             "--export", "type=nbd,id=e,node-name=f,name=bench,writable=on"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not qsock.exists():
            time.sleep(0.05)
        ours_uri = f"nbd+unix:///bench?socket={root}/host1/mapper/bench.sock"
        direct_uri = f"nbd+unix:///bench?socket={qsock}"
        rows = []
        for label, rw, bs, depth in JOBS:
            d = fio(direct_uri, rw, bs, depth, args.seconds)
            o = fio(ours_uri, rw, bs, depth, args.seconds)
            key = "MiB/s" if bs == "1M" else "IOPS"
            rows.append({"job": label, "depth": depth, "unit": key, "direct": d[key],
                         "multipath": o[key], "ratio": o[key] / d[key] if d[key] else 0})
        results["throughput"] = rows
        qsd.terminate()
        qsd.wait()
        qsd = None
        results["failover"] = stall(env, f"{root}/host1/mapper/bench.sock", "")
        maps = json.loads(sv(env, "-H", "host1", "--json", "multipath"))["maps"]
        results["paths"] = [{k: p[k] for k in ("hctl", "read_bytes", "written_bytes")}
                            for p in maps[0]["paths"]]
    finally:
        if qsd is not None:
            qsd.kill()
        subprocess.run([sys.executable, "-m", "sanvisor", "lab", "down"], env=env,
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'job':<16} {'qd':>3} {'unit':>6} {'direct QSD':>12} {'multipath':>12} {'ratio':>6}")
    for r in results["throughput"]:  # type: ignore[attr-defined]
        print(f"{r['job']:<16} {r['depth']:>3} {r['unit']:>6} {r['direct']:>12.0f} "
              f"{r['multipath']:>12.0f} {r['ratio']:>6.2f}")
    f = results["failover"]
    print(f"\nlongest gap between 4 KiB writes: normal {f['normal_max_gap_ms']:.1f} ms, "  # type: ignore[index]
          f"HBA down {f['hba_down_max_gap_ms']:.1f} ms, HBA up {f['hba_up_max_gap_ms']:.1f} ms")  # type: ignore[index]
    print("bytes per path:", results["paths"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
