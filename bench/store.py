"""The pool's state store on each backend: operation latency, compare-and-swap
throughput (one client, and four processes racing on one counter), how late a lease's
keys go after its time to live, and how soon a watch sees a change.

Baselines in the same run: for SQLite, a bare sqlite3 upsert with the same pragmas
(WAL, synchronous=FULL) and its commit; for etcd, a bare put through the same JSON
gateway with httpx. etcd is Debian's etcd-server, started here on free ports with a
temporary data directory (skipped if absent). Prints a table, writes JSON to
bench/results/store.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import shutil
import socket
import sqlite3
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sanvisor.errors import StoreConflictError
from sanvisor.pool.store import Store, open_store

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_etcd(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    etcd = shutil.which("etcd") or "/usr/bin/etcd"
    port, peer = free_port(), free_port()
    ep = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [etcd, "--name", "b", "--data-dir", str(tmp / "etcd"), "--listen-client-urls",
         f"http://{ep}", "--advertise-client-urls", f"http://{ep}", "--listen-peer-urls",
         f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"b=http://127.0.0.1:{peer}", "--heartbeat-interval", "10",
         "--election-timeout", "100"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    deadline = time.monotonic() + 15
    while True:
        try:
            req = urllib.request.Request(f"http://{ep}/v3/kv/range", data=b'{"key":"AA=="}')
            urllib.request.urlopen(req, timeout=1).close()
            return proc, ep
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("etcd did not start") from None
            time.sleep(0.05)  # start-up: nothing to wait on but the port


async def timed(n: int, op: Callable[[int], Awaitable[Any]]) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await op(i)
        out.append(time.perf_counter() - t0)
    return out


def stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"median_ms": statistics.median(s) * 1e3, "p99_ms": s[int(len(s) * 0.99) - 1] * 1e3,
            "per_s": len(s) / sum(s)}


async def baseline(kind: str, place: str, n: int) -> list[float]:
    if kind == "sqlite":
        db = sqlite3.connect(place + ".bare", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value TEXT)")

        async def put(i: int) -> None:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (b"bench/k", str(i)))
            db.execute("COMMIT")

        try:
            return await timed(n, put)
        finally:
            db.close()
    import httpx

    async with httpx.AsyncClient(trust_env=False) as client:
        key = base64.b64encode(b"bare/k").decode()

        async def post(i: int) -> None:
            value = base64.b64encode(str(i).encode()).decode()
            (await client.post(f"http://{place}/v3/kv/put",
                               json={"key": key, "value": value})).raise_for_status()

        return await timed(n, post)


async def expiry_lag(store: Store, runs: int) -> list[float]:
    """Seconds between a lease's TTL (1 s) running out and its key's delete event."""
    lags = []
    async with store.watch("lease/") as watch:
        for i in range(runs):
            lease = await store.grant(1)
            t0 = time.monotonic()
            await store.put(f"lease/{i}", i, lease=lease.id)
            await anext(watch)  # the put
            event = await asyncio.wait_for(anext(watch), 10)
            assert event.kind == "delete"
            lags.append(time.monotonic() - t0 - 1.0)
    return lags


async def watch_latency(store: Store, n: int) -> list[float]:
    """From a put's start to a waiting watcher (another task) having the event."""
    out = []
    seen: asyncio.Queue[float] = asyncio.Queue()
    async with store.watch("w/") as watch:

        async def watcher() -> None:
            async for _event in watch:
                seen.put_nowait(time.perf_counter())

        task = asyncio.create_task(watcher())
        try:
            for i in range(n):
                await asyncio.sleep(0.003 + 0.011 * (i % 3))  # not in step with a poll
                t0 = time.perf_counter()
                await store.put("w/k", i)
                out.append(await asyncio.wait_for(seen.get(), 10) - t0)
        finally:
            task.cancel()
    return out


