"""`sanvisor backup DOM TARGET --to FILE`: a running guest's LV copied from a snapshot
(agent/backup.py does the work; this polls its job and draws the progress bar).

The copy equals the disk at the snapshot's instant; the snapshot is removed at the
end, whatever happened. The SHA-256 of the copy is printed (and in ``--json``).
"""

from __future__ import annotations

import argparse
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from sanvisor.paths import Layout

BAR = 30  # characters of the progress bar
POLL = 0.2  # seconds between two looks at the job
TIMEOUT = 24 * 3600.0  # a backup that makes no progress for this long is given up


def add_parser(verb: Any) -> None:
    p = verb("backup", "back up a running guest's LV from a snapshot (lvcreate -s, copy, "
                       "lvremove)")
    p.add_argument("domain", metavar="DOM", help="the domain: name, id or uuid")
    p.add_argument("target", metavar="TARGET", help="its disk (sda), a phy:/dev/VG/LV disk")
    p.add_argument("--to", dest="file", required=True, metavar="FILE",
                   help="the copy: a file on the host running the domain")
    p.add_argument("-L", "--size", help="the snapshot's size: what the guest may rewrite "
                   "during the copy (default a fifth of the LV)")
    p.add_argument("-f", "--force", action="store_true", help="replace FILE if it exists")


def _bar(job: dict[str, Any]) -> str:
    total = max(int(job["total"]), 1)
    frac = min(int(job["done"]) / total, 1.0)
    full = int(frac * BAR)
    return (f"\r  [{'#' * full}{'.' * (BAR - full)}] {frac * 100:5.1f}%  "
            f"{int(job['done']) >> 20}/{total >> 20} MiB  {job['mib_s']} MiB/s")


def run(ns: argparse.Namespace, layout: Layout) -> int:
    import os

    from sanvisor.api.client import AgentClient
    from sanvisor.cli import render
    from sanvisor.errors import VolumeError, from_dict

    client = AgentClient(layout.socket, timeout=600)
    file = os.path.abspath(ns.file)
    job = client.call("POST", "/v1/backup", {"domain": ns.domain, "target": ns.target,
                                             "file": file, "size": ns.size,
                                             "force": ns.force})
    ref = job["job"]
    tty = sys.stderr.isatty() and not ns.json
    deadline, last = time.monotonic() + TIMEOUT, -1
    while job["state"] == "copying":
        if tty:
            print(_bar(job), end="", file=sys.stderr, flush=True)
        if job["done"] != last:
            deadline, last = time.monotonic() + TIMEOUT, job["done"]
        if time.monotonic() > deadline:
            raise VolumeError(f"backup {ref}: no progress for {TIMEOUT:.0f} s")
        time.sleep(POLL)  # polling the agent's job: its progress, shown as it goes
        job = client.call("GET", f"/v1/backup/{ref}")
    if tty:
        print(_bar(job), file=sys.stderr)
    if job["state"] == "failed":
        raise from_dict(job.get("error") or {"code": "volume.failed",
                                              "message": f"backup {ref} failed"})
    if ns.json:
        render.emit_json(job)
        return 0
    print(f"Backup of {job['domain']} {job['target']} ({job['lv']}) to {job['file']}: "
          f"{int(job['total']) >> 20} MiB in {job['seconds']} s ({job['mib_s']} MiB/s), "
          f"sha256 {job['sha256']}")
    if job.get("error"):  # the copy is whole, the snapshot was not removed
        print(f"  WARNING: {job['error'].get('message')}", file=sys.stderr)
    return 0
