"""Keys, revisions, compare-and-swap and transactions: the same tests on SQLite and etcd,
the concurrent ones with real processes racing."""

from __future__ import annotations

import multiprocessing
from collections import defaultdict
from collections.abc import Callable

import pytest

from sanvisor.errors import StoreConflictError, UsageError
from sanvisor.pool import store_etcd
from sanvisor.pool.store import (
    MAX_TXN_OPS,
    Delete,
    Op,
    Put,
    Store,
    absent,
    at_revision,
    has_value,
    present,
)
from tests.store import workers
from tests.store.conftest import run


def test_put_get_delete_and_revisions(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        start = await store.revision()
        assert await store.get("domains/a") is None
        r1 = await store.put("domains/a", {"name": "web1", "memory": 128})
        assert r1 == start + 1 == await store.revision()
        kv = await store.get("domains/a")
        assert kv is not None
        assert (kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease) == (
            {"name": "web1", "memory": 128}, r1, r1, 1, 0)
        r2 = await store.put("domains/a", [1, "two", None, 3.5])
        kv = await store.get("domains/a")
        assert kv is not None and (kv.value, kv.create_revision, kv.mod_revision, kv.version) \
            == ([1, "two", None, 3.5], r1, r2, 2)
        assert await store.delete("domains/a") == 1
        assert await store.delete("domains/a") == 0  # nothing deleted: no new revision
        assert await store.revision() == r2 + 1
        r3 = await store.put("domains/a", "again")
        kv = await store.get("domains/a")
        assert kv is not None and (kv.create_revision, kv.version) == (r3, 1)

    run(store_url, scenario)


def test_list_by_prefix_in_byte_order(store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_etcd, "PAGE", 2)  # etcd: lists come in pages of 2
    keys = ["names/web1", "names/web10", "names/web2", "names/wéb", "names/web1/x", "namesX",
            "owners/u1", "macs/00:16:3e:00:00:01"]

    async def scenario(store: Store) -> None:
        for i, key in enumerate(keys):
            await store.put(key, i)
        listing = await store.list("names/")
        assert [kv.key for kv in listing] == sorted(
            (k for k in keys if k.startswith("names/")), key=str.encode)
        assert listing.revision == await store.revision()
        assert listing.values()["names/web10"] == 1
        assert [kv.key for kv in await store.list("names/web1")] == [
            "names/web1", "names/web1/x", "names/web10"]
        assert len(await store.list("")) == len(keys)
        assert len(await store.list("nothing/")) == 0
        assert await store.delete("names/", prefix=True) == 5
        assert [kv.key for kv in await store.list("")] == sorted(
            ["namesX", "owners/u1", "macs/00:16:3e:00:00:01"], key=str.encode)

    run(store_url, scenario)


def test_compare_and_swap(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        r1 = await store.cas("owners/u1", {"host": "h1"}, 0)  # 0: only if absent
        with pytest.raises(StoreConflictError, match="expected revision 0, it is at revision"):
            await store.cas("owners/u1", {"host": "h2"}, 0)
        r2 = await store.cas("owners/u1", {"host": "h2"}, r1)
        with pytest.raises(StoreConflictError) as stale:  # the revision read before
            await store.cas("owners/u1", {"host": "h3"}, r1)
        assert "\n" not in str(stale.value) and stale.value.code == "store.conflict"
        kv = await store.get("owners/u1")
        assert kv is not None and kv.value == {"host": "h2"} and kv.mod_revision == r2

    run(store_url, scenario)


def test_transactions_apply_all_or_nothing(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        r = await store.put("a", 1)
        await store.put("gone/1", 1)
        await store.put("gone/2", 2)
        ops: list[Op] = [Put("b", 2), Put("c", {"x": [1]}), Delete("a"),
                         Delete("gone/", prefix=True)]
        for failing in (absent("a"), present("zz"), at_revision("a", r + 1),
                        has_value("a", 2), has_value("zz", None)):
            before = await store.revision()
            result = await store.txn([present("a"), failing], ops)
            assert not result.succeeded and result.revision == before
            assert (await store.list("")).values() == {"a": 1, "gone/1": 1, "gone/2": 2}
        result = await store.txn([present("a"), absent("b"), at_revision("a", r),
                                  at_revision("zz", 0), has_value("a", 1)], ops)
        assert result.succeeded and result.revision == await store.revision()
        listing = await store.list("")
        assert listing.values() == {"b": 2, "c": {"x": [1]}}
        assert {kv.mod_revision for kv in listing} == {result.revision}  # one revision
        empty = await store.txn([], [])
        assert empty.succeeded and empty.revision == result.revision

    run(store_url, scenario)


def test_value_comparison_ignores_key_order(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        await store.put("k", {"b": 1, "a": [True, None]})
        result = await store.txn([has_value("k", {"a": [True, None], "b": 1})], [Put("k", 2)])
        assert result.succeeded

    run(store_url, scenario)


def test_what_both_backends_refuse(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        with pytest.raises(UsageError, match="written twice"):
            await store.txn([], [Put("a", 1), Put("a", 2)])
        with pytest.raises(UsageError, match="written twice"):
            await store.txn([], [Delete("a/", prefix=True), Put("a/b", 2)])
        with pytest.raises(UsageError, match="at most"):
            await store.txn([absent(f"k{i}") for i in range(MAX_TXN_OPS)], [Put("x", 1)])
        for key in ("", "a\nb", "x" * 600):
            with pytest.raises(UsageError):
                await store.put(key, 1)
        with pytest.raises(UsageError, match="not JSON"):
            await store.put("a", {1, 2})
        with pytest.raises(UsageError, match="not JSON"):
            await store.put("a", float("nan"))
        assert len(await store.list("")) == 0

    run(store_url, scenario)


def test_a_reservation_names_what_is_taken(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        await store.reserve({"names/web1": "u1", "domains/u1": {}, "macs/m1": "u1"})
        with pytest.raises(StoreConflictError, match="already taken: names/web1, macs/m1"):
            await store.reserve({"names/web1": "u2", "domains/u2": {}, "macs/m1": "u2"})
        assert await store.get("domains/u2") is None  # nothing of the loser's is written

    run(store_url, scenario)


def _spawned(target: Callable[..., None], args: list[tuple[object, ...]]) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=a) for a in args]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(120)
            assert p.exitcode == 0, f"worker exit status {p.exitcode}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


def test_concurrent_reservers_exactly_one_wins(store_url: str) -> None:
    """Four processes race, round after round, for one name and one MAC each with a uuid
    of its own: each round exactly one wins, and nothing of the losers is written."""
    n, rounds = 4, 12
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(n), ctx.Queue()
    _spawned(workers.reserve_rounds, [(store_url, me, rounds, barrier, out) for me in range(n)])
    results: dict[int, list[int]] = defaultdict(list)
    for _ in range(n * rounds):
        r, me, won = out.get(timeout=10)
        if won:
            results[r].append(me)
    assert {r: len(w) for r, w in results.items()} == dict.fromkeys(range(rounds), 1)

    async def check(store: Store) -> None:
        names = (await store.list("names/")).values()
        domains = (await store.list("domains/")).values()
        assert len(names) == len(domains) == rounds
        for r, (winner,) in results.items():
            uid = f"{winner:04d}-{r:04d}"
            assert names[f"names/web{r}"] == uid and f"domains/{uid}" in domains
            assert (await store.get(f"macs/00:16:3e:00:00:{r:02x}")).value == uid  # type: ignore[union-attr]

    run(store_url, check)


def test_concurrent_compare_and_swap_loses_no_update(store_url: str) -> None:
    n, times = 4, 25
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(n), ctx.Queue()
    _spawned(workers.count_up, [(store_url, "counter", times, barrier, out) for _ in range(n)])
    retries = sum(out.get(timeout=10) for _ in range(n))

    async def check(store: Store) -> None:
        kv = await store.get("counter")
        assert kv is not None and kv.value == n * times and kv.version == n * times

    run(store_url, check)
    assert retries > 0, "the processes never raced: the test proved nothing"
