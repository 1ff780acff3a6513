"""Leases on the shared storage itself: sanlock's delta lease, in the sectors of each PV
that LVM2 leaves unused (4-7: after the label sectors, before the first metadata area
at 4 KiB).

Sector 4 is the lease: its owner (host, a random nonce per acquisition), a generation
and a renewal counter, and the owner's I/O timeout T, so that every host judges its
expiry alike. Sector 5 is a request: a host waiting for the lease asks the owner to
let it go. To change a VG a host holds the leases of all its PVs (vgcreate and the
other commands that touch PVs outside a VG: of every PV it sees).

- **Acquire** (Chockler and Malkhi's light-weight lease; sanlock's delta lease): read;
  if another host's record is there and has changed within 8T (its T), wait; else
  write our record, wait 2T (any host that read the old record has written by then),
  read again: still ours, we own it; another's, we lost the race and back off.
- **Renew** every T: read (still ours?), write the counter + 1.
- **Expire**: a record unchanged for 8T is free. A host that stops renewing (killed,
  frozen, cut off from the storage) loses its lease after that bounded time.
- **Stop writing**: a host writes metadata only while its last successful renewal
  began less than 6T ago, so that each write lands (within T) before any other host
  can take the lease; otherwise the write is refused (LeaseError).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sanvisor.errors import LeaseError, VolumeIOError
from sanvisor.storage.lvm.blockdev import BlockDevice
from sanvisor.storage.lvm.ondisk import SECTOR, PvLabel

log = logging.getLogger("sanvisor.volumes.lease")
LEASE_OFFSET = 4 * SECTOR
_LEASE = struct.Struct("<8sIIQQQ64s")
_REQUEST = struct.Struct("<8sQQ64s")
LEASE_MAGIC = b"SVLEASE1"
REQUEST_MAGIC = b"SVLEASER"


def lease_area_free(label: PvLabel) -> bool:
    """Sectors 4-7 are ours only if LVM keeps out of them (every lvm2 since 2.02 puts
    its first metadata area at 4 KiB; a PV with an area at 2 KiB has no lease area)."""
    starts = [m.offset for m in label.mdas] + [label.pe_start]
    return all(s >= 8 * SECTOR for s in starts) and label.sector < 4


@dataclass(frozen=True)
class Timing:
    io_timeout: float = 1.0  # T: the bound of one lease I/O

    @property
    def renew(self) -> float:
        return self.io_timeout

    @property
    def valid_for(self) -> float:  # writes only this long after a renewal began
        return 6 * self.io_timeout

    @property
    def delay(self) -> float:  # between writing our record and reading it back
        return 2 * self.io_timeout + 0.02

    @property
    def quantum(self) -> float:  # a busy holder keeps a lease asked for this long
        return 5 * self.io_timeout

    @staticmethod
    def from_env() -> Timing:
        raw = os.environ.get("SANVISOR_LEASE_IO_TIMEOUT", "").strip()
        try:
            value = float(raw) if raw else 1.0
        except ValueError:
            value = float("nan")
        if not 0.01 <= value <= 60:
            raise LeaseError(f"SANVISOR_LEASE_IO_TIMEOUT={raw!r}: seconds, 0.01 to 60")
        return Timing(value)


@dataclass
class Record:
    host: str = ""
    nonce: int = 0  # 0: free
    generation: int = 0
    counter: int = 0
    io_timeout_ms: int = 0

    def pack(self) -> bytes:
        body = _LEASE.pack(LEASE_MAGIC, 1, self.io_timeout_ms, self.nonce, self.generation,
                           self.counter, self.host.encode()[:64])
        return (body + struct.pack("<I", zlib.crc32(body))).ljust(SECTOR, b"\0")

    @staticmethod
    def unpack(raw: bytes) -> Record | None:
        """The record in a lease sector; None if the sector holds no sound record."""
        body = raw[:_LEASE.size]
        if len(raw) < _LEASE.size + 4 or body[:8] != LEASE_MAGIC:
            return None
        if struct.unpack_from("<I", raw, _LEASE.size)[0] != zlib.crc32(body):
            return None
        _m, _v, t, nonce, gen, counter, host = _LEASE.unpack(body)
        return Record(host.rstrip(b"\0").decode(errors="replace"), nonce, gen, counter, t)

    @property
    def expiry(self) -> float:
        return 8 * max(self.io_timeout_ms, 10) / 1000


def pack_request(host: str, generation: int) -> bytes:
    body = _REQUEST.pack(REQUEST_MAGIC, generation, random.getrandbits(63) + 1,
                         host.encode()[:64])
    return (body + struct.pack("<I", zlib.crc32(body))).ljust(SECTOR, b"\0")


def unpack_request(raw: bytes) -> tuple[str, int] | None:
    body = raw[:_REQUEST.size]
    if len(raw) < _REQUEST.size + 4 or body[:8] != REQUEST_MAGIC:
        return None
    if struct.unpack_from("<I", raw, _REQUEST.size)[0] != zlib.crc32(body):
        return None
    _m, gen, _n, host = _REQUEST.unpack(body)
    return host.rstrip(b"\0").decode(errors="replace"), gen


@dataclass
class _Held:
    dev: BlockDevice
    record: Record
    renewed: float  # when the last successful renewal (or the acquisition) began
    users: int = 0
    requested: bool = False  # another host asked for it
    acquired: float = 0.0


@dataclass
class _Seen:
    raw: bytes
    since: float


@dataclass
class LeaseKeeper:
    """A host's leases: taken by ``hold``, renewed by a thread, let go when another host
    asks for them (or at ``close``)."""

    host: str
    timing: Timing = field(default_factory=Timing)
    clock: Callable[[], float] = time.monotonic
    held: dict[str, _Held] = field(default_factory=dict)
    yielded: dict[str, float] = field(default_factory=dict)  # key -> stay away until
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    # ---- holding --------------------------------------------------------------------
    @contextlib.contextmanager
    def hold(self, devices: dict[str, BlockDevice], wait: float = 120.0
             ) -> Iterator[Callable[[], None]]:
        """Hold the leases of ``devices`` (key: PV uuid) for the block; yields the guard
        to call before each metadata write."""
        keys = sorted(devices)
        self._acquire({k: devices[k] for k in keys}, wait)
        try:
            yield lambda: self.check(keys)
        finally:
            self._done(keys)

    def _done(self, keys: list[str]) -> None:
        """A command is over: leases another host asked for go now, if held long
        enough (a busy holder keeps one for a quantum, so turns are not one command)."""
        gone = []
        with self._lock:
            now = self.clock()
            for k in keys:
                h = self.held.get(k)
                if h is None:
                    continue
                h.users -= 1
                if h.users == 0 and h.requested and now - h.acquired >= self.timing.quantum:
                    gone.append(self.held.pop(k))
                    self.yielded[k] = now + self.timing.delay + self.timing.io_timeout
        for h in gone:
            self._release(h)

    def check(self, keys: list[str]) -> None:
        """Raise LeaseError unless every lease of ``keys`` may still be written under."""
        now = self.clock()
        with self._lock:
            for k in keys:
                h = self.held.get(k)
                if h is None or now - h.renewed >= self.timing.valid_for:
                    raise LeaseError(f"lost the lease of {h.dev.name if h else k} (not renewed "
                                     f"for {self.timing.valid_for:g} s): nothing more written",
                                     lapsed=True)

    def _acquire(self, devices: dict[str, BlockDevice], wait: float) -> None:
        deadline = self.clock() + wait
        seen: dict[str, _Seen] = {}
        asked: dict[str, int] = {}
        while True:
            with self._lock:
                want = {k: d for k, d in devices.items() if not self._valid(k)}
                for k in devices:
                    if k not in want:
                        self.held[k].users += 1
                    else:  # not renewed lately: taken again from scratch below
                        self.held.pop(k, None)
            if not want:
                return
            got: list[str] = []
            try:
                busy = self._busy(want, seen, asked)
                if not busy:
                    got = self._try(want)
                    if len(got) == len(want):
                        return
            except VolumeIOError as exc:
                log.warning("lease I/O failed: %s", exc)
                busy = list(want)
            self._drop([k for k in devices if k not in want] + got)
            if self.clock() >= deadline:
                names = ", ".join(devices[k].name for k in (busy or list(want)))
                owners = {seen[k].raw for k in busy if k in seen}
                who = {r.host for raw in owners if (r := Record.unpack(raw))}
                raise LeaseError(f"could not take the lease of {names} within {wait:g} s"
                                 + (f" (held by {', '.join(sorted(who))})" if who else ""))
            self._stop.wait(self.timing.io_timeout / 2 if busy
                            else random.uniform(0, self.timing.delay))

    def _valid(self, key: str) -> bool:
        h = self.held.get(key)
        return h is not None and self.clock() - h.renewed < self.timing.valid_for / 2

    def _busy(self, want: dict[str, BlockDevice], seen: dict[str, _Seen],
              asked: dict[str, int]) -> list[str]:
        """The leases held by live hosts (and ask them to let go)."""
        busy = []
        now = self.clock()
        for k, dev in want.items():
            if now < self.yielded.get(k, 0.0):
                busy.append(k)  # we let it go to a host that asked: its turn first
                continue
            raw = dev.read(LEASE_OFFSET, SECTOR)
            rec = Record.unpack(raw)
            if rec is None and raw.count(0) == SECTOR:
                continue  # never used
            if rec is not None and rec.nonce == 0:
                continue  # released
            if rec is not None and rec.host == self.host and k not in self.held:
                pass  # our own from before a restart: waits for expiry like any other
            old = seen.get(k)
            if old is None or old.raw != raw:
                seen[k] = _Seen(raw, now)
            expiry = rec.expiry if rec is not None else 8 * self.timing.io_timeout
            if now - seen[k].since >= expiry:
                continue  # unchanged for its expiry: its holder stopped renewing
            busy.append(k)
            gen = rec.generation if rec is not None else 0
            if asked.get(k) != gen:
                dev.write(LEASE_OFFSET + SECTOR, pack_request(self.host, gen))
                asked[k] = gen
        return busy

    def _try(self, want: dict[str, BlockDevice]) -> list[str]:
        """One round of the delta lease: write, wait, read back. The keys won."""
        mine: dict[str, Record] = {}
        start = self.clock()
        for k, dev in want.items():
            old = Record.unpack(dev.read(LEASE_OFFSET, SECTOR)) or Record()
            rec = Record(self.host, random.getrandbits(63) + 1, old.generation + 1, 0,
                         int(self.timing.io_timeout * 1000))
            dev.write(LEASE_OFFSET, rec.pack())
            mine[k] = rec
        self._stop.wait(self.timing.delay)
        won = []
        for k, dev in want.items():
            if Record.unpack(dev.read(LEASE_OFFSET, SECTOR)) == mine[k]:
                won.append(k)
        with self._lock:
            for k in won:
                self.held[k] = _Held(want[k], mine[k], start, users=1, acquired=start)
        self._start_renewer()
        return won

    def _drop(self, keys: list[str]) -> None:
        """Let go of leases taken by a round that did not get them all."""
        for k in keys:
            with self._lock:
                h = self.held.get(k)
                if h is None:
                    continue
                h.users = max(0, h.users - 1)
                if h.users:
                    continue
                del self.held[k]
            self._release(h)

    def _release(self, h: _Held) -> None:
        with contextlib.suppress(VolumeIOError):
            if Record.unpack(h.dev.read(LEASE_OFFSET, SECTOR)) == h.record:
                free = Record(self.host, 0, h.record.generation, h.record.counter + 1,
                              h.record.io_timeout_ms)
                h.dev.write(LEASE_OFFSET, free.pack())

    # ---- renewing -------------------------------------------------------------------
    def _start_renewer(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                                name=f"lease-{self.host}")
                self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.timing.renew):
            with self._lock:
                items = list(self.held.items())
            for k, h in items:
                self.renew_one(k, h)

    def renew_one(self, key: str, h: _Held) -> None:
        start = self.clock()
        try:
            raw = h.dev.read(LEASE_OFFSET, 2 * SECTOR)
            if Record.unpack(raw[:SECTOR]) != h.record:
                with self._lock:
                    self.held.pop(key, None)
                log.warning("lease of %s taken by another host", h.dev.name)
                return
            req = unpack_request(raw[SECTOR:])
            rec = Record(h.record.host, h.record.nonce, h.record.generation,
                         h.record.counter + 1, h.record.io_timeout_ms)
            h.dev.write(LEASE_OFFSET, rec.pack())
        except VolumeIOError as exc:
            log.warning("lease of %s not renewed: %s", h.dev.name, exc)
            return
        if self.clock() - start > self.timing.io_timeout:
            return  # too slow to count as a renewal
        with self._lock:
            h.record, h.renewed = rec, start
            wanted = req is not None and req[0] != self.host and req[1] == rec.generation
            h.requested = h.requested or wanted
            if wanted and h.users == 0:
                self.held.pop(key, None)
                self.yielded[key] = self.clock() + self.timing.delay + self.timing.io_timeout
            else:
                return
        self._release(h)  # another host asked, and no command of ours uses it

    def forget(self, key: str) -> None:
        """The device is no PV any more: let its lease go and zero the lease sectors."""
        with self._lock:
            h = self.held.pop(key, None)
        if h is not None:
            with contextlib.suppress(VolumeIOError):
                if Record.unpack(h.dev.read(LEASE_OFFSET, SECTOR)) == h.record:
                    h.dev.write(LEASE_OFFSET, bytes(2 * SECTOR))

    def release_idle(self) -> None:
        with self._lock:
            idle = [(k, h) for k, h in self.held.items() if h.users == 0]
            for k, _ in idle:
                del self.held[k]
        for _, h in idle:
            self._release(h)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.release_idle()
