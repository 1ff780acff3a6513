"""vcpu-list, vcpu-pin, sched-credit: where a domain's vCPUs run, and its share.

Pins and the weight/cap are kept in the domain's record, so a save file, a restore
and an incoming migration carry them (the driver applies them at start, on the
CPUs the host has: drivers/qemu/extras.py, drivers/xen/extras.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

from sanvisor.agent.table import Domain
from sanvisor.agent.verbbase import VerbBase
from sanvisor.drivers.base import VcpuInfo
from sanvisor.errors import ConflictError, UsageError
from sanvisor.model import lifecycle
from sanvisor.model.cpulist import affinity_text, format_cpus, parse_cpus
from sanvisor.model.domain import State
from sanvisor.model.lifecycle import Busy
from sanvisor.model.sched import Credit


def vcpu_state(v: VcpuInfo, paused: bool) -> str:
    """xm's State column: r-- running, -b- blocked (waiting), --p offline; --- when the
    whole domain is paused."""
    if not v.online:
        return "--p"
    if paused:
        return "---"
    return "r--" if v.running else "-b-"


class CpuVerbs(VerbBase):
    async def vcpu_list(self, ref: str | None) -> list[dict[str, Any]]:
        """xm vcpu-list: one row per vCPU of the domain (of every live one without
        ``ref``): VCPU, CPU, State, Time(s), CPU Affinity."""
        doms = ([self.find(ref)] if ref else  # (not one arriving or leaving by migration)
                sorted((d for d in self.table if d.state in lifecycle.LIVE
                        and d.inst is not None and d.busy is Busy.NONE),
                       key=lambda d: d.record.domid))
        ncpus = await asyncio.to_thread(self.driver.host_cpus)
        rows: list[dict[str, Any]] = []
        for dom in doms:
            inst = self.admit(dom, "vcpu-list")
            paused = dom.state is State.PAUSED
            for v in await inst.vcpu_info():
                v.online = v.online and v.vcpu < (dom.record.vcpus or dom.record.spec.vcpus)
                rows.append({"name": dom.name, "domid": dom.record.domid, "vcpu": v.vcpu,
                             "cpu": v.cpu if v.online else None,
                             "state": vcpu_state(v, paused), "seconds": v.seconds,
                             "affinity": v.affinity,
                             "affinity_text": affinity_text(v.affinity, ncpus),
                             "pinned": dom.record.vcpu_pins.get(str(v.vcpu))})
        return rows

    async def vcpu_pin(self, ref: str, vcpu: str, cpus: str) -> list[dict[str, Any]]:
        """xm vcpu-pin DOM VCPU|all CPUS: the vCPU's thread (QEMU) or xl's pin, now and
        after a save, restore or migration (on the CPUs the host then has)."""
        dom = self.find(ref)
        spec = dom.record.spec
        if vcpu == "all":
            which = list(range(spec.maxvcpus))
        elif vcpu.isdigit() and int(vcpu) < spec.maxvcpus:
            which = [int(vcpu)]
        else:
            raise ConflictError(f"vcpu-pin: vCPU {vcpu!r} is not one of {dom.name}'s "
                                f"(0..{spec.maxvcpus - 1}, or all)", domain=dom.name)
        ncpus = await asyncio.to_thread(self.driver.host_cpus)
        try:
            chosen = sorted(parse_cpus(cpus, ncpus, what="cpus"))
        except ValueError as exc:
            raise ConflictError(f"vcpu-pin: {exc}", domain=dom.name) from None
        async with dom.lock:
            inst = self.admit(dom, "vcpu-pin")
            for v in which:
                await inst.pin_vcpu(v, chosen)
                if len(chosen) == ncpus:
                    dom.record.vcpu_pins.pop(str(v), None)  # every CPU: not pinned
                else:
                    dom.record.vcpu_pins[str(v)] = chosen
            self.remember(dom)
        return await self.vcpu_list(dom.record.uuid)

    async def sched_credit(self, ref: str | None, weight: int | None = None,
                           cap: int | None = None) -> list[dict[str, Any]]:
        """xm sched-credit [-d DOM [-w WEIGHT] [-c CAP]]: show, or set, weights and caps."""
        if ref is None:
            if weight is not None or cap is not None:
                raise UsageError("sched-credit: -w and -c need -d DOM")
            return [await self._credit_row(d) for d in
                    sorted(self.table, key=lambda d: d.record.domid)]
        dom = self.find(ref)
        if weight is None and cap is None:
            return [await self._credit_row(dom)]
        async with dom.lock:
            inst = self.admit(dom, "sched-credit")
            now = Credit(**dom.record.credit) if dom.record.credit else Credit()
            new = Credit(weight if weight is not None else now.weight,
                         cap if cap is not None else now.cap)
            try:
                new.check(maxvcpus=dom.record.spec.maxvcpus)
            except ValueError as exc:
                raise ConflictError(f"sched-credit: {exc}", domain=dom.name) from None
            await inst.set_credit(new.weight, new.cap)
            dom.record.credit = {} if new.is_default else new.to_dict()
            self.remember(dom)
        return [await self._credit_row(dom)]

    async def _credit_row(self, dom: Domain) -> dict[str, Any]:
        """The weight and cap as the hypervisor holds them (xl), else as recorded."""
        c = Credit(**dom.record.credit) if dom.record.credit else Credit()
        held = None
        if dom.inst is not None and dom.state in lifecycle.LIVE:
            held = await dom.inst.credit()
        weight, cap = held if held is not None else (c.weight, c.cap)
        return {"name": dom.name, "domid": dom.record.domid, "weight": weight, "cap": cap}


def pins_text(pins: dict[str, list[int]]) -> dict[str, str]:
    """A record's pins as CPU lists (list -l)."""
    return {v: format_cpus(c) for v, c in sorted(pins.items(), key=lambda x: int(x[0]))}
