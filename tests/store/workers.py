"""What the concurrency tests run in processes of their own (spawned: each opens the
store itself, as separate agents do)."""

from __future__ import annotations

import asyncio
from typing import Any

from sanvisor.errors import StoreConflictError
from sanvisor.pool.store import open_store


def reserve_rounds(url: str, me: int, rounds: int, barrier: Any, out: Any) -> None:
    """Each round, at the barrier, reserve name ``web<r>``, a uuid of this process's own
    and MAC ``<r>`` at once; report (round, won)."""

    async def main() -> None:
        async with open_store(url) as store:
            await store.revision()  # connected before the race starts
            for r in range(rounds):
                barrier.wait()
                uid = f"{me:04d}-{r:04d}"
                try:
                    await store.reserve({f"names/web{r}": uid,
                                         f"domains/{uid}": {"name": f"web{r}"},
                                         f"macs/00:16:3e:00:00:{r:02x}": uid})
                    out.put((r, me, True))
                except StoreConflictError:
                    out.put((r, me, False))

    asyncio.run(main())


def count_up(url: str, key: str, times: int, barrier: Any, out: Any) -> None:
    """Add 1 to the counter at ``key`` ``times`` times, each by read and compare-and-swap
    (retried when another process wrote first); report how many retries it took."""

    async def main() -> None:
        retries = 0
        async with open_store(url) as store:
            await store.revision()
            barrier.wait()
            for _ in range(times):
                while True:
                    kv = await store.get(key)
                    value, rev = (kv.value, kv.mod_revision) if kv else (0, 0)
                    try:
                        await store.cas(key, value + 1, rev)
                        break
                    except StoreConflictError:
                        retries += 1
        out.put(retries)

    asyncio.run(main())
