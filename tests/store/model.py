"""A pure in-memory model of the store's semantics (no time: leases end only when
revoked), as etcd defines them: one revision per transaction that changes something,
create/mod revisions and versions per key, a put on a lease that is gone refused, a
revoke deleting its keys at one revision."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sanvisor.pool.store import Compare, Delete, Event, Op, Put, encode_value


class LeaseGone(Exception):
    pass


@dataclass(frozen=True)
class MKey:
    text: str  # the value's JSON text
    value: Any
    create: int
    mod: int
    version: int
    lease: int


@dataclass
class Model:
    base: int  # the store's revision when the model started
    rev: int = 0  # revisions since
    keys: dict[str, MKey] = field(default_factory=dict)
    leases: set[int] = field(default_factory=set)
    events: list[Event] = field(default_factory=list)
    _writing: bool = False

    @property
    def revision(self) -> int:
        return self.base + self.rev

    def _change(self) -> int:
        if not self._writing:
            self.rev += 1
            self._writing = True
        return self.revision

    def _done(self) -> None:
        self._writing = False

    def _set(self, key: str, value: Any, lease: int) -> None:
        if lease and lease not in self.leases:
            raise LeaseGone(lease)
        rev = self._change()
        old = self.keys.get(key)
        create, version = (old.create, old.version + 1) if old else (rev, 1)
        self.keys[key] = MKey(encode_value(value), value, create, rev, version, lease)
        self.events.append(Event("put", key, value, rev))

    def _remove(self, key: str, prefix: bool) -> int:
        hit = sorted((k for k in self.keys if (k.startswith(key) if prefix else k == key)),
                     key=str.encode)
        for k in hit:
            del self.keys[k]
            self.events.append(Event("delete", k, None, self._change()))
        return len(hit)

    def put(self, key: str, value: Any, lease: int = 0) -> int:
        try:
            self._set(key, value, lease)
        finally:
            self._done()
        return self.revision

    def delete(self, key: str, prefix: bool = False) -> int:
        try:
            return self._remove(key, prefix)
        finally:
            self._done()

    def holds(self, c: Compare) -> bool:
        kv = self.keys.get(c.key)
        if c.kind == "absent":
            return kv is None
        if c.kind == "present":
            return kv is not None
        if c.kind == "revision":
            return bool((kv.mod if kv else 0) == c.operand)
        return kv is not None and kv.text == encode_value(c.operand)

    def txn(self, compare: Sequence[Compare], ops: Sequence[Op]) -> bool:
        if not all(self.holds(c) for c in compare):
            return False
        for op in ops:  # a lease that is gone refuses the whole transaction
            if isinstance(op, Put) and op.lease and op.lease not in self.leases:
                raise LeaseGone(op.lease)
        snapshot = (self.rev, dict(self.keys), list(self.events))
        try:
            for op in ops:
                if isinstance(op, Delete):
                    self._remove(op.key, op.prefix)
                else:
                    self._set(op.key, op.value, op.lease)
        except BaseException:
            self.rev, self.keys, self.events = snapshot
            raise
        finally:
            self._done()
        return True

    def grant(self, lease: int) -> None:
        self.leases.add(lease)

    def revoke(self, lease: int) -> None:
        if lease not in self.leases:
            raise LeaseGone(lease)
        self.leases.discard(lease)
        try:
            for key in sorted((k for k, v in self.keys.items() if v.lease == lease),
                              key=str.encode):
                self._remove(key, False)
        finally:
            self._done()

    def listing(self, prefix: str) -> list[tuple[str, Any, int, int, int, int]]:
        return [(k, v.value, v.create, v.mod, v.version, v.lease)
                for k, v in sorted(self.keys.items(), key=lambda kv: kv[0].encode())
                if k.startswith(prefix)]

    def mod(self, key: str) -> int:
        kv = self.keys.get(key)
        return kv.mod if kv else 0
