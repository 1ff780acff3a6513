"""`backup DOM TARGET --to FILE`: a running guest's LV backed up from a frozen image,
the seed's second use of snapshots.

1. The disk TARGET of domain DOM must be an LV served here (``phy:/dev/VG/LV``).
2. A snapshot of it is made (``lvcreate -s``: the engine starts copying the origin's
   old chunks before the guest overwrites them); its size is ``--size`` (default a
   fifth of the LV: what the guest may rewrite during the copy).
3. The snapshot is copied to FILE (written as FILE.part, created anew, then renamed),
   its SHA-256 computed on the way; the progress is the job's, polled by the CLI.
4. The snapshot is removed, whatever happened. A snapshot that filled up during the
   copy was invalidated by the engine: the backup fails and says how to retry.

The copy equals the disk at the snapshot's instant, however the guest writes meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sanvisor.errors import (
    ConflictError,
    NotFoundError,
    SanvisorError,
    UsageError,
    VolumeError,
    VolumeIOError,
)
from sanvisor.storage import nbdproto as P
from sanvisor.storage.lvserve import dm_name
from sanvisor.storage.nbdclient import NbdClient

if TYPE_CHECKING:
    from sanvisor.agent.volume_service import VolumeService

log = logging.getLogger("sanvisor.volumes")
BLOCK = 1 << 20  # bytes per read
DEPTH = 8  # reads in flight


@dataclass
class Job:
    domain: str
    target: str
    lv: str  # VG/LV
    snapshot: str  # VG/SNAP
    file: str
    total: int
    done: int = 0
    state: str = "copying"  # copying | done | failed
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    sha256: str = ""
    error: dict[str, Any] | None = None

    def view(self) -> dict[str, Any]:
        elapsed = self.seconds or time.monotonic() - self.started
        return {"domain": self.domain, "target": self.target, "lv": self.lv,
                "snapshot": self.snapshot, "file": self.file, "state": self.state,
                "total": self.total, "done": self.done, "seconds": round(elapsed, 3),
                "mib_s": round(self.done / (1 << 20) / elapsed, 1) if elapsed > 0 else 0.0,
                "sha256": self.sha256, "error": self.error}


class Backups:
    def __init__(self, volumes: VolumeService) -> None:
        self.volumes = volumes
        self.jobs: dict[str, Job] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def job(self, ref: str) -> Job:
        if ref not in self.jobs:
            raise NotFoundError(f"no backup {ref!r} on this host", backup=ref)
        return self.jobs[ref]

    async def start(self, domain: str, target: str, file: str, size: str | None = None,
                    force: bool = False) -> dict[str, Any]:
        """Check, make the snapshot, start the copy; the job's view (its id: DOM:TARGET)."""
        serving = self.volumes.serving
        if serving.table is None or serving.server is None:
            raise VolumeError("backup: this agent serves no LVs")
        dom = serving.table.find(domain)
        disk = next((d for d in dom.record.spec.disks if d.target == target), None)
        if disk is None:
            raise NotFoundError(f"domain {dom.name} has no disk {target} (its disks: "
                                f"{', '.join(d.target for d in dom.record.spec.disks)})",
                                domain=dom.name, target=target)
        name = serving.server.name_of(disk.path) if disk.path else None
        lv = serving.server.served(name) if name else None
        if lv is None or lv.kind == "snapshot":
            raise VolumeError(f"backup: disk {target} of {dom.name} is {disk.path or 'empty'}, "
                              "not an LV active on this host (phy:/dev/VG/LV)")
        path = Path(file)
        if not path.is_absolute() or not path.parent.is_dir():
            raise UsageError(f"backup: --to {file}: an absolute path in an existing directory "
                             "of the host")
        if path.exists() and not force:
            raise ConflictError(f"backup: {file} exists (--force replaces it)", file=file)
        ref = f"{dom.name}:{target}"
        if ref in self.jobs and self.jobs[ref].state == "copying":
            raise ConflictError(f"a backup of {dom.name} {target} is already running", job=ref)
        snap = await self._snapshot(lv.vg, lv.lv, lv.size, size)
        job = Job(dom.name, target, f"{lv.vg}/{lv.lv}", f"{lv.vg}/{snap}", file, lv.size)
        self.jobs[ref] = job
        task = asyncio.create_task(self._run(job, dm_name(lv.vg, snap)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        log.info("backup of %s %s (%s) to %s: snapshot %s", dom.name, target, job.lv, file, snap)
        return {"job": ref, **job.view()}

    async def _snapshot(self, vg: str, lv: str, lv_size: int, size: str | None) -> str:
        rows = (await self.volumes.run("lvs", {"select": [vg]}))["rows"]
        taken = {str(r["lv_name"]).strip("[]") for r in rows}
        snap = next(n for i in range(len(taken) + 1)
                    if (n := f"{lv}-backup{i or ''}") not in taken)
        amount = size or f"{max(lv_size // 5, 1)}b"
        await self.volumes.run("lvcreate", {"snapshot": True, "vg": f"{vg}/{lv}", "name": snap,
                                            "size": amount})
        return snap

    async def _run(self, job: Job, device: str) -> None:
        sock = self.volumes.home / "mapper" / f"{device}.sock"
        try:
            job.sha256 = await asyncio.to_thread(_copy, job, sock, device)
            self._check_valid(job)
            job.state = "done"
        except Exception as exc:  # a job's failure is its result
            job.state = "failed"
            err = exc if isinstance(exc, SanvisorError) else VolumeIOError(
                f"backup of {job.lv}: {type(exc).__name__}: {exc}")
            job.error = err.to_dict()
            log.warning("backup of %s %s failed: %s", job.domain, job.target, err)
            with contextlib.suppress(OSError):
                os.unlink(job.file + ".part")
        finally:
            job.seconds = time.monotonic() - job.started
            try:
                await self.volumes.run("lvremove", {"lvs": [job.snapshot], "force": True})
            except SanvisorError as exc:
                log.warning("backup: snapshot %s not removed: %s", job.snapshot, exc)
                if job.state == "done":
                    job.error = VolumeError(f"the copy is whole, but its snapshot "
                                            f"{job.snapshot} was not removed: {exc}").to_dict()

    def _check_valid(self, job: Job) -> None:
        stats = self.volumes.serving.device_stats()
        st = stats.get(f"store:{job.snapshot}")
        if st is not None and st.get("state") == "invalid":
            raise VolumeError(f"backup of {job.lv}: its snapshot filled up during the copy "
                              f"({st.get('reason')}): the guest rewrote more than the snapshot "
                              "holds; give a larger --size", lv=job.lv)


def _copy(job: Job, sock: Path, export: str) -> str:
    """The snapshot's bytes to job.file (.part, then renamed); their SHA-256."""
    digest = hashlib.sha256()
    part = job.file + ".part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with NbdClient(str(sock), timeout=60) as c:
            c.go(export)
            if c.size != job.total:
                raise VolumeError(f"backup: the snapshot is {c.size} bytes, its origin "
                                  f"{job.total}")
            pending: dict[int, int] = {}  # cookie -> offset
            got: dict[int, bytes] = {}
            sent = written = 0
            while written < job.total:
                while sent < job.total and len(pending) < DEPTH:
                    n = min(BLOCK, job.total - sent)
                    pending[c.send(P.CMD_READ, sent, n)] = sent
                    sent += n
                cookie, err, data = c.receive()
                at = pending.pop(cookie)
                if err:
                    raise VolumeIOError(f"backup: reading the snapshot at {at}: error {err} "
                                        "(the snapshot may have filled up)", offset=at)
                got[at] = data
                while written in got:
                    data = got.pop(written)
                    digest.update(data)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    written += len(data)
                    job.done = written
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(part, job.file)
    return digest.hexdigest()
