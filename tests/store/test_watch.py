"""Watches, and a store that cannot be reached: on both backends (etcd killed for real)."""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanvisor.errors import StoreCompactedError, StoreUnavailableError
from sanvisor.pool.store import Event, Put, Store, Watch, open_store
from sanvisor.pool.store_sqlite import SqliteStore
from tests.store.conftest import EtcdServer, free_port, run

WAIT = 10.0


async def take(watch: Watch, n: int) -> list[Event]:
    return [await asyncio.wait_for(anext(watch), WAIT) for _ in range(n)]


def test_a_watch_sees_the_changes_under_its_prefix(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        await store.put("owners/before", 0)  # before the watch: not seen
        async with store.watch("owners/") as watch:
            r1 = await store.put("owners/u1", {"host": "h1"})
            await store.put("domains/u1", "elsewhere: not seen")
            r2 = await store.txn([], [Put("owners/u1", {"host": "h2"}), Put("owners/u2", 2)])
            lease = await store.grant(1)
            r3 = await store.put("owners/u3", 3, lease=lease.id)
            r4 = await store.delete("owners/u1")
            assert r4 == 1
            events = await take(watch, 5)
            assert [(e.kind, e.key, e.value) for e in events] == [
                ("put", "owners/u1", {"host": "h1"}), ("put", "owners/u1", {"host": "h2"}),
                ("put", "owners/u2", 2), ("put", "owners/u3", 3), ("delete", "owners/u1", None)]
            assert [e.revision for e in events[:4]] == [r1, r2.revision, r2.revision, r3]
            assert events[4].revision == r3 + 1
            expired = await take(watch, 1)  # the lease's expiry is seen as a delete
            assert (expired[0].kind, expired[0].key) == ("delete", "owners/u3")

    run(store_url, scenario)


def test_a_watch_replays_from_a_past_revision(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        r1 = await store.put("domains/a", 1)
        await store.put("domains/b", 2)
        await store.delete("domains/a")
        async with store.watch("domains/", start_revision=r1) as watch:
            events = await take(watch, 3)
            assert [(e.kind, e.key) for e in events] == [
                ("put", "domains/a"), ("put", "domains/b"), ("delete", "domains/a")]
            await store.put("domains/c", 3)
            assert (await take(watch, 1))[0].key == "domains/c"

    run(store_url, scenario)


def test_a_watch_on_compacted_history_says_so(backend: str, store_url: str,
                                              request: pytest.FixtureRequest) -> None:
    async def scenario(store: Store) -> None:
        first = await store.put("k", 0)
        for i in range(12):
            await store.put("k", i)
        if backend == "etcd":
            server: EtcdServer = request.getfixturevalue("etcd_server")
            server.call("kv/compaction", {"revision": str(first + 6)})
        with pytest.raises(StoreCompactedError, match="compacted") as err:
            async with store.watch("k", start_revision=first) as watch:
                await take(watch, 1)
        assert "\n" not in str(err.value)

    if backend == "sqlite":
        async def small() -> None:
            async with SqliteStore(store_url.removeprefix("sqlite:"), history=4) as store:
                await scenario(store)

        asyncio.run(small())
    else:
        run(store_url, scenario)


def test_etcd_killed_gives_a_one_line_error(own_etcd: EtcdServer) -> None:
    async def scenario(store: Store) -> None:
        await store.put("domains/u1", 1)
        async with store.watch("domains/") as watch:
            own_etcd.kill()
            with pytest.raises(StoreUnavailableError) as err:
                await store.put("domains/u1", 2)
            message = str(err.value)
            assert "\n" not in message and err.value.code == "store.unavailable"
            assert message == f"etcd unreachable ({own_etcd.endpoint}: Connection refused)"
            with pytest.raises(StoreUnavailableError, match="watch stream"):
                await take(watch, 1)
        with pytest.raises(StoreUnavailableError):
            await store.list("")

    run(own_etcd.url(), scenario)


def test_a_dead_endpoint_is_skipped(etcd_server: EtcdServer) -> None:
    dead = f"127.0.0.1:{free_port()}"

    async def scenario(store: Store) -> None:
        await store.put("a", 1)
        assert (await store.get("a")).value == 1  # type: ignore[union-attr]
        async with store.watch("a") as watch:
            await store.put("a", 2)
            assert (await take(watch, 1))[0].value == 2

    run(f"etcd://{dead},{etcd_server.endpoint}/failover/", scenario)


def test_etcd_namespaces_are_apart(etcd_server: EtcdServer) -> None:
    async def scenario(store: Store) -> None:
        async with open_store(etcd_server.url("pool2")) as other:
            await store.put("names/web1", "pool1")
            await other.put("names/web1", "pool2")
            assert (await store.list("")).values() == {"names/web1": "pool1"}
            assert (await other.list("")).values() == {"names/web1": "pool2"}
            await other.delete("", prefix=True)
            assert (await store.get("names/web1")).value == "pool1"  # type: ignore[union-attr]

    run(etcd_server.url("pool1"), scenario)


@pytest.fixture
def not_etcd() -> Iterator[str]:
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_something_else_than_etcd(not_etcd: str) -> None:
    async def scenario(store: Store) -> None:
        with pytest.raises(StoreUnavailableError, match=f"{not_etcd} did not answer kv/range"):
            await store.get("a")

    run(f"etcd://{not_etcd}", scenario)


def test_an_unusable_sqlite_file(scratch: Path) -> None:
    garbage = scratch / "garbage.db"
    garbage.write_bytes(b"not a database, not at all" * 100)
    (scratch / "file").write_text("")

    async def scenario(store: Store) -> None:
        with pytest.raises(StoreUnavailableError) as err:
            await store.get("a")
        assert str(err.value).startswith(f"store {store.url.removeprefix('sqlite:')}: ")
        assert "\n" not in str(err.value)

    run(f"sqlite:{garbage}", scenario)
    run(f"sqlite:{scratch / 'file' / 'store.db'}", scenario)


def test_a_sqlite_file_locked_too_long(scratch: Path) -> None:
    import sqlite3

    path = scratch / "store.db"

    async def scenario() -> None:
        async with SqliteStore(path, busy_timeout=0.2) as store:
            await store.put("a", 1)
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # another process's writer that hangs
            try:
                with pytest.raises(StoreUnavailableError, match="busy"):
                    await store.put("a", 2)
                assert (await store.get("a")).value == 1  # type: ignore[union-attr]
            finally:
                other.execute("ROLLBACK")
                other.close()
            await store.put("a", 3)

    asyncio.run(scenario())
