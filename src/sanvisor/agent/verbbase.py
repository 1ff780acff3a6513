"""What every verb of the agent shares: the domain table, this host's resources,
the lifecycle, the driver, and the state check (model/lifecycle.py's table)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sanvisor.agent.configstore import ConfigStore
from sanvisor.agent.host import HostResources
from sanvisor.agent.life import Lifecycle
from sanvisor.agent.records import DomainRecord
from sanvisor.agent.table import Domain, DomainTable
from sanvisor.drivers.base import Driver, Instance
from sanvisor.errors import ConflictError, HypervisorError
from sanvisor.model import lifecycle
from sanvisor.model.domain import DomainSpec


class VerbBase:
    table: DomainTable
    host: HostResources
    life: Lifecycle
    driver: Driver
    configs: ConfigStore  # managed domains' configs (agent/configstore.py)

    if TYPE_CHECKING:  # from the other parts of HostService (views, create)
        def info(self, dom: Domain) -> dict[str, Any]: ...
        def view(self, dom: Domain) -> dict[str, Any]: ...
        async def start(self, rec: DomainRecord, *, paused: bool = False,
                        incoming_fd: int = -1) -> dict[str, Any]: ...
        async def create(self, spec: DomainSpec, *, paused: bool = False,
                         managed: bool = False) -> dict[str, Any]: ...

    def find(self, ref: str) -> Domain:
        return self.table.find(ref)

    def admit(self, dom: Domain, verb: str) -> Instance:
        """The domain's instance, once ``verb`` is admitted in its state (else a one-line
        refusal naming the state)."""
        lifecycle.check(verb, dom.state, dom.name)
        if dom.inst is None:
            raise HypervisorError(f"domain {dom.name} has no hypervisor process "
                                  f"({dom.record.reason or dom.state.value}); destroy it "
                                  "to clear it", domain=dom.name)
        return dom.inst

    def refuse_registered(self, name: str) -> None:
        """`create` is the unmanaged path: a registered domain is started by `start`."""
        if self.configs.get(name) is not None:
            raise ConflictError(f"domain {name} is registered (managed): start it with "
                                f"'sanvisor start {name}', or 'sanvisor delete {name}' "
                                "first", domain=name)

    def remember(self, dom: Domain) -> None:
        """Write the domain's record (atomically)."""
        self.table.save(dom)
