"""The data path: QEMU's NBD client view of /dev/mapper/NAME (multipath -> array),
through the engine, against a direct qemu-storage-daemon NBD export of the same
file on a unix socket.

Runs in a lab of its own (one host, one 256 MiB LUN on two HBAs, multibus).
fio's nbd engine drives every target with the same jobs: sequential 1 MiB and
random 4 KiB, read and write, queue depth 1 and 16. Beside them, in the same
run: the array itself over one fabric (fio straight to its TCP port: the ceiling
any host-side path has, since the lab's array is a Python process), and
qemu-storage-daemon as a proxy (its NBD client to the array, one path, re-exported
on a unix socket: the engine candidate that has no multipath). CPU seconds per
GiB moved are those of the data-path process (the engine or QSD), and of the
array. Then the I/O stall when an HBA dies and when it comes back: the longest
gap between two completed 4 KiB writes of a closed loop, around each event.
Last, a map as a kernel block device (QSD's FUSE export of the engine's socket,
plus a loop device), with fio's libaio engine.
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
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
JOBS = [("seq-read-1M", "read", "1M", 1), ("seq-read-1M", "read", "1M", 16),
        ("seq-write-1M", "write", "1M", 1), ("seq-write-1M", "write", "1M", 16),
        ("rand-read-4K", "randread", "4k", 1), ("rand-read-4K", "randread", "4k", 16),
        ("rand-write-4K", "randwrite", "4k", 1), ("rand-write-4K", "randwrite", "4k", 16)]
TICK = os.sysconf("SC_CLK_TCK")


def sv(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "sanvisor", *args], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"sanvisor {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def cpu(pid: int) -> float:
    """CPU seconds (user + system) used by a process so far; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def fio(target: str, rw: str, bs: str, depth: int, seconds: float,
        netns: str = "") -> dict[str, float]:
    """One fio job; target: an NBD URI, or a block device (libaio, O_DIRECT)."""
    dev = target.startswith("/dev/")
    cmd = ["fio", "--name=b", f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}",
           "--size=256M", "--time_based", f"--runtime={seconds}", "--output-format=json"]
    cmd += ([f"--filename={target}", "--ioengine=libaio", "--direct=1"] if dev
            else ["--ioengine=nbd", f"--uri={target}"])
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]  # fio prints a line first
    side = job["read"] if "read" in rw else job["write"]
    return {"MiB/s": side["bw_bytes"] / (1 << 20), "IOPS": side["iops"],
            "bytes": float(side["io_bytes"])}


def measure(target: str, pids: list[int], job: tuple[str, str, str, int], seconds: float,
            runs: int, netns: str = "") -> dict[str, float]:
    """The median of ``runs`` fio runs, and CPU seconds per GiB of each process."""
    _label, rw, bs, depth = job
    key = "MiB/s" if bs == "1M" else "IOPS"
    values, moved = [], 0.0
    before = [cpu(p) for p in pids]
    for _ in range(runs):
        r = fio(target, rw, bs, depth, seconds, netns)
        values.append(r[key])
        moved += r["bytes"]
    gib = moved / (1 << 30) or 1.0
    used = [cpu(p) - b for p, b in zip(pids, before, strict=True)]
    return {"value": statistics.median(values),
            **{f"cpu{i}": u / gib for i, u in enumerate(used)}}


def stall(env: dict[str, str], sock: str, name: str, writers: int = 4) -> dict[str, float]:
    """The longest gap between two completed 4 KiB writes of any of ``writers`` closed
    loops (each its own connection, so that writes are in flight on the path that dies
    and must wait for its fence), around an HBA's death and return."""
    from sanvisor.storage.nbdclient import NbdClient

    gaps: list[tuple[float, float]] = []
    errors: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def loop(k: int) -> None:
        with NbdClient(sock, timeout=60) as c:
            c.go(name)
            last = time.monotonic()
            block = os.urandom(4096)
            i = 0
            while not stop.is_set():
                try:
                    c.pwrite(block, ((i * writers + k) % 4096) * 4096)
                except Exception as exc:  # an error the guest would see: counted
                    errors.append(str(exc))
                    return
                now = time.monotonic()
                with lock:
                    gaps.append((now, now - last))
                last, i = now, i + 1

    threads = [threading.Thread(target=loop, args=(k,)) for k in range(writers)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)  # the loops' normal pace, before the event
        t_down = time.monotonic()
        sv(env, "lab", "fault", "hba-down", "host1", "0")
        time.sleep(2.0)
        t_up = time.monotonic()
        sv(env, "lab", "fault", "hba-up", "host1", "0")
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join()

    def worst(a: float, b: float) -> float:
        return max((g for when, g in gaps if a <= when <= b), default=0.0)

    return {"normal_max_gap_ms": worst(0, t_down) * 1e3,
            "hba_down_max_gap_ms": worst(t_down, t_up) * 1e3,
            "hba_up_max_gap_ms": worst(t_up, time.monotonic()) * 1e3,
            "errors": float(len(errors))}


def paths_ready(env: dict[str, str]) -> None:
    """Wait until every path of every map of host1 is ready."""
    deadline = time.monotonic() + 30
    while True:
        view = json.loads(sv(env, "-H", "host1", "--json", "multipath"))
        if view["maps"] and all(p["state"] == "ready" for m in view["maps"]
                                for p in m["paths"]):
            return
        assert time.monotonic() < deadline, "the map's paths did not come up"
        time.sleep(0.1)


