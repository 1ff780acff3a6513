"""Which host runs each domain: ``owners/<uuid>``, a record attached to a lease, and
its fencing token (docs/store.md, "Ownership and fencing").

The **token** is the store revision at which the current owner took the record (its
``mod_revision``): it only grows, and changes whenever ownership changes hands (or is
taken again, even by the same host). Keeping the lease alive does not change it. Every
write a host makes on behalf of a domain it owns is conditional on the token
(:meth:`Ownership.write`, or :meth:`Ownership.guard` in a transaction of one's own):
a host whose lease lapsed while it was paused or cut off, and that comes back
believing it still owns the domain, has its writes refused (StoreFencedError) and
learns so at its next renewal, instead of overwriting the new owner's state.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sanvisor.errors import (
    StoreConflictError,
    StoreFencedError,
    StoreLeaseExpiredError,
    UsageError,
)
from sanvisor.pool.store import Compare, Delete, KeyValue, Op, Put, Store, absent, at_revision

OWNERS = "owners/"


@dataclass(frozen=True)
class Owner:
    uuid: str
    host: str
    token: int  # the fencing token: the revision at which ``host`` took the domain
    lease: int  # the lease that keeps the record
    own_lease: bool = False  # granted for this record alone (revoked with it)


class Ownership:
    """Ownership records in ``store`` under ``prefix`` (``owners/``)."""

    def __init__(self, store: Store, prefix: str = OWNERS) -> None:
        self.store = store
        self.prefix = prefix

    def key(self, uuid: str) -> str:
        return self.prefix + uuid

    def guard(self, owner: Owner) -> Compare:
        """The condition that ``owner`` still owns its domain, to put in a transaction."""
        return at_revision(self.key(owner.uuid), owner.token)

    def _owner(self, kv: KeyValue) -> Owner | None:
        value = kv.value if isinstance(kv.value, dict) else {}
        host = value.get("host")
        if not isinstance(host, str):
            return None
        return Owner(kv.key[len(self.prefix):], host, kv.mod_revision, kv.lease,
                     bool(value.get("own_lease")))

    async def current(self, uuid: str) -> Owner | None:
        kv = await self.store.get(self.key(uuid))
        return None if kv is None else self._owner(kv)

    async def owned_by(self, host: str) -> list[Owner]:
        listing = await self.store.list(self.prefix)
        owners = (self._owner(kv) for kv in listing)
        return [o for o in owners if o is not None and o.host == host]

    async def _lease(self, ttl: float | None, lease: int | None) -> tuple[int, bool]:
        if (ttl is None) == (lease is None):
            raise UsageError("ownership needs either a time to live (a lease of its own) "
                             "or the lease of its host, not both")
        if lease is not None:
            return lease, False
        assert ttl is not None
        return (await self.store.grant(ttl)).id, True

    async def _drop(self, lease: int) -> None:
        with contextlib.suppress(StoreLeaseExpiredError):
            await self.store.revoke(lease)

    def _record(self, host: str, lease: int, own: bool) -> dict[str, Any]:
        return {"host": host, "lease": lease, "own_lease": own, "since": round(time.time(), 3)}

    async def acquire(self, uuid: str, host: str, *, ttl: float | None = None,
                      lease: int | None = None) -> Owner:
        """Make ``host`` the owner of domain ``uuid``, kept by a new lease of ``ttl``
        seconds or by ``lease`` (the host's own, shared by its domains). Taking it again
        on the same host (an agent restarted) gives a new token. StoreConflictError if
        another host owns it."""
        key = self.key(uuid)
        lid, own = await self._lease(ttl, lease)
        try:
            for _attempt in range(3):  # the record may change (lapse) between read and write
                now = await self.current(uuid)
                if now is not None and now.host != host:
                    raise self._taken(now)
                result = await self.store.txn(
                    [at_revision(key, now.token) if now else absent(key)],
                    [Put(key, self._record(host, lid, own), lid)])
                if result.succeeded:
                    break
            else:
                raise StoreConflictError(f"domain {uuid}: its ownership kept changing",
                                         uuid=uuid)
        except BaseException:
            if own:
                await self._drop(lid)
            raise
        if now is not None and now.own_lease and now.lease != lid:
            await self._drop(now.lease)
        return Owner(uuid, host, result.revision, lid, own)

    async def renew(self, owner: Owner) -> Owner:
        """Keep ``owner``'s lease alive; StoreLeaseExpiredError if it lapsed (the record
        is gone), StoreFencedError if the domain has changed hands meanwhile."""
        try:
            await self.store.keepalive(owner.lease)
        except StoreLeaseExpiredError:
            raise StoreLeaseExpiredError(
                f"{owner.host} lost domain {owner.uuid}: its lease {owner.lease:x} expired",
                uuid=owner.uuid, host=owner.host, lease=owner.lease) from None
        await self._check(owner)
        return owner

    async def release(self, owner: Owner) -> bool:
        """Give the domain up (when it stops); False if ``owner`` no longer held it."""
        result = await self.store.txn([self.guard(owner)], [Delete(self.key(owner.uuid))])
        if owner.own_lease:
            await self._drop(owner.lease)
        return result.succeeded

    async def transfer(self, uuid: str, from_host: str, to_host: str, token: int, *,
                       ttl: float | None = None, lease: int | None = None,
                       also: Sequence[Op] = ()) -> Owner:
        """Migration's switch-over, one atomic step: ``to_host`` owns the domain (kept by a
        new lease of ``ttl`` seconds or by ``lease``) if and only if ``from_host`` still
        held it with ``token``; ``also`` (e.g. the migration record's last phase) is
        written in the same transaction. StoreFencedError if the token is not current."""
        key = self.key(uuid)
        now = await self.current(uuid)
        if now is None or now.host != from_host or now.token != token:
            raise self._fenced(uuid, from_host, token, now, "cannot hand it over")
        lid, own = await self._lease(ttl, lease)
        try:
            result = await self.store.txn([at_revision(key, token)],
                                          [Put(key, self._record(to_host, lid, own), lid),
                                           *also])
        except BaseException:
            if own:
                await self._drop(lid)
            raise
        if not result.succeeded:
            if own:
                await self._drop(lid)
            raise self._fenced(uuid, from_host, token, await self.current(uuid),
                               "cannot hand it over")
        if now.own_lease and now.lease != lid:
            await self._drop(now.lease)
        return Owner(uuid, to_host, result.revision, lid, own)

    async def write(self, owner: Owner, ops: Sequence[Op],
                    compare: Sequence[Compare] = ()) -> int:
        """Apply ``ops`` on behalf of ``owner``, only while its token is current (and
        ``compare`` holds); the revision written. StoreFencedError if it is not the owner
        any more, StoreConflictError if only ``compare`` failed."""
        result = await self.store.txn([self.guard(owner), *compare], ops)
        if result.succeeded:
            return result.revision
        await self._check(owner)
        raise StoreConflictError(f"domain {owner.uuid}: a condition of the write failed",
                                 uuid=owner.uuid)

    async def _check(self, owner: Owner) -> None:
        now = await self.current(owner.uuid)
        if now is None or now.token != owner.token:
            raise self._fenced(owner.uuid, owner.host, owner.token, now, "refused")

    def _taken(self, holder: Owner) -> StoreConflictError:
        return StoreConflictError(f"domain {holder.uuid} is owned by {holder.host} (since "
                                  f"revision {holder.token})", uuid=holder.uuid,
                                  owner=holder.host, token=holder.token)

    def _fenced(self, uuid: str, host: str, token: int, now: Owner | None,
                what: str) -> StoreFencedError:
        state = ("it has no owner now" if now is None else
                 f"{now.host} owns it since revision {now.token}")
        return StoreFencedError(f"{host} no longer owns domain {uuid} (token {token}): "
                                f"{state}; {what}", uuid=uuid, host=host, token=token,
                                owner=now.host if now else None)
