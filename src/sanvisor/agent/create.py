"""create, create -n (preview) and the start every new domain goes through
(restore and incoming migrations included)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from sanvisor.agent.plan import Plan
from sanvisor.agent.records import DomainRecord
from sanvisor.agent.table import Domain
from sanvisor.agent.verbbase import VerbBase
from sanvisor.agent.views import nic_bridge
from sanvisor.drivers.base import Instance
from sanvisor.errors import HypervisorError
from sanvisor.model.domain import DomainSpec, State

log = logging.getLogger("sanvisor.agent")


class CreateVerbs(VerbBase):
    def plan_create(self, spec: DomainSpec, *, paused: bool, dry: bool) -> DomainRecord:
        """Every check of create, in order; the record of the domain that would start.
        ``dry`` (create -n): nothing is remembered (MACs, uuid, domain id)."""
        spec.validate()
        uuid = self.table.registry.uuid_for(spec.name, spec.uuid, dry=True)
        self.table.check_free(spec.name, uuid, [])
        kernel, initrd = self.host.boot_files(spec)
        self.host.check_disks(spec)
        self.host.check_memory(spec.memory)
        nics = self.host.plan_nics(spec.name, spec.vifs, dry=dry)
        spec.uuid = self.table.registry.uuid_for(spec.name, spec.uuid, dry=dry)
        return DomainRecord(uuid=spec.uuid, domid=self.table.registry.next_domid(dry=dry),
                            spec=spec, nics=nics, kernel=kernel, initrd=initrd,
                            cmdline=self.host.cmdline(spec, nics), target_mib=spec.memory,
                            max_mib=spec.maxmem, vcpus=spec.vcpus,
                            state=State.PAUSED if paused else State.RUNNING)

    async def create(self, spec: DomainSpec, *, paused: bool = False,
                     managed: bool = False) -> dict[str, Any]:
        """``managed``: started by `start` from its registered config (agent/managed.py);
        otherwise a registered name is refused (create is the unmanaged path)."""
        if not managed:
            self.refuse_registered(spec.name)
        with self.table.registry.batch():  # one registry write for uuid, id and MACs
            rec = self.plan_create(spec, paused=paused, dry=False)
        return await self.start(rec, paused=paused)

    async def preview(self, spec: DomainSpec) -> dict[str, Any]:
        """create -n: run every check create runs; show the domain that would start (its
        kernel and initrd, each disk's backend, the MACs it would get); start nothing."""
        self.refuse_registered(spec.name)
        rec = self.plan_create(spec, paused=False, dry=True)
        remote = self.host.remote
        out = rec.to_dict()
        out["disks"] = []
        for d in spec.disks:
            sock = self.host.mapped(d.path)
            via = (f"multipath map {d.path.removeprefix('/dev/mapper/')} (NBD {sock})"
                   if sock else f"{d.backend}:{d.path}" if d.path else "empty")
            out["disks"].append({**vars(d), "via": via})
        out["nics"] = []
        for n in rec.nics:
            bridge = nic_bridge(n) if remote or n.vif.type != "user" else None
            out["nics"].append({"index": n.index, "mac": n.mac, "type": n.vif.type,
                                "bridge": bridge, "ip": n.vif.ip,
                                "bridge_exists": bridge is not None and not remote
                                and Path("/sys/class/net", bridge).exists()})
        out["driver"] = self.driver.name
        out["accelerator"] = self.driver.accelerator()["accel"]
        return out

    async def start(self, rec: DomainRecord, *, paused: bool = False,
                    incoming_fd: int = -1) -> dict[str, Any]:
        """Start a planned domain (or restore one from ``incoming_fd``). Its name, uuid
        and MACs are taken in the table before the first await: a concurrent create or
        restore of any of them is refused (the checks and this run without yielding)."""
        rundir = self.table.layout.domain_dir(rec.uuid)
        shutil.rmtree(rundir, ignore_errors=True)
        dom = Domain(rec)
        self.table.add(dom)
        async with dom.lock, Plan("start", rec.spec.name) as plan:
            plan.did("name, uuid and MACs taken", lambda: self.life.teardown(dom))
            if self.table.pool is not None:  # and in the pool: it runs nowhere else
                await self.table.pool.claim(rec.spec.name, rec.uuid)
                plan.did("owned in the pool")  # teardown gives it up
            self.host.plumb(rec.domid, rec.nics)
            plan.did("taps plugged")  # teardown unplugs them
            launch = self.host.launch_plan(rec, incoming=incoming_fd >= 0, paused=paused)
            inst = await self.driver.launch(launch, self.life.sink(dom))
            dom.inst = inst
            rec.pid = inst.pid
            self.remember(dom)
            plan.did(f"{self.driver.name} process {inst.pid} started")
            if incoming_fd >= 0:
                await inst.restore_from(incoming_fd)
                rec.pid = inst.pid  # a Xen domain's id is known once restored
                self.remember(dom)
                plan.did("state restored")
                if not paused:
                    await inst.unpause()
            elif not paused:
                await self._check_alive(dom, inst)
                plan.did("the guest showed a sign of life")
            plan.commit()
        log.info("%s: started (id %d, %s %d)%s", rec.spec.name, rec.domid, self.driver.name,
                 rec.pid, ", restored" if incoming_fd >= 0 else "")
        return self.info(dom)

    async def _check_alive(self, dom: Domain, inst: Instance) -> None:
        """A guest that never leaves its firmware (an unusable accelerator) is refused,
        not reported as started."""
        stuck = await inst.wait_alive(self.driver.life_timeout)
        if stuck is not None:
            acc = self.driver.accelerator()
            raise HypervisorError(
                f"{dom.name} showed no sign of life within {self.driver.life_timeout:g} s "
                f"under {acc['accel']}: {stuck}; it was destroyed (accelerator "
                f"{acc['accel']}: {acc['reason']})", domain=dom.name, accelerator=acc)
