"""The pool's state store: a small key-value store with revisions, transactions,
watches and leases (docs/store.md).

Keys are plain paths (``domains/<uuid>``, ``owners/<uuid>``, ``names/<name>``...),
values JSON. Every change gets the store's next **revision** (one per transaction, as
etcd counts them); each key remembers the revision that created it and the one that
last changed it. A **transaction** applies a list of puts and deletes only if every
comparison holds (a key absent, present, at a revision, holding a value): several keys
change atomically or none does. A **lease** is granted for a time to live and kept
alive by its holder; keys attached to it vanish when it expires or is revoked.

Two backends behind one interface, chosen by URL (:func:`open_store`):
``sqlite:PATH`` (the default, one file in the pool home, shared by the processes of
one machine) and ``etcd://HOST:PORT[,HOST:PORT][/NAMESPACE]`` (a pool that spans
machines). The same tests run against both (tests/store).
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from sanvisor import where
from sanvisor.errors import StoreConflictError, UsageError

#: What one transaction may hold (etcd's default --max-txn-ops); both backends refuse more.
MAX_TXN_OPS = 128
MAX_KEY_LENGTH = 512
DEFAULT_STORE_FILE = "store.db"
DEFAULT_ETCD_NAMESPACE = "sanvisor/"


@dataclass(frozen=True)
class KeyValue:
    """A key as the store holds it: its value and revisions (0 = never set)."""

    key: str
    value: Any
    create_revision: int  # the revision that created the key (the last time it was absent)
    mod_revision: int  # the revision of its last change
    version: int  # how many times it was set since it was created
    lease: int = 0  # the lease it is attached to (0: none)


@dataclass(frozen=True)
class Event:
    """A change seen by a watch: a put (its new value) or a delete (value None)."""

    kind: Literal["put", "delete"]
    key: str
    value: Any
    revision: int


@dataclass(frozen=True)
class Listing:
    """The keys under a prefix, in key order (bytewise), at one revision of the store."""

    revision: int
    items: tuple[KeyValue, ...]

    def __iter__(self) -> Iterator[KeyValue]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def values(self) -> dict[str, Any]:
        return {kv.key: kv.value for kv in self.items}


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction; build it with :func:`absent`, :func:`present`,
    :func:`at_revision` or :func:`has_value`."""

    key: str
    kind: Literal["absent", "present", "revision", "value"]
    operand: Any = None


def absent(key: str) -> Compare:
    return Compare(key, "absent")


def present(key: str) -> Compare:
    return Compare(key, "present")


def at_revision(key: str, revision: int) -> Compare:
    """The key was last changed at ``revision`` (0: the key is absent)."""
    return Compare(key, "revision", int(revision))


def has_value(key: str, value: Any) -> Compare:
    """The key holds ``value`` (false if it is absent)."""
    return Compare(key, "value", value)


@dataclass(frozen=True)
class Put:
    key: str
    value: Any
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False  # every key that starts with ``key``


Op = Put | Delete


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int  # the store's revision after the transaction (that of its writes)


@dataclass(frozen=True)
class Lease:
    id: int
    ttl: float  # seconds, as granted (etcd rounds up to whole seconds, minimum 1)


# ---- encoding and checks, shared by the backends ---------------------------------------

