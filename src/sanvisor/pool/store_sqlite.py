"""The embedded store: one SQLite file (WAL) that the processes of one machine share.

Every write runs in a ``BEGIN IMMEDIATE`` transaction (one writer at a time across
processes; readers go on, WAL), every read in one snapshot. A ``meta`` row holds the
store's revision, bumped once per transaction that changes something, as etcd counts.
Leases carry their deadline on CLOCK_BOOTTIME (the same clock for every process of the
machine, counting suspend) and the boot id: a lease of an earlier boot has expired (its
holder died with the machine). Expired leases are swept, their keys deleted (one
revision per lease, as etcd does), at the start of every access; a read that finds
one switches to a write. An ``events`` table keeps the last changes for watches
(polled); older history is compacted away.

Calls run on one worker thread per store, never on the event loop: a write may wait
for another process's transaction (up to ``busy_timeout``).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sanvisor.errors import (
    StoreCompactedError,
    StoreError,
    StoreLeaseExpiredError,
    StoreUnavailableError,
    UsageError,
)
from sanvisor.pool.store import (
    Compare,
    Delete,
    Event,
    KeyValue,
    Lease,
    Listing,
    Op,
    Store,
    TxnResult,
    Watch,
    decode_value,
    encode_value,
    prefix_end,
)

T = TypeVar("T")
SCHEMA_VERSION = 1
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value TEXT NOT NULL,"
    " create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL, version INTEGER NOT NULL,"
    " lease INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease != 0",
    "CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " ttl REAL NOT NULL, boot TEXT NOT NULL, expires REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS events (rev INTEGER NOT NULL, seq INTEGER NOT NULL,"
    " key BLOB NOT NULL, value TEXT, PRIMARY KEY (rev, seq)) WITHOUT ROWID",
)
_KV = "SELECT key, value, create_rev, mod_rev, version, lease FROM kv"


def _now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _kv(row: tuple[Any, ...]) -> KeyValue:
    key, value, create, mod, version, lease = row
    return KeyValue(bytes(key).decode(), decode_value(value), create, mod, version, lease)


def _range(prefix: str) -> tuple[str, tuple[bytes, ...]]:
    start = prefix.encode()
    end = prefix_end(start)
    if end == b"\0":
        return "key >= ?", (start,)
    return "key >= ? AND key < ?", (start, end)


class SqliteStore(Store):
    def __init__(self, path: str | Path, *, busy_timeout: float = 10.0,
                 poll_interval: float = 0.02, history: int = 10_000) -> None:
        self.path = Path(path)
        self.url = f"sqlite:{self.path}"
        self.busy_timeout = busy_timeout
        self.poll_interval = poll_interval
        self.history = history  # revisions of events kept for watches
        self._boot = _boot_id()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sanvisor-store")
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._wrev: int | None = None  # the revision the current change writes at
        self._seq = 0

    # ---- plumbing (every _x method runs on the worker thread) ----

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise StoreUnavailableError(f"store {self.path} is closed", path=str(self.path))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(self._guard, fn, *args))

    def _guard(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return fn(self._connect(), *args)
        except sqlite3.Error as exc:
            what = "busy (another process holds it)" if "locked" in str(exc) else str(exc)
            raise StoreUnavailableError(f"store {self.path}: {what}", path=str(self.path),
                                        cause=str(exc)) from None

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as exc:
            raise StoreUnavailableError(f"store {self.path}: {exc.strerror}",
                                        path=str(self.path)) from None
        db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?), ('revision', 1),"
                       " ('compacted', 0)", (SCHEMA_VERSION,))
            schema = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()[0]
            db.execute("COMMIT")
        except BaseException:
            db.close()
            raise
        if schema != SCHEMA_VERSION:
            db.close()
            raise StoreError(f"store {self.path} has schema {schema}, this sanvisor knows "
                             f"{SCHEMA_VERSION}", path=str(self.path))
        self._db = db
        return db

    def _meta(self, db: sqlite3.Connection, name: str) -> int:
        return int(db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()[0])

    def _expired(self, db: sqlite3.Connection) -> list[int]:
        rows = db.execute("SELECT id FROM leases WHERE expires <= ? OR boot != ?",
                          (_now(), self._boot))
        return [r[0] for r in rows]

    def _write(self, db: sqlite3.Connection, body: Callable[[], T]) -> T:
        db.execute("BEGIN IMMEDIATE")
        try:
            for lease in self._expired(db):
                self._drop_lease(db, lease)
            self._wrev = None
            result = body()
            if self._wrev is not None:
                self._compact(db, self._wrev)
            db.execute("COMMIT")
            return result
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            self._wrev = None

    def _read(self, db: sqlite3.Connection, body: Callable[[], T]) -> T:
        db.execute("BEGIN")
        try:
            if not self._expired(db):
                return body()
        finally:
            if db.in_transaction:
                db.execute("COMMIT")
        return self._write(db, body)  # a lease expired: sweep it first

    def _change(self, db: sqlite3.Connection) -> int:
        """The revision of the current change (allocated at its first write)."""
        if self._wrev is None:
            self._wrev = self._meta(db, "revision") + 1
            self._seq = 0
            db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (self._wrev,))
        self._seq += 1
        return self._wrev

    def _event(self, db: sqlite3.Connection, key: bytes, value: str | None) -> int:
        rev = self._change(db)
        db.execute("INSERT INTO events VALUES (?, ?, ?, ?)", (rev, self._seq, key, value))
        return rev

    def _compact(self, db: sqlite3.Connection, rev: int) -> None:
        keep_from = rev - self.history
        if keep_from - self._meta(db, "compacted") >= min(256, self.history):  # batches
            db.execute("DELETE FROM events WHERE rev <= ?", (keep_from,))
            db.execute("UPDATE meta SET value = ? WHERE name = 'compacted'", (keep_from,))

    def _drop_lease(self, db: sqlite3.Connection, lease: int) -> None:
        self._wrev = None  # each lease's keys go in a revision of their own
        keys = [r[0] for r in db.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key",
                                         (lease,))]
        for key in keys:
            self._event(db, key, None)
            db.execute("DELETE FROM kv WHERE key = ?", (key,))
        db.execute("DELETE FROM leases WHERE id = ?", (lease,))

    def _set(self, db: sqlite3.Connection, key: str, value: Any, lease: int) -> int:
        if lease and db.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone() is None:
            raise StoreLeaseExpiredError(f"lease {lease:x} for {key} expired or was revoked",
                                         lease=lease, key=key)
        raw, text = key.encode(), encode_value(value, key)
        old = db.execute("SELECT create_rev, version FROM kv WHERE key = ?", (raw,)).fetchone()
        rev = self._event(db, raw, text)
        create, version = (old[0], old[1] + 1) if old else (rev, 1)
        db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?, ?)",
                   (raw, text, create, rev, version, lease))
        return rev

    def _remove(self, db: sqlite3.Connection, key: str, prefix: bool) -> int:
        where, args = _range(key) if prefix else ("key = ?", (key.encode(),))
        keys = [r[0] for r in db.execute(f"SELECT key FROM kv WHERE {where} ORDER BY key", args)]
        for raw in keys:
            self._event(db, raw, None)
        db.execute(f"DELETE FROM kv WHERE {where}", args)
        return len(keys)

    def _holds(self, db: sqlite3.Connection, c: Compare) -> bool:
        row = db.execute("SELECT value, mod_rev FROM kv WHERE key = ?",
                         (c.key.encode(),)).fetchone()
        if c.kind == "absent":
            return row is None
        if c.kind == "present":
            return row is not None
        if c.kind == "revision":
            return bool((row[1] if row else 0) == c.operand)
        return bool(row is not None and row[0] == encode_value(c.operand))

    # ---- the interface ----

    async def _get(self, key: str) -> KeyValue | None:
        def get(db: sqlite3.Connection) -> KeyValue | None:
            row = db.execute(_KV + " WHERE key = ?", (key.encode(),)).fetchone()
            return None if row is None else _kv(row)

        return await self._call(lambda db: self._read(db, functools.partial(get, db)))

    async def _list(self, prefix: str) -> Listing:
        where, args = _range(prefix)

        def list_(db: sqlite3.Connection) -> Listing:
            rows = db.execute(f"{_KV} WHERE {where} ORDER BY key", args).fetchall()
            return Listing(self._meta(db, "revision"), tuple(_kv(r) for r in rows))

        return await self._call(lambda db: self._read(db, functools.partial(list_, db)))

    async def revision(self) -> int:
        return await self._call(
            lambda db: self._read(db, functools.partial(self._meta, db, "revision")))

    async def _put(self, key: str, value: Any, lease: int) -> int:
        return await self._call(
            lambda db: self._write(db, functools.partial(self._set, db, key, value, lease)))

    async def _delete(self, key: str, prefix: bool) -> int:
        return await self._call(
            lambda db: self._write(db, functools.partial(self._remove, db, key, prefix)))

    async def _txn(self, compare: Sequence[Compare], success: Sequence[Op]) -> TxnResult:
        def txn(db: sqlite3.Connection) -> TxnResult:
            if not all(self._holds(db, c) for c in compare):
                return TxnResult(False, self._meta(db, "revision"))
            for op in success:
                if isinstance(op, Delete):
                    self._remove(db, op.key, op.prefix)
                else:
                    self._set(db, op.key, op.value, op.lease)
            return TxnResult(True, self._meta(db, "revision"))

        return await self._call(lambda db: self._write(db, functools.partial(txn, db)))

    async def grant(self, ttl: float) -> Lease:
        if not ttl > 0:
            raise UsageError(f"a lease needs a positive time to live, not {ttl!r}")

        def grant(db: sqlite3.Connection) -> int:
            cur = db.execute("INSERT INTO leases (ttl, boot, expires) VALUES (?, ?, ?)",
                             (ttl, self._boot, _now() + ttl))
            return int(cur.lastrowid or 0)

        return Lease(await self._call(lambda db: self._write(db, functools.partial(grant, db))),
                     ttl)

    def _gone(self, lease: int) -> StoreLeaseExpiredError:
        return StoreLeaseExpiredError(f"lease {lease:x} expired or was revoked", lease=lease)

    async def keepalive(self, lease: int) -> float:
        def renew(db: sqlite3.Connection) -> float:
            row = db.execute("SELECT ttl FROM leases WHERE id = ?", (lease,)).fetchone()
            if row is None:
                raise self._gone(lease)
            db.execute("UPDATE leases SET expires = ? WHERE id = ?", (_now() + row[0], lease))
            return float(row[0])

        return await self._call(lambda db: self._write(db, functools.partial(renew, db)))

    async def revoke(self, lease: int) -> None:
        def revoke(db: sqlite3.Connection) -> None:
            if db.execute("SELECT 1 FROM leases WHERE id = ?", (lease,)).fetchone() is None:
                raise self._gone(lease)
            self._drop_lease(db, lease)

        await self._call(lambda db: self._write(db, functools.partial(revoke, db)))

    async def time_to_live(self, lease: int) -> float | None:
        def ttl(db: sqlite3.Connection) -> float | None:
            row = db.execute("SELECT expires FROM leases WHERE id = ?", (lease,)).fetchone()
            return None if row is None else max(0.0, row[0] - _now())

        return await self._call(lambda db: self._read(db, functools.partial(ttl, db)))

    def watch(self, prefix: str, *, start_revision: int | None = None) -> Watch:
        return _SqliteWatch(self, prefix, start_revision)

    def _events(self, db: sqlite3.Connection, prefix: str, first: int) -> tuple[list[Event],
                                                                               int]:
        """The events under ``prefix`` from revision ``first`` on, and the revision read."""
        if first <= self._meta(db, "compacted"):
            raise StoreCompactedError(f"store {self.path}: the history before revision "
                                      f"{self._meta(db, 'compacted') + 1} is compacted; "
                                      f"{first} was asked", revision=first)
        last = self._meta(db, "revision")
        where, args = _range(prefix)
        rows = db.execute(f"SELECT rev, key, value FROM events WHERE rev >= ? AND {where}"
                          " ORDER BY rev, seq", (first, *args)).fetchall()
        return [Event("delete" if v is None else "put", bytes(k).decode(),
                      None if v is None else decode_value(v), rev) for rev, k, v in rows], last

    async def _poll(self, prefix: str, first: int) -> tuple[list[Event], int]:
        return await self._call(
            lambda db: self._read(db, functools.partial(self._events, db, prefix, first)))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def shut() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._pool, shut)
        self._pool.shutdown(wait=True)


class _SqliteWatch(Watch):
    def __init__(self, store: SqliteStore, prefix: str, start: int | None) -> None:
        self.store = store
        self.prefix = prefix
        self._next = start
        self._ready: collections.deque[Event] = collections.deque()
        self._closed = False

    async def start(self) -> None:
        if self._next is None:
            self._next = await self.store.revision() + 1

    async def __anext__(self) -> Event:
        if self._next is None:
            await self.start()
        assert self._next is not None
        store = self.store
        while not self._ready:
            if self._closed:
                raise StopAsyncIteration
            events, last = await store._poll(self.prefix, self._next)
            self._ready.extend(events)
            self._next = last + 1
            if not events:
                await asyncio.sleep(store.poll_interval)
        return self._ready.popleft()

    async def close(self) -> None:
        self._closed = True
