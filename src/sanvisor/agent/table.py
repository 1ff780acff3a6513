"""The agent's domain table: every domain of this host, by uuid, and the host
registry (domain ids, and the MAC and uuid each name was given).

Each domain has a lock: verbs on one domain run one at a time, verbs on different
domains in parallel. A domain enters the table before its hypervisor process
starts (so a second create of the name, uuid or MAC is refused at once) and
leaves it when it is torn down.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sanvisor.agent.records import DomainRecord, Registry
from sanvisor.drivers.base import Instance
from sanvisor.errors import ConflictError, NotFoundError, TimeoutError_
from sanvisor.model.domain import State
from sanvisor.model.lifecycle import Busy
from sanvisor.paths import Layout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from sanvisor.agent.membership import Membership


@dataclass
class Domain:
    record: DomainRecord
    inst: Instance | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    busy: Busy = Busy.NONE
    reboot_pending: bool = False

    @property
    def name(self) -> str:
        return self.record.spec.name

    @property
    def state(self) -> State:
        return self.record.state


@dataclass
class Reservation:
    name: str
    macs: list[str]
    why: str  # "arriving by migration"


class DomainTable:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.registry = Registry(layout.registry)
        self.domains: dict[str, Domain] = {}  # by uuid
        self.reserved: dict[str, Reservation] = {}  # by uuid: not in the table yet
        #: this host in the pool's store (agent/membership.py); None outside a pool
        self.pool: Membership | None = None

    def __iter__(self) -> Iterator[Domain]:
        return iter(list(self.domains.values()))

    def __len__(self) -> int:
        return len(self.domains)

    def __contains__(self, dom: object) -> bool:
        return isinstance(dom, Domain) and self.domains.get(dom.record.uuid) is dom

    def find(self, ref: str) -> Domain:
        """By name, uuid or domain id."""
        for dom in self.domains.values():
            if ref in (dom.name, dom.record.uuid) or ref == str(dom.record.domid):
                return dom
        raise NotFoundError(f"domain {ref!r} does not exist", domain=ref)

    def by_name(self, name: str) -> Domain | None:
        return next((d for d in self.domains.values() if d.name == name), None)

    def live_macs(self) -> dict[str, str]:
        """MAC -> domain name, for every NIC of every domain in the table (and of the
        domains reserved: arriving by migration)."""
        macs = {m: r.name for r in self.reserved.values() for m in r.macs}
        macs.update({n.mac: d.name for d in self.domains.values() for n in d.record.nics})
        return macs

    def check_free(self, name: str, uuid: str, macs: list[str]) -> None:
        """Refuse a domain whose name, uuid or a MAC is taken here (by a domain or a
        reservation)."""
        if (other := self.by_name(name)) is not None:
            raise ConflictError(f"domain {name} already exists (id {other.record.domid}, "
                                f"{other.state.value})", domain=name)
        if uuid in self.domains:
            raise ConflictError(f"uuid {uuid} is already used by "
                                f"{self.domains[uuid].name}", uuid=uuid)
        for r_uuid, r in self.reserved.items():
            if r.name == name or r_uuid == uuid:
                raise ConflictError(f"domain {name} ({uuid}) is {r.why} on this host",
                                    domain=name)
        live = self.live_macs()
        for mac in macs:
            if mac in live:
                raise ConflictError(f"MAC {mac} is in use by {live[mac]}", mac=mac)

    def reserve(self, uuid: str, name: str, macs: list[str], why: str) -> None:
        """Hold a name, uuid and MACs for a domain that is not in the table yet."""
        self.reserved[uuid] = Reservation(name, list(macs), why)

    def release(self, uuid: str) -> None:
        self.reserved.pop(uuid, None)

    def add(self, dom: Domain) -> None:
        self.domains[dom.record.uuid] = dom

    def remove(self, dom: Domain) -> None:
        if self.domains.get(dom.record.uuid) is dom:
            del self.domains[dom.record.uuid]

    def rundir(self, dom: Domain) -> Path:
        return self.layout.domain_dir(dom.record.uuid)

    def save(self, dom: Domain) -> None:
        """Write the domain's record (atomically) if it is still in the table."""
        if dom in self:
            dom.record.save(self.layout.domain_dir(dom.record.uuid))

    def set_state(self, dom: Domain, state: State, reason: str = "") -> None:
        dom.record.state, dom.record.reason = state, reason
        self.save(dom)

        async def notify() -> None:
            async with dom.changed:
                dom.changed.notify_all()

        with contextlib.suppress(RuntimeError):  # no loop: nobody can be waiting
            asyncio.get_running_loop().create_task(notify())

    async def wait_for(self, dom: Domain, done: Callable[[], bool], timeout: float,
                       what: str) -> None:
        """Wait until ``done()`` (checked at each state change), or fail saying ``what``."""
        deadline = time.monotonic() + timeout
        async with dom.changed:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError_(f"{dom.name}: {what} within {timeout:.0f}s",
                                        domain=dom.name)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(dom.changed.wait(), left)
