"""The agent's verbs, as the API calls them: one object, one home per verb family.

Each verb checks its prerequisites without side effects (the domain's state against
model/lifecycle.py's table, then what it needs of the host), then acts in steps
whose undo is registered in a Plan (agent/plan.py): a failed verb leaves nothing
behind. The families live in their own modules:

    create.py   create, create -n, and the start every new domain goes through
    power.py    pause, unpause, shutdown, reboot, destroy
    resize.py   mem-set, mem-max, vcpu-set
    devices.py  block-/network-attach and -detach
    saving.py   save, restore
    views.py    list, info, top, Domain-0
    cpus.py     vcpu-list, vcpu-pin, sched-credit
    diag.py     dump-core, sysrq, trigger, rename, dmesg, log, console history
    managed.py  new, start, delete (configs behind configstore.py), autostart
    devrows.py  block-list and network-list in xm's columns
"""

from __future__ import annotations

import os

from sanvisor.agent.configstore import ConfigStore, HostConfigStore
from sanvisor.agent.cpus import CpuVerbs
from sanvisor.agent.create import CreateVerbs
from sanvisor.agent.devices import DeviceVerbs
from sanvisor.agent.devrows import DeviceRows
from sanvisor.agent.diag import DiagVerbs
from sanvisor.agent.managed import ManagedVerbs
from sanvisor.agent.manager import Manager
from sanvisor.agent.power import PowerVerbs
from sanvisor.agent.resize import ResizeVerbs
from sanvisor.agent.saving import SaveVerbs
from sanvisor.agent.views import Views


class HostService(Views, CreateVerbs, PowerVerbs, ResizeVerbs, DeviceVerbs, SaveVerbs,
                  CpuVerbs, DiagVerbs, ManagedVerbs, DeviceRows):
    def __init__(self, manager: Manager, host_name: str | None = None,
                 configs: ConfigStore | None = None) -> None:
        """``configs``: where managed domains' configs live (default: this host's,
        <home>/managed; the pool's state store can stand there instead)."""
        self.m = manager
        self.configs = configs or HostConfigStore(manager.layout.home / "managed")
        manager.life.gone_hooks.append(self.domain_gone)
        self.table = manager.table
        self.host = manager.host
        self.life = manager.life
        self.driver = manager.driver
        self.host_name = host_name or os.uname().nodename