def encode_value(value: Any, key: str = "") -> str:
    """The one JSON text of a value (keys sorted, compact): equal values, equal text,
    so that a value comparison means the same on both backends."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"the value of {key or 'a key'} is not JSON: {exc}", key=key) from None


def decode_value(text: str | bytes) -> Any:
    return json.loads(text)


def check_key(key: str, *, prefix: bool = False) -> str:
    """A key is a plain path: printable text, not empty (a prefix may be), bounded."""
    what = "prefix" if prefix else "key"
    if not isinstance(key, str):
        raise UsageError(f"a store {what} must be text, not {type(key).__name__}")
    if (not key and not prefix) or len(key) > MAX_KEY_LENGTH:
        raise UsageError(f"store {what} {key!r}: must be 1 to {MAX_KEY_LENGTH} characters",
                         key=key)
    if any(c < " " or c == "\x7f" for c in key):
        raise UsageError(f"store {what} {key!r}: control characters are not allowed", key=key)
    return key


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with ``prefix`` (etcd's range_end);
    b"\\0" means "to the end of the keyspace"."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def check_txn(compare: Sequence[Compare], ops: Sequence[Op]) -> None:
    """What etcd refuses in a transaction, refused alike on both backends: too many
    operations, and two operations on one key (a prefix delete covers its keys)."""
    if len(compare) + len(ops) > MAX_TXN_OPS:
        raise UsageError(f"a store transaction holds at most {MAX_TXN_OPS} comparisons and "
                         f"operations, not {len(compare) + len(ops)}")
    for c in compare:
        check_key(c.key)
        if c.kind == "value":
            encode_value(c.operand, c.key)
    seen: list[tuple[str, bool]] = []
    for op in ops:
        check_key(op.key, prefix=isinstance(op, Delete) and op.prefix)
        if isinstance(op, Put):
            encode_value(op.value, op.key)
        wide = isinstance(op, Delete) and op.prefix
        for key, other_wide in seen:
            if (key == op.key or (wide and key.startswith(op.key))
                    or (other_wide and op.key.startswith(key))):
                raise UsageError(f"store transaction: {op.key!r} is written twice",
                                 key=op.key)
        seen.append((op.key, wide))


# ---- the interface ---------------------------------------------------------------------

class Watch(abc.ABC, AsyncIterator[Event]):
    """The changes under a prefix, in revision order, from the moment the watch is
    entered (or from ``start_revision``)::

        async with store.watch("owners/") as changes:
            async for event in changes: ...
    """

    async def __aenter__(self) -> Watch:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def __aiter__(self) -> Watch:
        return self

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin watching (events from now on, or from the start revision)."""

    @abc.abstractmethod
    async def __anext__(self) -> Event: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class Store(abc.ABC):
    """The pool's state store. Every method may raise StoreUnavailableError; a write
    that raised it may or may not have happened (read before retrying)."""

    url: str

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- keys --
    async def get(self, key: str) -> KeyValue | None:
        return await self._get(check_key(key))

    async def list(self, prefix: str) -> Listing:
        """Every key that starts with ``prefix`` ("" for all), and the revision read."""
        return await self._list(check_key(prefix, prefix=True))

    async def put(self, key: str, value: Any, *, lease: int = 0) -> int:
        """Set ``key`` (attached to ``lease`` if not 0); returns the revision written.
        StoreLeaseExpiredError if the lease is gone."""
        check_txn((), [Put(key, value, lease)])
        return await self._put(key, value, lease)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it): how many were deleted."""
        return await self._delete(check_key(key, prefix=prefix), prefix)

    async def txn(self, compare: Sequence[Compare], success: Sequence[Op]) -> TxnResult:
        """Apply ``success`` if every comparison holds, atomically; else change nothing.
        StoreLeaseExpiredError if a put names a lease that is gone."""
        check_txn(compare, success)
        return await self._txn(compare, success)

    @abc.abstractmethod
    async def revision(self) -> int:
        """The store's current revision."""

    # -- leases --
    @abc.abstractmethod
    async def grant(self, ttl: float) -> Lease:
        """A new lease that expires ``ttl`` seconds from now unless kept alive."""

    @abc.abstractmethod
    async def keepalive(self, lease: int) -> float:
        """Renew a lease for its full time to live (returned); StoreLeaseExpiredError
        if it is gone."""

    @abc.abstractmethod
    async def revoke(self, lease: int) -> None:
        """End a lease now, deleting its keys; StoreLeaseExpiredError if it is gone."""

    @abc.abstractmethod
    async def time_to_live(self, lease: int) -> float | None:
        """Seconds left on a lease, None if it is gone."""

    # -- changes --
    @abc.abstractmethod
    def watch(self, prefix: str, *, start_revision: int | None = None) -> Watch:
        """The changes under ``prefix`` (use it with ``async with``). A start revision the
        store no longer keeps history for raises StoreCompactedError."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    # -- built on the above --
    async def reserve(self, items: Mapping[str, Any], *, lease: int = 0) -> int:
        """Create every key of ``items`` or none (each must be absent): the way to take a
        name, a uuid and MACs pool-wide at once. StoreConflictError names the keys taken."""
        keys = list(items)
        result = await self.txn([absent(k) for k in keys],
                                [Put(k, v, lease) for k, v in items.items()])
        if result.succeeded:
            return result.revision
        taken = [k for k in keys if await self.get(k) is not None]
        raise StoreConflictError(f"already taken: {', '.join(taken) or 'changed meanwhile'}",
                                 keys=taken)

    async def cas(self, key: str, value: Any, revision: int, *, lease: int = 0) -> int:
        """Set ``key`` only if it was last changed at ``revision`` (0: only if absent);
        StoreConflictError if it changed since."""
        result = await self.txn([at_revision(key, revision)], [Put(key, value, lease)])
        if not result.succeeded:
            now = await self.get(key)
            have = f"at revision {now.mod_revision}" if now else "absent"
            raise StoreConflictError(f"{key} changed: expected revision {revision}, it is "
                                     f"{have}", key=key, expected=revision)
        return result.revision

    @abc.abstractmethod
    async def _get(self, key: str) -> KeyValue | None: ...

    @abc.abstractmethod
    async def _list(self, prefix: str) -> Listing: ...

    @abc.abstractmethod
    async def _put(self, key: str, value: Any, lease: int) -> int: ...

    @abc.abstractmethod
    async def _delete(self, key: str, prefix: bool) -> int: ...

    @abc.abstractmethod
    async def _txn(self, compare: Sequence[Compare], success: Sequence[Op]) -> TxnResult: ...


# ---- choosing a backend ----------------------------------------------------------------

def default_store_url() -> str:
    """$SANVISOR_STORE, else the pool config's ``store``, else ``sqlite:`` the pool
    home's store.db."""
    env = os.environ.get("SANVISOR_STORE")
    if env:
        return env
    try:
        with open(os.path.join(where.pool_home(), "pool.json")) as fh:
            configured = json.load(fh).get("store")
    except (OSError, ValueError, AttributeError):
        configured = None
    if isinstance(configured, str) and configured:
        return configured
    return "sqlite:" + os.path.join(where.pool_home(), DEFAULT_STORE_FILE)


