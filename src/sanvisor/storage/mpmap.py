"""A multipath map: one LUN, its paths, the path selector and the no-path queue.

Every request ends: completed, resent within a bound (MAX_TRIES paths), or
failed with the error the policy gives (no_path_retry). A failed path's reads
and flushes are resent at once; its writes only after the array fenced the
path's session (fence.py): until then they are held, and with no path left to
fence through they wait or fail as no_path_retry says, never resent unfenced.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import Any

from sanvisor.errors import NbdError
from sanvisor.storage import nbdproto as P
from sanvisor.storage.fence import FENCE_TIMEOUT as FENCE_TIMEOUT
from sanvisor.storage.fence import WRITES as WRITES
from sanvisor.storage.fence import DeadSession, fence
from sanvisor.storage.mpconf import Settings
from sanvisor.storage.mpview import PathView, render_ll
from sanvisor.storage.paths import Path, Request

log = logging.getLogger("sanvisor.multipath")
MAX_TRIES = 5  # a request in flight on this many failed paths fails with EIO
IO_TIMEOUT = 30.0  # seconds a request may wait for its reply on a path whose link is up


class Map:
    def __init__(self, name: str, wwid: str, dm: int, vendor: str, model: str, size: int,
                 settings: Settings) -> None:
        self.name, self.wwid, self.dm = name, wwid, dm
        self.vendor, self.model, self.size = vendor, model, size
        self.settings = settings
        self.paths: list[Path] = []
        self.queue: collections.deque[Request] = collections.deque()
        self.dead: list[DeadSession] = []  # failed sessions to fence, with held writes
        self.io_timeout = IO_TIMEOUT
        self.fence_timeout = FENCE_TIMEOUT
        self._rr = 0
        self._current: Path | None = None
        self.io_errors = 0  # requests failed back to the guest
        self.retries_exhausted = 0  # ...of which: in flight on MAX_TRIES failed paths
        self.fences = 0  # sessions fenced
        self.fence_failures = 0  # fence attempts that failed (retried)
        self._throttled = 0  # fronts whose send buffer is full
        self._fencer: asyncio.Task[None] | None = None
        self._attempt: asyncio.Future[None] | None = None  # the fence under way...
        self._fencing_via: Path | None = None  # ...through this path
        self._via_failed = False
        self._kick = asyncio.Event()
        self.closed = False

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

    @property
    def debt(self) -> bool:
        """A write was failed to the guest while its copy may still run at the array:
        nothing new reaches the array until that session is fenced."""
        return any(d.failed_back for d in self.dead)

    def submit(self, req: Request) -> None:
        if self.closed:
            self._fail(req)
            return
        path = None if self.debt else self.choose()
        if path is not None:
            path.send(req)
            return
        if not self.settings.queue_if_no_path and not any(p.ready for p in self.paths):
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

    def _resend(self, req: Request) -> None:
        if req.tries >= MAX_TRIES:
            self.retries_exhausted += 1
            log.warning("%s: a request failed on %d paths: EIO", self.name, req.tries)
            self._fail(req)
        else:
            self.submit(req)

    def path_changed(self, path: Path) -> None:
        if path.ready and self._throttled:
            path.set_reading(False)
        if not path.ready:
            if path is self._fencing_via and self._attempt is not None:
                self._via_failed = True
                self._attempt.cancel()  # fenced through a dead path: try another now
            token, redo = path.take_inflight()
            if self.closed:
                for req in redo:
                    self._fail(req)
                return
            held = [r for r in redo if r.cmd in WRITES]
            if redo:
                log.info("%s: %d request(s) of failed path %s: %d resent, %d held for the "
                         "fence of session %s", self.name, len(redo), path.scsi.dev,
                         len(redo) - len(held), len(held),
                         "?" if token is None else f"{token:016x}")
            for req in redo:
                req.tries += 1
            if held:
                if token is None:  # cannot happen: a path is ready only with an id
                    for req in held:
                        self._fail(req)
                else:
                    self.dead.append(DeadSession(token, path.scsi.dev, held))
            for req in redo:
                if req.cmd not in WRITES:
                    self._resend(req)
        if self.dead and not self.closed:
            self._kick.set()
            if self._fencer is None or self._fencer.done():
                self._fencer = asyncio.get_running_loop().create_task(
                    self._fence_loop(), name=f"fence-{self.name}")
        self._drain()

    def _drain(self) -> None:
        while self.queue and not self.debt and self.choose() is not None:
            self.submit(self.queue.popleft())

    # ---- fencing -----------------------------------------------------------------------
    async def _fence_loop(self) -> None:
        """Fence the dead sessions through any ready path, then resend their writes."""
        turn = 0
        while self.dead and not self.closed:
            ready = [p for p in self.paths if p.ready]
            if not ready:
                self._kick.clear()
                await self._kick.wait()
                continue
            via = ready[turn % len(ready)]
            batch = list(self.dead)
            self._fencing_via, self._via_failed = via, False
            self._attempt = asyncio.ensure_future(
                fence(via.hba, [d.token for d in batch], self.fence_timeout))
            try:
                await self._attempt
            except (OSError, TimeoutError, NbdError, asyncio.IncompleteReadError,
                    asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and not self._via_failed:
                    raise  # the fencer itself is cancelled (the map closes)
                self.fence_failures += 1
                turn += 1
                log.warning("%s: fencing through %s failed: %s", self.name, via.scsi.dev,
                            "the path failed" if self._via_failed
                            else str(exc) or type(exc).__name__)
                if not any(p.ready and p is not via for p in self.paths):
                    self._kick.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._kick.wait(),
                                               self.settings.polling_interval)
                continue
            finally:
                self._fencing_via = None
            self.fences += len(batch)
            log.info("%s: session(s) %s fenced through %s", self.name,
                     ", ".join(f"{d.token:016x}" for d in batch), via.scsi.dev)
            for d in batch:
                self.dead.remove(d)
            for d in batch:
                for req in d.requests:
                    self._resend(req)
            self._drain()

    def expire(self) -> None:
        """no_path_retry N: queued (and held) requests fail after N checker intervals
        without a path; `fail`: at once. Held writes fail only while no path is left to
        fence through; their session stays to fence (the map's debt)."""
        retry = self.settings.no_path_retry
        now = time.monotonic()
        limit = int(retry) * self.settings.polling_interval if retry.isdigit() else None
        if retry == "queue":
            return
        if self.queue and limit is not None:
            while self.queue and now - self.queue[0].queued_at >= limit:
                self._fail(self.queue.popleft())
        if any(p.ready for p in self.paths):
            return
        for d in self.dead:
            if d.requests and (limit is None or now - d.since >= limit):
                log.warning("%s: %d write(s) of unfenced session %016x failed (no path)",
                            self.name, len(d.requests), d.token)
                d.failed_back = True
                for req in d.requests:
                    self._fail(req)
                d.requests = []

    def check_timeouts(self, now: float) -> None:
        """A request unanswered for io_timeout on a path whose link is up fails the path
        (its requests then go elsewhere, writes after the fence)."""
        for p in self.paths:
            sent = p.oldest() if p.ready else None
            if sent is not None and now - sent > self.io_timeout:
                p.fail(f"I/O timeout: a request unanswered for {now - sent:.1f} s")

    def close(self) -> None:
        """The map goes away: whatever waits fails with EIO."""
        self.closed = True
        if self._fencer is not None:
            self._fencer.cancel()
        while self.queue:
            self._fail(self.queue.popleft())
        for d in self.dead:
            for req in d.requests:
                self._fail(req)
        self.dead.clear()

    # ---- views -------------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        held = sum(len(d.requests) for d in self.dead)
        return {"name": self.name, "wwid": self.wwid, "dm": f"dm-{self.dm}",
                "vendor": self.vendor, "model": self.model, "size": self.size,
                "policy": self.settings.path_grouping_policy,
                # waiting in the map (for a path, or held for a fence: `held`)
                "queued": len(self.queue) + held, "held": held,
                "unfenced": [f"{d.token:016x}" for d in self.dead],
                "io_errors": self.io_errors, "retries_exhausted": self.retries_exhausted,
                "fences": self.fences, "fence_failures": self.fence_failures,
                "paths": [p.view() for p in self.paths]}

    def ll(self) -> str:
        """The `multipath -ll` lines of the seed's multipath-tools."""
        return render_ll(self)

    @property
    def path_views(self) -> list[PathView]:
        return list(self.paths)

    def choose_view(self) -> PathView | None:
        if self.settings.path_grouping_policy == "multibus":
            return None
        cur = self._current
        return cur if cur is not None and cur.ready else next(
            (p for p in self.paths if p.ready), None)

