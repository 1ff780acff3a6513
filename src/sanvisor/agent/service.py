"""The verbs, as the agent runs them: check everything first, then act.

Each verb checks its prerequisites without side effects, then executes; when
execution fails half-way, what was done is undone, so a failed verb leaves
nothing behind (no process, no tap, no record).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

from sanvisor.agent import savefile
from sanvisor.agent.manager import Domain, Manager
from sanvisor.agent.records import DomainRecord
from sanvisor.agent.views import Views, nic_bridge
from sanvisor.drivers.base import NicPlan
from sanvisor.errors import (
    ConfigError,
    ConflictError,
    DeviceError,
    HypervisorError,
    UsageError,
)
from sanvisor.model.config import parse_disk, parse_vif
from sanvisor.model.domain import DomainSpec, State


class HostService(Views):
    def __init__(self, manager: Manager, host_name: str | None = None) -> None:
        self.m = manager
        self.host_name = host_name or os.uname().nodename

    # ---- create / destroy --------------------------------------------------------------
    def _plan_create(self, spec: DomainSpec, *, paused: bool, dry: bool) -> DomainRecord:
        """Every check of create, in order; the record of the domain that would start.
        ``dry`` (create -n): nothing is remembered (MACs, uuid, domain id)."""
        m = self.m
        spec.validate()
        if (other := m.by_name(spec.name)) is not None:
            raise ConflictError(f"domain {spec.name} already exists (id {other.record.domid}, "
                                f"{other.record.state.value})", domain=spec.name)
        kernel, initrd = m._boot_files(spec)
        m.check_disks(spec)
        m.check_memory(spec.memory)
        nics = m.plan_nics(spec.name, spec.vifs, dry=dry)
        spec.uuid = m.registry.uuid_for(spec.name, spec.uuid, dry=dry)
        if spec.uuid in m.domains:
            raise ConflictError(f"uuid {spec.uuid} is already used by "
                                f"{m.domains[spec.uuid].name}", uuid=spec.uuid)
        return DomainRecord(uuid=spec.uuid, domid=m.registry.next_domid(dry=dry), spec=spec,
                            nics=nics, kernel=kernel, initrd=initrd,
                            cmdline=m.cmdline(spec, nics, m.kit_args,
                                              m.driver.console_device),
                            target_mib=spec.memory, max_mib=spec.maxmem, vcpus=spec.vcpus,
                            state=State.PAUSED if paused else State.RUNNING)

    async def create(self, spec: DomainSpec, *, paused: bool = False) -> dict[str, Any]:
        rec = self._plan_create(spec, paused=paused, dry=False)
        return await self._start(rec, paused=paused)

    async def preview(self, spec: DomainSpec) -> dict[str, Any]:
        """create -n: run every check create runs; show the domain that would start (its
        kernel and initrd, each disk's backend, the MACs it would get); start nothing."""
        rec = self._plan_create(spec, paused=False, dry=True)
        out = rec.to_dict()
        out["disks"] = []
        for d in spec.disks:
            sock = self.m.mapped(d.path)
            via = (f"multipath map {d.path.removeprefix('/dev/mapper/')} (NBD {sock})"
                   if sock else f"{d.backend}:{d.path}" if d.path else "empty")
            out["disks"].append({**vars(d), "via": via})
        out["nics"] = []
        for n in rec.nics:
            bridge = nic_bridge(n) if self.m.remote or n.vif.type != "user" else None
            out["nics"].append({"index": n.index, "mac": n.mac, "type": n.vif.type,
                                "bridge": bridge, "ip": n.vif.ip,
                                "bridge_exists": bridge is not None and self.m.remote is False
                                and Path("/sys/class/net", bridge).exists()})
        out["driver"] = self.m.driver.name
        out["accelerator"] = self.m.driver.accelerator()["accel"]
        return out

    async def _start(self, rec: DomainRecord, *, paused: bool = False, incoming_fd: int = -1,
                     ) -> dict[str, Any]:
        m = self.m
        rundir = m.layout.domain_dir(rec.uuid)
        shutil.rmtree(rundir, ignore_errors=True)
        dom = Domain(rec)
        # reserved before the first await: a concurrent create/restore of the same name,
        # uuid or MAC now sees it (the checks and this line run without yielding)
        m.domains[rec.uuid] = dom
        async with dom.lock:
            try:
                m.plumb(rec.domid, rec.nics)
                plan = m._plan(rec, incoming=incoming_fd >= 0, paused=paused)
                inst = await m.driver.launch(plan, m._sink(dom))
                dom.inst = inst
                rec.pid = inst.pid
                rec.save(rundir)
                if incoming_fd < 0 and not paused:
                    await self._check_alive(dom, inst)
                if incoming_fd >= 0:
                    await inst.restore_from(incoming_fd)
                    rec.pid = inst.pid  # a Xen domain's id is known once restored
                    rec.save(rundir)
                    if not paused:
                        await inst.unpause()
            except BaseException:
                await m.teardown(dom)
                raise
        return self.info(dom)

    async def _check_alive(self, dom: Domain, inst: Any) -> None:
        """A guest that never leaves its firmware (an unusable accelerator) is refused,
        not reported as started."""
        driver = self.m.driver
        stuck = await inst.wait_alive(driver.life_timeout)
        if stuck is not None:
            acc = driver.accelerator()
            raise HypervisorError(
                f"{dom.name} showed no sign of life within {driver.life_timeout:g} s under "
                f"{acc['accel']}: {stuck}; it was destroyed (accelerator {acc['accel']}: "
                f"{acc['reason']})", domain=dom.name, accelerator=acc)

    async def destroy(self, ref: str) -> None:
        dom = self.m.find(ref)
        async with dom.lock:
            await self.m.teardown(dom)

    # ---- run state -----------------------------------------------------------------------
    def _live(self, dom: Domain) -> Any:
        if dom.inst is None or dom.record.state is State.LOST:
            raise HypervisorError(f"domain {dom.name} is not running "
                                  f"({dom.record.reason or dom.record.state.value}); "
                                  "destroy it to clear it", domain=dom.name)
        return dom.inst

    async def pause(self, ref: str) -> None:
        dom = self.m.find(ref)
        async with dom.lock:
            await self._live(dom).pause()
            self.m._set_state(dom, State.PAUSED)

    async def unpause(self, ref: str) -> None:
        dom = self.m.find(ref)
        async with dom.lock:
            if dom.record.state is not State.PAUSED:
                raise ConflictError(f"domain {dom.name} is not paused "
                                    f"({dom.record.state.value})", domain=dom.name)
            await self._live(dom).unpause()
            self.m._set_state(dom, State.RUNNING)

    async def shutdown(self, ref: str, *, wait: bool, timeout: float) -> None:
        dom = self.m.find(ref)
        async with dom.lock:
            await self._live(dom).powerdown()
        if wait:
            await self.m.wait_for(
                dom, lambda: dom.record.uuid not in self.m.domains
                or dom.record.state in (State.SHUTDOWN, State.CRASHED, State.LOST),
                timeout, "the guest did not shut down (it may ignore the ACPI power button)")

    async def reboot(self, ref: str) -> None:
        """A clean reboot: the guest shuts down on the ACPI power button (running its
        shutdown scripts), and the agent powers it on again instead of stopping it."""
        dom = self.m.find(ref)
        async with dom.lock:
            inst = self._live(dom)
            if await inst.reboot():
                return
            dom.reboot_pending = True
            await inst.powerdown()

    # ---- memory and vCPUs -------------------------------------------------------------
    async def mem_set(self, ref: str, mib: int) -> None:
        dom = self.m.find(ref)
        rec = dom.record
        async with dom.lock:
            inst = self._live(dom)
            if mib < 64:
                raise ConflictError(f"mem-set: {mib} MiB is too little for a guest "
                                    "(64 MiB min)", domain=dom.name)
            if mib > rec.max_mib:
                raise ConflictError(f"mem-set: {mib} MiB is above the domain's maximum "
                                    f"({rec.max_mib} MiB; see mem-max)", domain=dom.name)
            plugged = rec.spec.memory + sum(rec.dimms_mib)
            if mib > plugged:
                block = self.m.driver.memory_block_mib
                grow = _align_up(mib - plugged, block)
                if plugged + grow > self._ceiling(rec) or rec.spec.maxmem <= rec.spec.memory:
                    raise ConflictError(f"mem-set: cannot grow {dom.name} to {mib} MiB: it "
                                        f"booted with maxmem={rec.spec.maxmem} MiB",
                                        domain=dom.name)
                self.m.check_memory(grow)
                await inst.add_memory(grow, len(rec.dimms_mib))
                rec.dimms_mib.append(grow)
            await inst.set_balloon(mib)
            rec.target_mib = mib
            rec.save(self.m.layout.domain_dir(rec.uuid))

    def _ceiling(self, rec: DomainRecord) -> int:
        """The most memory the domain can have without a restart (hot-plug range)."""
        extra = max(0, rec.spec.maxmem - rec.spec.memory)
        return rec.spec.memory + _align_up(extra, self.m.driver.memory_block_mib)

    async def mem_max(self, ref: str, mib: int) -> None:
        dom = self.m.find(ref)
        rec = dom.record
        async with dom.lock:
            self._live(dom)
            ceiling = self._ceiling(rec)
            if mib > ceiling:
                raise ConflictError(
                    f"mem-max: {mib} MiB is above what {dom.name} can reach without a restart "
                    f"({ceiling} MiB: QEMU fixes the hot-pluggable range at boot from maxmem)",
                    domain=dom.name)
            if mib < 64:
                raise ConflictError(f"mem-max: {mib} MiB is too little for a guest "
                                    "(64 MiB min)", domain=dom.name)
            rec.max_mib = mib
            if rec.target_mib > mib:
                await self._live(dom).set_balloon(mib)
                rec.target_mib = mib
            rec.save(self.m.layout.domain_dir(rec.uuid))

    async def vcpu_set(self, ref: str, count: int) -> None:
        dom = self.m.find(ref)
        rec = dom.record
        async with dom.lock:
            inst = self._live(dom)
            if not 1 <= count <= rec.spec.maxvcpus:
                raise ConflictError(f"vcpu-set: {count} is outside 1..{rec.spec.maxvcpus} "
                                    "(maxvcpus)", domain=dom.name)
            rec.vcpus_present = await inst.set_vcpus(count)
            rec.vcpus = count
            rec.save(self.m.layout.domain_dir(rec.uuid))

    # ---- save / restore ---------------------------------------------------------------
    async def save(self, ref: str, path: str) -> None:
        dom = self.m.find(ref)
        target = Path(path)
        if not target.parent.is_dir():
            raise ConfigError(f"save: {target.parent}: no such directory", path=path)
        if target.is_dir():
            raise ConfigError(f"save: {path} is a directory", path=path)
        async with dom.lock:
            inst = self._live(dom)
            tmp = f"{path}.part"
            # a new file, never through a symlink planted at its name
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                raise ConflictError(f"save: {tmp} exists (another save in progress, or "
                                    "left by a crash: remove it)", path=tmp) from None
            except OSError as exc:
                raise ConfigError(f"save: {tmp}: {exc.strerror}", path=path) from exc
            dom.busy = "saving"
            try:
                os.pwrite(fd, b" " * savefile.HEADER_SIZE, 0)
                os.lseek(fd, savefile.HEADER_SIZE, os.SEEK_SET)
                await inst.save_to(fd)
                savefile.write_header(fd, dom.record.to_dict(), self.m.driver.name)
                os.close(fd)
                fd = -1
                os.replace(tmp, path)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                dom.busy = ""
                with contextlib.suppress(Exception):
                    if dom.record.state is State.RUNNING:
                        await inst.unpause()
                raise
            await self.m.teardown(dom)

    async def restore(self, path: str, *, paused: bool = False) -> dict[str, Any]:
        fd, hdr = savefile.read_header(Path(path))
        try:
            if hdr.get("hypervisor") != self.m.driver.name:
                raise HypervisorError(f"{path}: saved by the {hdr.get('hypervisor')} driver, "
                                      f"this host runs {self.m.driver.name}")
            rec = DomainRecord.from_dict(hdr["record"])
            if (other := self.m.by_name(rec.spec.name)) is not None:
                raise ConflictError(f"domain {rec.spec.name} already exists "
                                    f"(id {other.record.domid})", domain=rec.spec.name)
            if rec.uuid in self.m.domains:
                raise ConflictError(f"uuid {rec.uuid} is already in use", uuid=rec.uuid)
            live = self.m.live_macs()
            for nic in rec.nics:
                if nic.mac in live:
                    raise ConflictError(f"MAC {nic.mac} is in use by {live[nic.mac]}")
            self.m.check_memory(rec.spec.memory + sum(rec.dimms_mib))
            for f in (rec.kernel, rec.initrd):
                if f and not self.m.remote and not os.path.exists(f):  # dom0's: xl says
                    raise HypervisorError(f"{path}: the domain's boot file {f} is gone")
            self.m.check_disks(rec.spec)
            rec.domid = self.m.registry.next_domid()
            rec.state, rec.reason = (State.PAUSED if paused else State.RUNNING), "restored"
            rec.created = time.time()
            for nic in rec.nics:
                nic.tap = None
            return await self._start(rec, paused=paused, incoming_fd=fd)
        finally:
            os.close(fd)

    # ---- devices ---------------------------------------------------------------------
    async def block_attach(self, ref: str, spec_text: str) -> None:
        dom = self.m.find(ref)
        try:
            disk = parse_disk(spec_text)
        except ValueError as exc:
            raise UsageError(f"block-attach: {exc}") from exc
        async with dom.lock:
            inst = self._live(dom)
            if any(d.target == disk.target for d in dom.record.spec.disks):
                raise DeviceError(f"{dom.name} already has a disk {disk.target}",
                                  domain=dom.name, target=disk.target)
            whole = DomainSpec(name=dom.name, disks=[*dom.record.spec.disks, disk])
            try:  # the config's rules: sda beside xvda, xvda beside xvda1 are one disk
                whole.validate()
            except ConfigError as exc:
                raise DeviceError(f"block-attach: {exc}", domain=dom.name,
                                  target=disk.target) from exc
            probe = DomainSpec(name=dom.name, disks=[disk], source="block-attach")
            self.m.check_disks(probe)
            sock = self.m.mapped(disk.path)
            await inst.attach_disk(disk, len(dom.record.spec.disks),
                                   str(sock) if sock else None)
            dom.record.spec.disks.append(disk)
            dom.record.save(self.m.layout.domain_dir(dom.record.uuid))

    async def block_detach(self, ref: str, target: str) -> None:
        dom = self.m.find(ref)
        name = target.removeprefix("/dev/")
        async with dom.lock:
            inst = self._live(dom)
            disk = next((d for d in dom.record.spec.disks if d.target == name), None)
            if disk is None:
                raise DeviceError(f"{dom.name} has no disk {name}", domain=dom.name,
                                  target=name)
            await inst.detach_disk(disk)
            dom.record.spec.disks.remove(disk)
            dom.record.save(self.m.layout.domain_dir(dom.record.uuid))

    async def network_attach(self, ref: str, spec_text: str) -> dict[str, Any]:
        dom = self.m.find(ref)
        try:
            vif = parse_vif(spec_text)
        except ValueError as exc:
            raise UsageError(f"network-attach: {exc}") from exc
        async with dom.lock:
            inst = self._live(dom)
            if vif.mac and (same := next((n for n in dom.record.nics if n.mac == vif.mac),
                                         None)):
                raise ConflictError(f"network-attach: {dom.name} already has MAC {vif.mac} "
                                    f"(NIC {same.index})", domain=dom.name, mac=vif.mac)
            index = max((n.index for n in dom.record.nics), default=-1) + 1
            nics = self.m.plan_nics(dom.name, [vif], start=index)
            self.m.plumb(dom.record.domid, nics)
            try:
                await inst.attach_nic(nics[0])
            except BaseException:
                self.m.unplumb(nics)
                raise
            dom.record.nics.append(nics[0])
            dom.record.spec.vifs.append(vif)
            dom.record.save(self.m.layout.domain_dir(dom.record.uuid))
            warnings = [f"network-attach: vif key {k!r} is not used by sanvisor (kept)"
                        for k in vif.extra]
            return {"index": index, "mac": nics[0].mac, "tap": nics[0].tap,
                    "bridge": nic_bridge(nics[0]), "warnings": warnings}

    async def network_detach(self, ref: str, which: str) -> None:
        dom = self.m.find(ref)
        async with dom.lock:
            inst = self._live(dom)
            nic: NicPlan | None = next(
                (n for n in dom.record.nics if which in (str(n.index), n.mac)), None)
            if nic is None:
                raise DeviceError(f"{dom.name} has no network device {which}",
                                  domain=dom.name)
            await inst.detach_nic(nic)
            self.m.unplumb([nic])
            dom.record.nics.remove(nic)
            with contextlib.suppress(ValueError):
                dom.record.spec.vifs.remove(nic.vif)
            dom.record.save(self.m.layout.domain_dir(dom.record.uuid))


def _align_up(value: int, step: int) -> int:
    return -(-value // step) * step
