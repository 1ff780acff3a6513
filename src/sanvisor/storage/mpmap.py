"""A multipath map: one LUN, its paths, the path selector and the no-path queue."""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

from sanvisor.storage import nbdproto as P
from sanvisor.storage.mpconf import Settings
from sanvisor.storage.paths import Path, Request

log = logging.getLogger("sanvisor.multipath")


class Map:
    def __init__(self, name: str, wwid: str, dm: int, vendor: str, model: str, size: int,
                 settings: Settings) -> None:
        self.name, self.wwid, self.dm = name, wwid, dm
        self.vendor, self.model, self.size = vendor, model, size
        self.settings = settings
        self.paths: list[Path] = []
        self.queue: collections.deque[Request] = collections.deque()
        self._rr = 0
        self._current: Path | None = None
        self.io_errors = 0  # requests failed back to the guest
        self._throttled = 0  # fronts whose send buffer is full

    # ---- path selection ----------------------------------------------------------------
    def choose(self) -> Path | None:
        ready = [p for p in self.paths if p.ready]
        if not ready:
            return None
        if self.settings.path_grouping_policy == "multibus":
            self._rr = (self._rr + 1) % len(ready)  # round-robin over every ready path
            return ready[self._rr]
        cur = self._current
        if cur is not None and cur.ready and (self.settings.failback == "manual"
                                              or cur is ready[0]):
            return cur
        self._current = ready[0]  # failover: the first path group that works
        return ready[0]

    def submit(self, req: Request) -> None:
        path = self.choose()
        if path is not None:
            path.send(req)
            return
        if not self.settings.queue_if_no_path:
            self._fail(req)
            return
        req.queued_at = req.queued_at or time.monotonic()
        self.queue.append(req)

    def throttle(self, delta: int) -> None:
        """Pause reading replies from every path while a front cannot keep up."""
        before = self._throttled > 0
        self._throttled = max(0, self._throttled + delta)
        if (self._throttled > 0) != before:
            for p in self.paths:
                p.set_reading(self._throttled == 0)

    def _fail(self, req: Request) -> None:
        self.io_errors += 1
        req.reply(P.EIO, [])

    def path_changed(self, path: Path) -> None:
        if path.ready and self._throttled:
            path.set_reading(False)
        if not path.ready:
            redo = path.take_inflight()
            if redo:
                log.info("%s: resending %d request(s) of failed path %s", self.name,
                         len(redo), path.scsi.dev)
            for req in redo:
                req.tries += 1
                self.submit(req)
        while self.queue and self.choose() is not None:
            self.submit(self.queue.popleft())

    def expire(self) -> None:
        """no_path_retry N: queued requests fail after N checker intervals without a path."""
        retry = self.settings.no_path_retry
        if not self.queue or not retry.isdigit():
            return
        limit = int(retry) * self.settings.polling_interval
        now = time.monotonic()
        while self.queue and now - self.queue[0].queued_at >= limit:
            self._fail(self.queue.popleft())

    # ---- views -------------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        return {"name": self.name, "wwid": self.wwid, "dm": f"dm-{self.dm}",
                "vendor": self.vendor, "model": self.model, "size": self.size,
                "policy": self.settings.path_grouping_policy, "queued": len(self.queue),
                "io_errors": self.io_errors, "paths": [p.view() for p in self.paths]}

    def ll(self) -> str:
        """The `multipath -ll` lines of the seed's multipath-tools."""
        size = _human(self.size)
        lines = [f"{self.name} ({self.wwid}) dm-{self.dm} {self.vendor},{self.model}",
                 f"[size={size}][features={self.settings.features()}][hwhandler=0][rw]"]
        sel = self.settings.path_selector
        if self.settings.path_grouping_policy == "multibus":
            groups = [self.paths]
        else:
            groups = [[p] for p in self.paths]
        active = self.choose_view()
        for group in groups:
            state = "active" if any(p is active or (p.ready and len(group) > 1)
                                    for p in group) else "enabled"
            lines.append(f"\\_ {sel} [prio={len(group)}][{state}]")
            for p in group:
                dm_state, check = ("active", "ready") if p.ready else ("failed", "faulty")
                lines.append(f" \\_ {p.scsi.hctl} {p.scsi.dev} 8:{p.scsi.minor:<3} "
                             f"[{dm_state}][{check}]")
        return "\n".join(lines)

    def choose_view(self) -> Path | None:
        if self.settings.path_grouping_policy == "multibus":
            return None
        cur = self._current
        return cur if cur is not None and cur.ready else next(
            (p for p in self.paths if p.ready), None)


def _human(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return str(n)
