"""Leases, ownership and fencing tokens, on both backends. Expiry is waited for as an
event with a deadline (short TTLs), never with a fixed sleep."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from sanvisor.errors import (
    StoreConflictError,
    StoreFencedError,
    StoreLeaseExpiredError,
    UsageError,
)
from sanvisor.pool.ownership import Ownership
from sanvisor.pool.store import Put, Store
from sanvisor.waiting import wait_until_async
from tests.store.conftest import run

TTL = 1  # etcd's shortest lease (it rounds up to whole seconds)
DEADLINE = 10.0  # TTL plus the backends' sweep (etcd checks every 0.5 s) plus slack


async def gone(store: Store, key: str) -> float:
    """Wait until ``key`` is gone; when it was seen gone (time.monotonic())."""

    async def absent() -> bool:
        return await store.get(key) is None

    await wait_until_async(f"{key} disappears", absent, timeout=DEADLINE, interval=0.02)
    return time.monotonic()


def test_expiry_removes_the_lease_keys(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        t0 = time.monotonic()
        lease = await store.grant(TTL)
        assert lease.ttl == TTL
        left = await store.time_to_live(lease.id)
        assert left is not None and 0 <= left <= TTL
        await store.put("owners/u1", {"host": "h1"}, lease=lease.id)
        await store.txn([], [Put("hosts/h1", {"up": True}, lease.id), Put("names/web1", "u1")])
        kv = await store.get("owners/u1")
        assert kv is not None and kv.lease == lease.id
        took = await gone(store, "owners/u1") - t0
        assert TTL - 0.05 <= took < TTL + 3, took  # not before its time, soon after
        assert await store.get("hosts/h1") is None
        assert await store.get("names/web1") is not None  # not attached: stays
        assert await store.time_to_live(lease.id) is None
        with pytest.raises(StoreLeaseExpiredError) as err:
            await store.keepalive(lease.id)
        assert "\n" not in str(err.value)
        with pytest.raises(StoreLeaseExpiredError):
            await store.put("owners/u1", {"host": "h1"}, lease=lease.id)
        with pytest.raises(StoreLeaseExpiredError):
            await store.txn([], [Put("a", 1), Put("b", 2, lease.id)])
        assert await store.get("a") is None  # the whole transaction was refused

    run(store_url, scenario)


def test_keepalive_keeps_the_keys(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        lease = await store.grant(2 * TTL)
        await store.put("owners/u1", "h1", lease=lease.id)
        end = time.monotonic() + 3 * TTL
        while time.monotonic() < end:  # one and a half lifetimes, renewed 8 times a lifetime
            assert await store.keepalive(lease.id) == 2 * TTL
            assert await store.get("owners/u1") is not None
            await asyncio.sleep(TTL / 4)  # the holder's renewal pace, not a wait for an event
        await gone(store, "owners/u1")  # renewals stopped: it goes

    run(store_url, scenario)


def test_revoke_deletes_at_once(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        lease = await store.grant(60)
        await store.put("hosts/h1", 1, lease=lease.id)
        await store.put("owners/u1", 1, lease=lease.id)
        before = await store.revision()
        await store.revoke(lease.id)
        assert len(await store.list("")) == 0
        assert await store.revision() == before + 1  # one revision for the lease's keys
        with pytest.raises(StoreLeaseExpiredError):
            await store.revoke(lease.id)
        with pytest.raises(UsageError):
            await store.grant(0)

    run(store_url, scenario)


def test_fencing_refuses_a_stale_owner(store_url: str) -> None:
    """h1 owns the domain, stops renewing (paused, cut off); its lease expires, h2 takes
    the domain; h1 comes back: its write with its old token is refused, its renewal
    tells it it lost the domain, and h2's state is intact."""

    async def scenario(store: Store) -> None:
        own = Ownership(store)
        h1 = await own.acquire("u1", "h1", ttl=2 * TTL)  # time to check it is refused
        assert h1.token == (await store.get("owners/u1")).mod_revision  # type: ignore[union-attr]
        await own.write(h1, [Put("domains/u1", {"state": "running", "by": "h1"})])
        with pytest.raises(StoreConflictError, match="owned by h1"):
            await own.acquire("u1", "h2", ttl=TTL)
        await gone(store, "owners/u1")  # h1 is paused: nothing renews its lease
        h2 = await own.acquire("u1", "h2", ttl=30)
        assert h2.token > h1.token
        await own.write(h2, [Put("domains/u1", {"state": "running", "by": "h2"})])
        with pytest.raises(StoreFencedError, match="h1 no longer owns domain u1") as err:
            await own.write(h1, [Put("domains/u1", {"state": "paused", "by": "h1"})])
        assert "h2 owns it" in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(StoreLeaseExpiredError, match="h1 lost domain u1"):
            await own.renew(h1)
        assert await own.release(h1) is False
        assert (await store.get("domains/u1")).value["by"] == "h2"  # type: ignore[union-attr]
        assert await own.current("u1") == h2
        assert await own.renew(h2) == h2
        assert await own.release(h2) is True
        assert await own.current("u1") is None
        assert await store.time_to_live(h2.lease) is None  # its own lease went with it

    run(store_url, scenario)


