"""This host's agent core, put together: the domain table, what the host gives a
domain, and the lifecycle that turns the driver's news into state.

    table  agent/table.py  the domains, by uuid; the registry (ids, MACs, uuids)
    host   agent/host.py   boot files, disk/memory checks, NICs and their taps
    life   agent/life.py   events -> state (model/lifecycle.py), on_* actions,
                           reattach after a restart, teardown
"""

from __future__ import annotations

from sanvisor.agent.host import HostResources, Kit
from sanvisor.agent.life import Lifecycle
from sanvisor.agent.network import Network
from sanvisor.agent.table import DomainTable
from sanvisor.drivers.base import Driver
from sanvisor.paths import Layout

TYPE_CHECKING = False
if TYPE_CHECKING:
    from sanvisor.storage.multipathd import Multipathd


class Manager:
    def __init__(self, layout: Layout, driver: Driver, network: Network | None = None,
                 kit: Kit | None = None, mapper: Multipathd | None = None,
                 kit_args: str | None = None) -> None:
        self.layout = layout
        self.driver = driver
        self.table = DomainTable(layout)
        self.host = HostResources(self.table, driver, network or Network(), kit, mapper,
                                  kit_args)
        self.life = Lifecycle(self.table, self.host, driver)

    async def start(self) -> None:
        """Find the domains of the records again (after an agent restart)."""
        await self.life.start()

    async def stop(self) -> None:
        """Let go of every domain without stopping it."""
        await self.life.stop()
