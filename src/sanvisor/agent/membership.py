"""This host in the pool's state store (pool/store.py): that its agent is alive, and
which domains it owns. The agent of a host that is not in a pool has none of this.

    hosts/<host>    {"pid", "since"}, on the host's lease (renewed every HOST_TTL/3):
                    the pool sees whose agent is alive
    owners/<uuid>   pool/ownership.py: the host that runs the domain, and the fencing
                    token (the revision at which it took it)
    names/<name>    {"uuid", "host"}: one domain per name in the whole pool

Ownership is **not** on the host's lease: the QEMU processes of a host outlive its
agent, so a host whose agent is down (or cut off) may well still run its domains, and
no other host may start them. Giving a dead host's domains to another host is an
administrator's act once that host is known to be off (docs/migration.md).

The fencing token guards the hand-over of a migration: the target takes the domain
only with the source's current token (one transaction), and an agent that restarts
takes its domains again under a new token, so a hand-over prepared before the
restart can no longer happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from sanvisor.errors import (
    ConflictError,
    StoreConflictError,
    StoreError,
    StoreFencedError,
    StoreLeaseExpiredError,
)
from sanvisor.pool.ownership import Owner, Ownership
from sanvisor.pool.store import Delete, Put, Store, absent, has_value, open_store

log = logging.getLogger("sanvisor.agent")
HOST_TTL = 10.0


class Membership:
    def __init__(self, store: Store, host: str) -> None:
        self.store = store
        self.host = host
        self.own = Ownership(store)
        self.owners: dict[str, Owner] = {}  # uuid -> this host's hold on it
        self.lease = 0
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def join(cls, host_conf: dict[str, Any]) -> Membership | None:
        """The membership of a host that is in a pool (host.json names the pool's home
        and the host's name there), else None."""
        pool, name = host_conf.get("pool"), host_conf.get("name")
        if not isinstance(pool, str) or not pool or not isinstance(name, str):
            return None
        url = os.environ.get("SANVISOR_STORE") or _configured(Path(pool)) or \
            f"sqlite:{Path(pool) / 'store.db'}"
        m = cls(open_store(url), name)
        await m.start()
        log.info("pool: %s in the store at %s", name, url)
        return m

    async def start(self) -> None:
        await self._announce()
        self._task = asyncio.get_running_loop().create_task(self._keep_alive())

    async def _announce(self) -> None:
        self.lease = (await self.store.grant(HOST_TTL)).id
        await self.store.put(f"hosts/{self.host}", {"pid": os.getpid(),
                                                     "since": round(time.time(), 3)},
                             lease=self.lease)

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(HOST_TTL / 3)
            try:
                await self.store.keepalive(self.lease)
            except StoreLeaseExpiredError:
                log.warning("pool: %s's lease lapsed; announcing it again", self.host)
                with contextlib.suppress(StoreError):
                    await self._announce()
            except StoreError as exc:
                log.warning("pool: cannot renew %s's lease: %s", self.host, exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(StoreError):
            await self.store.revoke(self.lease)
        await self.store.close()

    # ---- what other hosts are --------------------------------------------------------
    async def alive(self, host: str) -> bool:
        return await self.store.get(f"hosts/{host}") is not None

    async def _where(self, host: str) -> str:
        return host if await self.alive(host) else f"{host} (whose agent is not answering)"

    # ---- the domains this host runs --------------------------------------------------
    async def claim(self, name: str, uuid: str) -> None:
        """Before a domain starts here (create, restore): refused if it runs elsewhere
        in the pool (its uuid owned, or its name held, by another host)."""
        now = await self.own.current(uuid)
        if now is not None and now.host != self.host:
            raise ConflictError(f"domain {name} ({uuid}) runs on {await self._where(now.host)}"
                                "; it cannot run twice", domain=name, host=now.host)
        try:
            owner = await self.own.acquire(uuid, self.host, lease=0)
        except StoreConflictError as exc:
            raise ConflictError(f"domain {name}: {exc}", domain=name) from None
        try:
            await self._hold_name(name, uuid)
        except BaseException:
            await self.own.release(owner)
            raise
        self.owners[uuid] = owner

    async def _hold_name(self, name: str, uuid: str) -> None:
        """names/<name> for ``uuid``, taken only if free (or already this domain's)."""
        key, mine = f"names/{name}", {"uuid": uuid, "host": self.host}
        for _attempt in range(3):
            if (await self.store.txn([absent(key)], [Put(key, mine)])).succeeded:
                return
            held = await self.store.get(key)
            if held is None:
                continue  # released meanwhile: try again
            value = held.value if isinstance(held.value, dict) else {}
            if value.get("uuid") != uuid:
                raise ConflictError(f"domain {name} runs on "
                                    f"{await self._where(str(value.get('host')))} (uuid "
                                    f"{value.get('uuid')}); names are unique in the pool",
                                    domain=name, host=value.get("host"))
            if (await self.store.txn([has_value(key, value)], [Put(key, mine)])).succeeded:
                return
        raise ConflictError(f"domain {name}: its name kept changing in the pool",
                            domain=name)

    async def release(self, name: str, uuid: str) -> None:
        """The domain is gone from this host (destroyed, saved, or moved away: then the
        target owns it already and nothing is changed)."""
        try:
            owner = self.owners.pop(uuid, None)
            if owner is None:  # not taken by this run of the agent (a lost domain)
                now = await self.own.current(uuid)
                if now is None or now.host != self.host:
                    return
                owner = now
            if await self.own.release(owner):
                await self.store.txn([has_value(f"names/{name}",
                                                {"uuid": uuid, "host": self.host})],
                                     [Delete(f"names/{name}")])
        except StoreError as exc:
            log.warning("pool: cannot release %s: %s", name, exc)

    def token(self, uuid: str) -> int | None:
        owner = self.owners.get(uuid)
        return owner.token if owner is not None else None

    async def expect(self, name: str, uuid: str, host: str) -> None:
        """Before an incoming migration: the domain is owned by the source."""
        now = await self.own.current(uuid)
        if now is not None and now.host != host:
            raise ConflictError(f"migrate: domain {name} ({uuid}) is owned by {now.host}, "
                                f"not by the source {host}", domain=name, owner=now.host)

    async def take_over(self, name: str, uuid: str, source: str, token: int | None) -> None:
        """A migration's switch-over, on the target: the domain becomes ours if and only
        if ``source`` still owns it with ``token`` (one transaction, the name with it)."""
        now = await self.own.current(uuid)
        if now is None and token is None:  # a source outside any pool's records
            await self.claim(name, uuid)
            return
        try:
            owner = await self.own.transfer(
                uuid, source, self.host, int(token or 0), lease=0,
                also=[Put(f"names/{name}", {"uuid": uuid, "host": self.host})])
        except StoreFencedError as exc:
            raise ConflictError(f"migrate: {exc}", domain=name) from None
        self.owners[uuid] = owner

    async def resume_ownership(self, name: str, uuid: str) -> str:
        """After an agent restart, for a domain found running here: "ours" (taken again,
        under a new token), or the host that owns it now (it moved while the agent was
        away: the caller removes this stale copy)."""
        now = await self.own.current(uuid)
        if now is not None and now.host != self.host:
            return now.host
        await self.claim(name, uuid)
        return "ours"


def _configured(pool: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        url = json.loads((pool / "pool.json").read_text()).get("store")
        if isinstance(url, str) and url:
            return url
    return None
