"""mem-set, mem-max, vcpu-set: a running domain's memory and vCPUs."""

from __future__ import annotations

from typing import Any

from sanvisor.agent.plan import Plan
from sanvisor.agent.records import DomainRecord
from sanvisor.agent.verbbase import VerbBase
from sanvisor.errors import ConflictError
from sanvisor.model.units import align_up

MIN_GUEST_MIB = 64


class ResizeVerbs(VerbBase):
    def ceiling(self, rec: DomainRecord) -> int:
        """The most memory the domain can have without a restart (hot-plug range)."""
        extra = max(0, rec.spec.maxmem - rec.spec.memory)
        return rec.spec.memory + align_up(extra, self.driver.memory_block_mib)

    async def mem_set(self, ref: str, mib: int) -> dict[str, Any]:
        """The balloon target; above the memory plugged now (and up to maxmem), memory
        is hot-plugged first in the driver's blocks."""
        dom = self.find(ref)
        rec = dom.record
        async with dom.lock, Plan("mem-set", dom.name) as plan:
            inst = self.admit(dom, "mem-set")
            if mib < MIN_GUEST_MIB:
                raise ConflictError(f"mem-set: {mib} MiB is too little for a guest "
                                    f"({MIN_GUEST_MIB} MiB min)", domain=dom.name)
            if mib > rec.max_mib:
                raise ConflictError(f"mem-set: {mib} MiB is above the domain's maximum "
                                    f"({rec.max_mib} MiB; see mem-max)", domain=dom.name)
            plugged = rec.spec.memory + sum(rec.dimms_mib)
            if mib > plugged:
                grow = align_up(mib - plugged, self.driver.memory_block_mib)
                if plugged + grow > self.ceiling(rec) or rec.spec.maxmem <= rec.spec.memory:
                    raise ConflictError(f"mem-set: cannot grow {dom.name} to {mib} MiB: it "
                                        f"booted with maxmem={rec.spec.maxmem} MiB",
                                        domain=dom.name)
                self.host.check_memory(grow)
                plan.check(f"{grow} MiB free on the host")
                await inst.add_memory(grow, len(rec.dimms_mib))
                rec.dimms_mib.append(grow)  # plugged for good: the record says so now
                self.remember(dom)
                plan.did(f"{grow} MiB hot-plugged")
            await inst.set_balloon(mib)
            rec.target_mib = mib
            self.remember(dom)
        return self.view(dom)

    async def mem_max(self, ref: str, mib: int) -> dict[str, Any]:
        dom = self.find(ref)
        rec = dom.record
        async with dom.lock:
            inst = self.admit(dom, "mem-max")
            ceiling = self.ceiling(rec)
            if mib > ceiling:
                raise ConflictError(
                    f"mem-max: {mib} MiB is above what {dom.name} can reach without a restart "
                    f"({ceiling} MiB: QEMU fixes the hot-pluggable range at boot from maxmem)",
                    domain=dom.name)
            if mib < MIN_GUEST_MIB:
                raise ConflictError(f"mem-max: {mib} MiB is too little for a guest "
                                    f"({MIN_GUEST_MIB} MiB min)", domain=dom.name)
            if rec.target_mib > mib:
                await inst.set_balloon(mib)
                rec.target_mib = mib
            rec.max_mib = mib
            self.remember(dom)
        return self.view(dom)

    async def vcpu_set(self, ref: str, count: int) -> dict[str, Any]:
        dom = self.find(ref)
        rec = dom.record
        async with dom.lock:
            inst = self.admit(dom, "vcpu-set")
            if not 1 <= count <= rec.spec.maxvcpus:
                raise ConflictError(f"vcpu-set: {count} is outside 1..{rec.spec.maxvcpus} "
                                    "(maxvcpus)", domain=dom.name)
            rec.vcpus_present = await inst.set_vcpus(count)
            rec.vcpus = count
            self.remember(dom)
        return self.view(dom)