def parse_store_url(url: str) -> tuple[str, list[str], str]:
    """``(kind, places, namespace)``: ("sqlite", [path], "") or ("etcd", [host:port...],
    namespace). UsageError for anything else."""
    usage = "use sqlite:PATH or etcd://HOST:PORT[,HOST:PORT][/NAMESPACE]"
    if url.startswith("sqlite:"):
        path = url[len("sqlite:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise UsageError(f"store URL {url!r} names no file: {usage}", url=url)
        return "sqlite", [path], ""
    if url.startswith("etcd://"):
        rest = url[len("etcd://"):]
        hosts, slash, namespace = rest.partition("/")
        endpoints = [h.strip() for h in hosts.split(",") if h.strip()]
        for ep in endpoints:
            host, _, port = ep.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise UsageError(f"store URL {url!r}: {ep!r} is not HOST:PORT ({usage})",
                                 url=url)
        if not endpoints:
            raise UsageError(f"store URL {url!r} names no etcd endpoint: {usage}", url=url)
        if not slash:
            namespace = DEFAULT_ETCD_NAMESPACE
        elif namespace and not namespace.endswith("/"):
            namespace += "/"
        check_key(namespace, prefix=True)
        return "etcd", endpoints, namespace
    raise UsageError(f"unknown store URL {url!r}: {usage}", url=url)


def open_store(url: str | None = None) -> Store:
    """The store at ``url`` (default: :func:`default_store_url`). Nothing is contacted
    until the first operation; close it (or use ``async with``) when done."""
    url = url or default_store_url()
    kind, places, namespace = parse_store_url(url)
    if kind == "sqlite":
        from sanvisor.pool.store_sqlite import SqliteStore

        return SqliteStore(places[0])
    from sanvisor.pool.store_etcd import EtcdStore

    return EtcdStore(places, namespace=namespace)
