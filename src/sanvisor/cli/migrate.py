"""`migrate [-l] DOM HOST`: the request, a progress bar while it runs, the report."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path
from typing import Any

from sanvisor.api.client import AgentClient, _ref
from sanvisor.cli import render
from sanvisor.errors import NotFoundError, SanvisorError
from sanvisor.paths import Layout


def target_ref(host: str) -> str:
    """HOST: a host of the pool (pool.json; the source's agent reaches the target's
    over the pool's network, mutual TLS: its name is sent), or an agent's home directory
    on this machine (its unix socket is sent)."""
    target = Path(host)
    if not target.is_absolute():
        from sanvisor.pool.config import PoolConfig

        PoolConfig.load().host(host)  # an unknown host is refused here, in one line
        return host
    sock = Layout(target).socket
    if not sock.exists():
        raise NotFoundError(f"migrate: no agent for host {host!r} (no {sock})", host=host)
    return str(sock)


def report_line(dom: str, host: str, info: dict[str, Any]) -> str:
    m = info.get("migration") or {}
    how = "live" if m.get("live") else "paused, moved, resumed"
    parts = [f"{dom} is now on {host} (id {info['domid']}): {how}",
             f"{m.get('total_ms', 0) / 1000:.2f} s"]
    if m.get("downtime_ms"):
        parts.append(f"downtime {m['downtime_ms']:.0f} ms")
    if m.get("passes"):
        parts.append(f"{m['passes']} pass{'es' if m['passes'] != 1 else ''}")
    if m.get("transferred_bytes"):
        parts.append(f"{m['transferred_bytes'] / (1 << 20):.0f} MiB sent")
    if m.get("postcopy"):
        parts.append("post-copy")
    return ", ".join(parts)


def run(args: argparse.Namespace, layout: Layout) -> int:
    target = target_ref(args.host)
    client = AgentClient(layout.socket)
    policy: dict[str, Any] = {}
    if args.bandwidth is not None:
        policy["bandwidth_mib_s"] = args.bandwidth
    if args.max_downtime is not None:
        policy["downtime_steps_ms"] = [args.max_downtime * k for k in (1, 2, 4, 8)]
    if args.no_postcopy:
        policy["postcopy_after_s"] = None
    if args.timeout is not None:
        policy["abort_after_s"] = args.timeout
    body = {"target": target, "live": args.live, "policy": policy or None}
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["info"] = client.verb(args.dom, "migrate", body)
        except SanvisorError as exc:
            result["error"] = exc

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    if not args.json and sys.stderr.isatty():
        _progress(client, args.dom, worker)
    worker.join()
    if "error" in result:
        raise result["error"]
    info = result["info"]
    if args.json:
        render.emit_json(info)
    else:
        print(report_line(args.dom, args.host, info))
    return 0


def _progress(client: AgentClient, dom: str, worker: threading.Thread) -> None:
    """Remaining RAM, rate and pass, as the source's agent reports them."""
    from rich.progress import BarColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.fields[detail]}"), transient=True) as bar:
        task = bar.add_task(f"migrating {dom}", total=1, detail="")
        while worker.is_alive():
            try:
                st = client.call("GET", f"/v1/domains/{_ref(dom)}/migration")
            except SanvisorError:
                st = {}
            total, left = st.get("total_bytes") or 0, st.get("remaining_bytes") or 0
            if total:
                bar.update(task, total=total, completed=max(0, total - left),
                           detail=f"{left >> 20} MiB left, {st.get('mbps', 0):.0f} Mbit/s, "
                                  f"pass {st.get('passes', 0)} ({st.get('status', '')})")
            worker.join(0.2)