def test_retaking_on_the_same_host_fences_the_old_incarnation(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        own = Ownership(store)
        host_lease = await store.grant(30)
        old = await own.acquire("u1", "h1", lease=host_lease.id)
        new = await own.acquire("u1", "h1", lease=host_lease.id)  # the agent restarted
        assert new.token > old.token
        with pytest.raises(StoreFencedError):
            await own.write(old, [Put("domains/u1", 1)])
        await own.write(new, [Put("domains/u1", 2)])
        assert [o.uuid for o in await own.owned_by("h1")] == ["u1"]
        await store.revoke(host_lease.id)  # the host's lease: all its domains go
        assert await own.owned_by("h1") == []
        with pytest.raises(UsageError):
            await own.acquire("u2", "h1")

    run(store_url, scenario)


def test_transfer_is_one_atomic_step(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        own = Ownership(store)
        src = await own.acquire("u1", "h1", ttl=30)
        await store.put("migrations/u1", {"phase": "transfer", "to": "h2"})
        dst = await own.transfer("u1", "h1", "h2", src.token, ttl=30,
                                 also=[Put("migrations/u1", {"phase": "switched", "to": "h2"})])
        owner = await own.current("u1")
        mig = await store.get("migrations/u1")
        assert owner == dst and owner.host == "h2" and dst.token > src.token
        assert mig is not None and mig.value["phase"] == "switched"
        assert mig.mod_revision == dst.token  # the same transaction
        assert await store.time_to_live(src.lease) is None  # the source's lease is ended
        before = await store.revision()
        with pytest.raises(StoreFencedError, match="h2 owns it"):  # a stale token
            await own.transfer("u1", "h1", "h3", src.token, ttl=30,
                               also=[Put("migrations/u1", {"phase": "bogus"})])
        with pytest.raises(StoreFencedError):  # the wrong source host
            await own.transfer("u1", "h1", "h3", dst.token, ttl=30)
        assert await store.revision() == before  # nothing written
        assert (await store.get("migrations/u1")).value["phase"] == "switched"  # type: ignore[union-attr]
        with pytest.raises(StoreFencedError):
            await own.write(src, [Put("domains/u1", "from the old source")])

    run(store_url, scenario)


def test_two_concurrent_transfers_one_wins(store_url: str) -> None:
    async def scenario(store: Store) -> None:
        own = Ownership(store)
        src = await own.acquire("u1", "h1", ttl=30)
        results = await asyncio.gather(
            *(own.transfer("u1", "h1", to, src.token, ttl=30) for to in ("h2", "h3", "h4")),
            return_exceptions=True)
        won = [r for r in results if not isinstance(r, BaseException)]
        assert len(won) == 1, results
        assert all(isinstance(r, StoreFencedError) for r in results if r not in won)
        assert await own.current("u1") == won[0]
        leases = [r.lease for r in won]
        assert await store.time_to_live(leases[0]) is not None
        await own.release(won[0])

    run(store_url, scenario)


def test_sqlite_leases_of_an_earlier_boot_have_expired(scratch: Path) -> None:
    """The machine rebooted: every holder of a lease died with it."""
    path = scratch / "store.db"

    async def scenario(store: Store) -> None:
        lease = await store.grant(300)
        await store.put("owners/u1", "h1", lease=lease.id)
        db = sqlite3.connect(path)  # as if written by the previous boot
        with db:
            db.execute("UPDATE leases SET boot = 'an-earlier-boot'")
        db.close()
        assert await store.get("owners/u1") is None
        assert await store.time_to_live(lease.id) is None

    run(f"sqlite:{path}", scenario)
