"""Random sequences of operations, run against a real store and against the model
(tests/store/model.py): after every step they agree on every key (value, revisions,
version, lease), on the revision, and on each operation's outcome; and a watch replayed
from the start sees exactly the model's history. SQLite gets many examples, the real
etcd fewer (each of its writes waits for a disk flush)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from sanvisor.errors import StoreConflictError, StoreLeaseExpiredError
from sanvisor.pool.store import Compare, Delete, Op, Put, Store, absent, open_store
from tests.store.conftest import EtcdServer
from tests.store.model import LeaseGone, Model

T = TypeVar("T")
KEYS = ["a", "a/b", "a/c", "ab", "names/web1", "names/wéb", "owners/u1"]
PREFIXES = ["", "a", "a/", "names/", "zz"]
EXAMPLES = {"sqlite": (100, 30), "etcd": (25, 25)}  # examples, steps each

keys = st.sampled_from(KEYS)
values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text("ab\"é", max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text("xy", max_size=2),
                                                                inner, max_size=2),
    max_leaves=4)


class StoreMachine(RuleBasedStateMachine):
    url_factory: Any = None  # set per test: () -> a fresh store URL

    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.store: Store = open_store(type(self).url_factory())
        self.model = Model(base=self.do(self.store.revision()))
        self.granted: list[int] = []

    def do(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            for lease in self.granted:
                with contextlib.suppress(StoreLeaseExpiredError):
                    self.do(self.store.revoke(lease))
            self.do(self.store.close())
        finally:
            self.loop.close()

    @initialize()
    def start(self) -> None:
        self.check_everything()

    @rule(target=leases)
    def grant(self) -> int:
        lease = self.do(self.store.grant(300)).id
        self.granted.append(lease)
        self.model.grant(lease)
        return lease

    @rule(key=keys, value=values, lease=st.none() | leases)
    def put(self, key: str, value: Any, lease: int | None) -> None:
        self._both(lambda: self.store.put(key, value, lease=lease or 0),
                   lambda: self.model.put(key, value, lease or 0))

    @rule(key=st.sampled_from(KEYS + PREFIXES), prefix=st.booleans())
    def delete(self, key: str, prefix: bool) -> None:
        if not key and not prefix:
            return
        assert self.do(self.store.delete(key, prefix=prefix)) == self.model.delete(key, prefix)

    @rule(data=st.data(), n_compare=st.integers(0, 3), n_ops=st.integers(0, 3))
    def txn(self, data: st.DataObject, n_compare: int, n_ops: int) -> None:
        compare = [self._compare(data) for _ in range(n_compare)]
        ops: list[Op] = []
        for key in data.draw(st.lists(keys, min_size=n_ops, max_size=n_ops, unique=True)):
            if data.draw(st.booleans()):
                lease = data.draw(st.sampled_from([0, *self.granted]))
                ops.append(Put(key, data.draw(values), lease))
            else:
                ops.append(Delete(key))
        ok = self._both(lambda: self.store.txn(compare, ops),
                        lambda: self.model.txn(compare, ops))
        if ok is not None:
            assert ok[0].succeeded == ok[1]
            assert ok[0].revision == self.model.revision

    def _compare(self, data: st.DataObject) -> Compare:
        key = data.draw(keys)
        kind = data.draw(st.sampled_from(["absent", "present", "revision", "value"]))
        if kind == "revision":  # the key's current revision, or a stale one, or 0
            mod = self.model.mod(key)
            operand: Any = data.draw(st.sampled_from([mod, max(0, mod - 1), 0, mod + 1]))
        elif kind == "value":
            kv = self.model.keys.get(key)
            operand = data.draw(st.just(kv.value) if kv and data.draw(st.booleans()) else values)
        else:
            operand = None
        return Compare(key, kind, operand)  # type: ignore[arg-type]

    @rule(items=st.dictionaries(keys, values, min_size=1, max_size=3))
    def reserve(self, items: dict[str, Any]) -> None:
        free = all(self.model.holds(absent(k)) for k in items)
        try:
            self.do(self.store.reserve(items))
            assert free
            self.model.txn([], [Put(k, v) for k, v in items.items()])
        except StoreConflictError as err:
            assert not free
            assert err.context["keys"] == [k for k in items if k in self.model.keys]

    @rule(lease=leases)
    def keepalive(self, lease: int) -> None:
        alive = lease in self.model.leases
        try:
            assert self.do(self.store.keepalive(lease)) > 0 and alive
        except StoreLeaseExpiredError:
            assert not alive

    @rule(lease=leases)
    def revoke(self, lease: int) -> None:
        self._both(lambda: self.store.revoke(lease), lambda: self.model.revoke(lease))

    @rule()
    def replay(self) -> None:
        """A watch from the model's start sees exactly the model's history."""
        want = self.model.events
        if not want:
            return

        async def collect() -> list[Any]:
            async with self.store.watch("", start_revision=self.model.base + 1) as watch:
                return [await asyncio.wait_for(anext(watch), 10) for _ in range(len(want))]

        assert self.do(collect()) == want

    def _both(self, real: Any, model: Any) -> Any:
        """Run both; they raise (a lease gone) or return together."""
        try:
            got = self.do(real())
        except StoreLeaseExpiredError:
            with pytest.raises(LeaseGone):
                model()
            return None
        return got, model()

    @invariant()
    def check_everything(self) -> None:
        listing = self.do(self.store.list(""))
        assert [(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)
                for kv in listing] == self.model.listing("")
        assert listing.revision == self.model.revision


@pytest.mark.parametrize("backend", ["sqlite", "etcd"])
def test_the_store_behaves_as_the_model(backend: str, scratch: Path,
                                        request: pytest.FixtureRequest) -> None:
    counter = itertools.count()
    if backend == "sqlite":
        def url() -> str:
            return f"sqlite:{scratch / f'm{next(counter)}.db'}"
    else:
        server: EtcdServer = request.getfixturevalue("own_etcd")  # no other test's leases

        def url() -> str:
            return server.url(f"m{next(counter)}")

    examples, steps = EXAMPLES[backend]
    machine = type(f"StoreMachine_{backend}", (StoreMachine,), {"url_factory": staticmethod(url)})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