def racer(url: str, times: int, barrier: Any, out: Any) -> None:
    async def main() -> None:
        retries = 0
        async with open_store(url) as store:
            await store.revision()
            barrier.wait()
            t0 = time.perf_counter()
            for _ in range(times):
                while True:
                    kv = await store.get("race")
                    try:
                        await store.cas("race", (kv.value if kv else 0) + 1,
                                        kv.mod_revision if kv else 0)
                        break
                    except StoreConflictError:
                        retries += 1
        out.put((retries, time.perf_counter() - t0))

    asyncio.run(main())


def contended(url: str, procs: int, times: int) -> dict[str, float]:
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=racer, args=(url, times, barrier, out)) for _ in range(procs)]
    for w in workers:
        w.start()
    reports = [out.get(timeout=300) for _ in workers]
    retries = sum(r for r, _ in reports)
    elapsed = max(t for _, t in reports)  # from the start line to the last one done
    for w in workers:
        w.join()
    return {"processes": procs, "increments": procs * times, "seconds": elapsed,
            "cas_per_s": procs * times / elapsed, "retries": retries}


async def measure(kind: str, url: str, place: str, n: int, expiries: int) -> dict[str, Any]:
    async with open_store(url) as store:
        await store.put("k", 0)
        rows = {
            "bare write (baseline)": stats(await baseline(kind, place, n)),
            "put": stats(await timed(n, lambda i: store.put("k", i))),
            "get": stats(await timed(n, lambda i: store.get("k"))),
        }

        async def cas(i: int) -> None:
            kv = await store.get("k")
            assert kv is not None
            await store.cas("k", i, kv.mod_revision)

        rows["get + cas"] = stats(await timed(n, cas))
        rows["reserve 3 keys"] = stats(await timed(n, lambda i: store.reserve(
            {f"names/n{i}": i, f"domains/u{i}": {}, f"macs/m{i}": i})))
        rows["watch sees a put"] = stats(await watch_latency(store, n // 2))
        lags = await expiry_lag(store, expiries)
    return {"ops": rows, "lease_expiry_lag_s": {"median": statistics.median(lags),
                                                "max": max(lags), "runs": lags}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ops", type=int, default=200, help="operations per measurement")
    ap.add_argument("--expiries", type=int, default=5, help="leases let expire")
    ap.add_argument("--racers", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "store.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="svbench", dir="/tmp"))
    results: dict[str, Any] = {}
    etcd = None
    try:
        results["sqlite"] = asyncio.run(measure(
            "sqlite", f"sqlite:{tmp / 'store.db'}", str(tmp / "store.db"), args.ops,
            args.expiries))
        results["sqlite"]["contended"] = contended(f"sqlite:{tmp / 'race.db'}", args.racers,
                                                   args.ops // args.racers)
        if shutil.which("etcd") or Path("/usr/bin/etcd").exists():
            etcd, ep = start_etcd(tmp)
            results["etcd"] = asyncio.run(measure("etcd", f"etcd://{ep}/bench/", ep, args.ops,
                                                  args.expiries))
            results["etcd"]["contended"] = contended(f"etcd://{ep}/race/", args.racers,
                                                     args.ops // args.racers)
    finally:
        if etcd is not None:
            etcd.kill()
            etcd.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{'operation':<24}" + "".join(f"{b + ' median':>15}{'p99':>9}{'/s':>8}"
                                         for b in results))
    for name in results["sqlite"]["ops"]:
        print(f"{name:<24}" + "".join(
            f"{r['ops'][name]['median_ms']:>13.2f}ms{r['ops'][name]['p99_ms']:>7.1f}ms"
            f"{r['ops'][name]['per_s']:>8.0f}" for r in results.values()))
    for b, r in results.items():
        c, lag = r["contended"], r["lease_expiry_lag_s"]
        print(f"{b}: {c['processes']} processes racing on one counter: {c['cas_per_s']:.0f} "
              f"CAS/s ({c['retries']} retries for {c['increments']}); lease keys gone "
              f"{lag['median'] * 1e3:.0f} ms after the TTL (median, max "
              f"{lag['max'] * 1e3:.0f} ms)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"ops_per_measurement": args.ops, **results}, indent=2))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
