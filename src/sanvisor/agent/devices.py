"""block-attach/-detach, network-attach/-detach: disks and NICs of a running domain."""

from __future__ import annotations

import contextlib
from typing import Any

from sanvisor.agent.plan import Plan
from sanvisor.agent.verbbase import VerbBase
from sanvisor.agent.views import nic_bridge
from sanvisor.drivers.base import NicPlan
from sanvisor.errors import ConfigError, ConflictError, DeviceError, UsageError
from sanvisor.model.config import parse_disk, parse_vif
from sanvisor.model.domain import DomainSpec


class DeviceVerbs(VerbBase):
    async def block_attach(self, ref: str, spec_text: str) -> dict[str, Any]:
        dom = self.find(ref)
        try:
            disk = parse_disk(spec_text)
        except ValueError as exc:
            raise UsageError(f"block-attach: {exc}") from exc
        async with dom.lock:
            inst = self.admit(dom, "block-attach")
            if any(d.target == disk.target for d in dom.record.spec.disks):
                raise DeviceError(f"{dom.name} already has a disk {disk.target}",
                                  domain=dom.name, target=disk.target)
            whole = DomainSpec(name=dom.name, disks=[*dom.record.spec.disks, disk])
            try:  # the config's rules: sda beside xvda, xvda beside xvda1 are one disk
                whole.validate()
            except ConfigError as exc:
                raise DeviceError(f"block-attach: {exc}", domain=dom.name,
                                  target=disk.target) from exc
            self.host.check_disks(DomainSpec(name=dom.name, disks=[disk],
                                             source="block-attach"))
            sock = self.host.mapped(disk.path)
            await inst.attach_disk(disk, len(dom.record.spec.disks),
                                   str(sock) if sock else None)
            dom.record.spec.disks.append(disk)
            self.remember(dom)
        return self.view(dom)

    async def block_detach(self, ref: str, target: str) -> dict[str, Any]:
        dom = self.find(ref)
        name = target.removeprefix("/dev/")
        async with dom.lock:
            inst = self.admit(dom, "block-detach")
            disk = next((d for d in dom.record.spec.disks if d.target == name), None)
            if disk is None:
                raise DeviceError(f"{dom.name} has no disk {name}", domain=dom.name,
                                  target=name)
            await inst.detach_disk(disk)
            dom.record.spec.disks.remove(disk)
            self.remember(dom)
        return self.view(dom)

    async def network_attach(self, ref: str, spec_text: str) -> dict[str, Any]:
        dom = self.find(ref)
        try:
            vif = parse_vif(spec_text)
        except ValueError as exc:
            raise UsageError(f"network-attach: {exc}") from exc
        async with dom.lock, Plan("network-attach", dom.name) as plan:
            inst = self.admit(dom, "network-attach")
            if vif.mac and (same := next((n for n in dom.record.nics if n.mac == vif.mac),
                                         None)):
                raise ConflictError(f"network-attach: {dom.name} already has MAC {vif.mac} "
                                    f"(NIC {same.index})", domain=dom.name, mac=vif.mac)
            index = max((n.index for n in dom.record.nics), default=-1) + 1
            nics = self.host.plan_nics(dom.name, [vif], start=index)
            plan.check(f"MAC {nics[0].mac} free")
            self.host.plumb(dom.record.domid, nics)
            plan.did("tap created", lambda: self.host.unplumb(nics))
            await inst.attach_nic(nics[0])
            plan.did("NIC plugged into the guest")
            dom.record.nics.append(nics[0])
            dom.record.spec.vifs.append(vif)
            self.remember(dom)
            plan.commit()
        warnings = [f"network-attach: vif key {k!r} is not used by sanvisor (kept)"
                    for k in vif.extra]
        return {"index": index, "mac": nics[0].mac, "tap": nics[0].tap,
                "bridge": nic_bridge(nics[0]), "warnings": warnings}

    async def network_detach(self, ref: str, which: str) -> dict[str, Any]:
        dom = self.find(ref)
        async with dom.lock:
            inst = self.admit(dom, "network-detach")
            nic: NicPlan | None = next(
                (n for n in dom.record.nics if which in (str(n.index), n.mac)), None)
            if nic is None:
                raise DeviceError(f"{dom.name} has no network device {which}",
                                  domain=dom.name)
            await inst.detach_nic(nic)
            self.host.unplumb([nic])
            dom.record.nics.remove(nic)
            with contextlib.suppress(ValueError):
                dom.record.spec.vifs.remove(nic.vif)
            self.remember(dom)
        return self.view(dom)