def start_qsd(args: list[str], sock: Path, netns: str = "") -> subprocess.Popen[bytes]:
    cmd = ["qemu-storage-daemon", *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "QSD did not start"
        time.sleep(0.02)
    return proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0, help="per fio job")
    ap.add_argument("--runs", type=int, default=1, help="fio runs per cell (the median)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "storage.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/storage needs root (the lab)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="svbl", dir="/tmp"))
    shutil.rmtree(root)
    env = dict(os.environ, SANVISOR_LAB_HOME=str(root))
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[str, Any] = {"seconds": args.seconds, "runs": args.runs}
    try:
        sv(env, "lab", "up", "--hosts", "1", "--name", f"b{os.getpid() % 10000}")
        lab = json.loads((root / "lab.json").read_text())
        host = lab["hosts"][0]
        netns, home = host["netns"], Path(host["home"])
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
        array_pid = int((root / "array" / "array.pid").read_text())
        qsock, psock = root / "qsd.sock", root / "proxy.sock"
        qsd = start_qsd(["--blockdev", f"driver=file,filename={lun['backing']},node-name=f",
                         "--nbd-server", f"addr.type=unix,addr.path={qsock}",
                         "--export", "type=nbd,id=e,node-name=f,name=bench,writable=on"], qsock)
        procs.append(qsd)
        target = host["hbas"][0]["target"]
        t_host, t_port = target.rsplit(":", 1)
        proxy = start_qsd(["--blockdev", f"driver=nbd,node-name=n,server.type=inet,"
                           f"server.host={t_host},server.port={t_port},export={lun['wwid']}",
                           "--nbd-server", f"addr.type=unix,addr.path={psock}",
                           "--export", "type=nbd,id=e,node-name=n,name=bench,writable=on"],
                          psock, netns)
        procs.append(proxy)
        map_uri = f"nbd+unix:///bench?socket={home}/mapper/bench.sock"
        direct = f"nbd+unix:///bench?socket={qsock}"
        array_uri = f"nbd://{target}/{lun['wwid']}"
        paths_ready(env)
        engine_pid = int((home / "engine" / "engine.pid").read_text())
        rows: list[dict[str, Any]] = []
        for job in JOBS:
            m = {"direct": measure(direct, [qsd.pid, array_pid], job, args.seconds, args.runs),
                 "engine": measure(map_uri, [engine_pid, array_pid], job, args.seconds,
                                   args.runs),
                 "array": measure(array_uri, [array_pid, array_pid], job, args.seconds,
                                  args.runs, netns),
                 "qsd_proxy": measure(f"nbd+unix:///bench?socket={psock}",
                                      [proxy.pid, array_pid], job, args.seconds, args.runs)}
            rows.append({"job": job[0], "depth": job[3],
                         "unit": "MiB/s" if job[2] == "1M" else "IOPS", **m})
        results["failover_engine"] = stall(env, f"{home}/mapper/bench.sock", "bench")
        results["blockdev"] = blockdev(home / "mapper" / "bench.sock", root, args)
        results["throughput"] = rows
    finally:
        for p in procs:
            p.kill()
            p.wait()
        subprocess.run([sys.executable, "-m", "sanvisor", "lab", "down"], env=env,
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
    report(results, args.out)
    return 0


def blockdev(sock: Path, root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The map as a kernel block device: QSD's FUSE export of its socket + losetup."""
    from sanvisor.storage.hostdev import HostDevice

    rows = []
    with HostDevice(sock, "bench", root / "hostdev") as dev:
        for job in JOBS:
            r = measure(str(dev.device), [dev.pid], job, args.seconds, args.runs)
            rows.append({"job": job[0], "depth": job[3],
                         "unit": "MiB/s" if job[2] == "1M" else "IOPS", **r})
    return rows


def report(results: dict[str, Any], out: Path) -> None:
    def ratio(row: dict[str, Any], key: str, base: str = "direct") -> str:
        d = row[base]["value"]
        return f"{row[key]['value']:>9.0f} {row[key]['value'] / d if d else 0:>5.2f}"

    print(f"{'job':<14} {'qd':>3} {'unit':>6} {'direct':>8} {'engine':>9} {'ratio':>5} "
          f"{'array':>9} {'ratio':>5} {'qsdproxy':>9} {'ratio':>5}")
    for r in results["throughput"]:
        print(f"{r['job']:<14} {r['depth']:>3} {r['unit']:>6} {r['direct']['value']:>8.0f} "
              f"{ratio(r, 'engine')} {ratio(r, 'array')} {ratio(r, 'qsd_proxy')}")
    print("\nCPU seconds per GiB moved (data-path process / the array):")
    print(f"{'job':<14} {'qd':>3} {'QSD':>7} {'engine':>15} {'QSD proxy':>15}")
    for r in results["throughput"]:
        print(f"{r['job']:<14} {r['depth']:>3} {r['direct']['cpu0']:>7.2f} "
              f"{r['engine']['cpu0']:>7.2f}/{r['engine']['cpu1']:<7.2f} "
              f"{r['qsd_proxy']['cpu0']:>7.2f}/{r['qsd_proxy']['cpu1']:<7.2f}")
    f = results["failover_engine"]
    print(f"\nengine: longest gap between 4 KiB writes: normal "
          f"{f['normal_max_gap_ms']:.1f} ms, HBA down {f['hba_down_max_gap_ms']:.1f} ms, "
          f"HBA up {f['hba_up_max_gap_ms']:.1f} ms, errors {f['errors']:.0f}", end="")
    print("\n\nthe engine's map as a block device (FUSE + loop, fio libaio O_DIRECT):")
    for r, t in zip(results["blockdev"], results["throughput"], strict=True):
        d = t["direct"]["value"]
        print(f"{r['job']:<14} {r['depth']:>3} {r['unit']:>6} {r['value']:>9.0f} "
              f"({r['value'] / d if d else 0:.2f} of direct NBD)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    raise SystemExit(main())
