"""The agent's domain table: create, find, watch and tear down domains.

Each domain has a lock: operations on one domain run one at a time, operations
on different domains run in parallel. State comes from the hypervisor's events
(SHUTDOWN, RESET, STOP, RESUME, GUEST_PANICKED, process exit) and the on_*
actions of the config are applied here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sanvisor.agent import hostinfo
from sanvisor.agent.network import DEFAULT_BRIDGE, NAT_BRIDGE, NAT_GATEWAY, Network, is_root
from sanvisor.agent.records import DomainRecord, Registry, load_records
from sanvisor.drivers.base import Driver, Instance, LaunchPlan, NicPlan
from sanvisor.errors import (
    ConfigError,
    ConflictError,
    NotFoundError,
    ResourceError,
    SanvisorError,
    TimeoutError_,
)
from sanvisor.guestkit.build import KERNEL_ARGS
from sanvisor.model.domain import Action, DomainSpec, State, VifSpec
from sanvisor.paths import Layout

log = logging.getLogger(__name__)
MEM_OVERHEAD_MIB = 48  # what a QEMU process costs beyond guest RAM (TCG, measured ~40)


@dataclass
class Domain:
    record: DomainRecord
    inst: Instance | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    expect_exit: bool = False
    busy: str = ""
    reboot_pending: bool = False

    @property
    def name(self) -> str:
        return self.record.spec.name


class Manager:
    def __init__(self, layout: Layout, driver: Driver, network: Network | None = None,
                 kit: Any = None, mapper: Any = None, kit_args: str | None = None) -> None:
        self.layout = layout
        self.driver = driver
        self.net = network or Network()
        self.registry = Registry(layout.registry)
        self.domains: dict[str, Domain] = {}  # by uuid
        self._kit = kit  # callable returning (kernel, initrd), for configs without one
        self.mapper = mapper  # the multipath daemon: /dev/mapper/NAME -> its NBD socket
        self.kit_args = kit_args or KERNEL_ARGS  # the guest kit's kernel command line
        self.remote = driver.name == "xen"  # guests live in a dom0: its files, its net
        self.started = time.time()

    # ---- startup / shutdown -------------------------------------------------------------
    async def start(self) -> None:
        for rec in load_records(self.layout.domains):
            dom = Domain(rec)
            self.domains[rec.uuid] = dom
            inst = None
            if rec.state is not State.LOST:
                try:
                    inst = await self.driver.reattach(self._plan(rec), rec.pid,
                                                      self._sink(dom))
                except Exception as exc:  # the QEMU is there but will not talk
                    log.warning("cannot reattach %s: %s", rec.spec.name, exc)
            if inst is None:
                if rec.state is not State.LOST:
                    rec.state, rec.reason = State.LOST, "its QEMU exited while the agent was away"
                    rec.save(self.layout.domain_dir(rec.uuid))
                continue
            dom.inst = inst
            await self._reconcile(dom)

    async def stop(self) -> None:
        for dom in self.domains.values():
            if dom.inst is not None:
                await dom.inst.close()

    async def _reconcile(self, dom: Domain) -> None:
        """After a reattach: catch up with what happened while nobody listened."""
        assert dom.inst is not None
        st = await dom.inst.status()
        if st.status == "shutdown" and dom.record.state not in (State.SHUTDOWN, State.CRASHED):
            await self._apply(dom, dom.record.spec.on_poweroff, "guest powered off")
        elif st.status == "guest-panicked" and dom.record.state is not State.CRASHED:
            await self._apply(dom, dom.record.spec.on_crash, "guest crashed", crash=True)
        elif st.status == "paused":
            self._set_state(dom, State.PAUSED)
        elif st.running:
            self._set_state(dom, State.RUNNING)

    # ---- lookup ----------------------------------------------------------------------
    def find(self, ref: str) -> Domain:
        for dom in self.domains.values():
            if ref in (dom.name, dom.record.uuid) or ref == str(dom.record.domid):
                return dom
        raise NotFoundError(f"domain {ref!r} does not exist", domain=ref)

    def by_name(self, name: str) -> Domain | None:
        return next((d for d in self.domains.values() if d.name == name), None)

    def live_macs(self) -> dict[str, str]:
        return {n.mac: d.name for d in self.domains.values() for n in d.record.nics}

    # ---- plans -------------------------------------------------------------------------
    def _plan(self, rec: DomainRecord, *, incoming: bool = False,
              paused: bool = False) -> LaunchPlan:
        return LaunchPlan(
            spec=rec.spec, rundir=self.layout.domain_dir(rec.uuid), kernel=Path(rec.kernel),
            initrd=Path(rec.initrd) if rec.initrd else None, cmdline=rec.cmdline,
            nics=rec.nics, dimms_mib=rec.dimms_mib, target_mib=rec.target_mib,
            vcpus_now=rec.vcpus_present or rec.vcpus,
            incoming=incoming, paused=paused, guest_channel=rec.spec.kernel is None,
            disk_sources={d.target: str(s) for d in rec.spec.disks
                          if (s := self.mapped(d.path)) is not None})

    def mapped(self, path: str) -> Path | None:
        """The NBD socket of a multipath device path, or None for a plain path."""
        if self.mapper is None or not path.startswith("/dev/mapper/"):
            return None
        sock: Path | None = self.mapper.device(path)
        return sock

    def _boot_files(self, spec: DomainSpec) -> tuple[str, str | None]:
        if spec.kernel:
            for key, path in (("kernel", spec.kernel), ("ramdisk", spec.ramdisk)):
                if path and not self.remote and not Path(path).is_file():
                    raise ConfigError(f"{key}: {path}: no such file", file=spec.source)
            return spec.kernel, spec.ramdisk
        if self._kit is None:
            raise ConfigError("kernel: not given and no guest kit configured", file=spec.source)
        kernel, initrd = self._kit()
        return str(kernel), str(initrd)

    @staticmethod
    def cmdline(spec: DomainSpec, nics: list[NicPlan], kit_args: str = KERNEL_ARGS,
                console: str = "ttyS0") -> str:
        """The guest kernel's command line: console, root, extra, and for the guest
        kit its tuned arguments and the sv.* keys its /init reads. ``console``: the
        guest's console device when its config names none (the driver's)."""
        parts = []
        if spec.kernel is None:
            parts.append(kit_args)
        elif "console=" not in spec.extra:
            parts.append(f"console={console}")
        if spec.root:
            parts.append(f"root={spec.root}")
        parts.append(f"sv.hostname={spec.name}")
        for nic in nics:
            if nic.vif.ip:
                parts.append(f"sv.ip{nic.index}={nic.vif.ip}")
            if nic.vif.gateway:
                parts.append(f"sv.gw={nic.vif.gateway}")
        if spec.extra:
            parts.append(spec.extra)
        return " ".join(parts)

    def check_disks(self, spec: DomainSpec) -> None:
        if self.remote:
            return  # paths are dom0's: xl checks them and says so
        from sanvisor.agent.diskprobe import probe_file

        for disk in spec.disks:
            if not disk.path or disk.backend == "nbd":
                continue  # an empty CD-ROM; a network disk QEMU connects to at start
            p = Path(disk.path)
            if disk.path.startswith("/dev/mapper/") and self.mapper is not None:
                if self.mapped(disk.path) is None:
                    raise ConfigError(
                        f"disk {disk.target}: no multipath device {disk.path} on this host "
                        f"(maps: {', '.join(self.mapper.names()) or 'none; scsi rescan?'})",
                        file=spec.source)
                continue
            if not p.exists():
                raise ConfigError(f"disk {disk.target}: {disk.path}: no such file or device",
                                  file=spec.source)
            if disk.backend == "file" and not p.is_file():
                raise ConfigError(f"disk {disk.target}: {disk.path}: not a regular file",
                                  file=spec.source)
            if disk.backend == "file" and (fmt := probe_file(p)) is not None:
                raise ConfigError(
                    f"disk {disk.target}: {disk.path} is a {fmt} image, not raw (sanvisor "
                    f"gives guests raw disks: qemu-img convert -O raw {disk.path} NEW.img)",
                    file=spec.source)

    def check_memory(self, mib: int) -> None:
        if self.remote:
            return  # dom0's hypervisor decides; xl's refusal names the reason
        avail = hostinfo.mem_available_mib()
        if mib + MEM_OVERHEAD_MIB > avail:
            raise ResourceError(f"not enough memory: {mib} MiB asked, {avail} MiB available "
                                f"on this host (a QEMU also needs ~{MEM_OVERHEAD_MIB} MiB)",
                                asked=mib, available=avail)

    def plan_nics(self, name: str, vifs: list[VifSpec], start: int = 0, *,
                  dry: bool = False) -> list[NicPlan]:
        """MACs (given, remembered for the name, or new), NAT addresses; ``dry``: what
        they would be, remembering nothing."""
        live = self.live_macs()
        nics: list[NicPlan] = []
        for i, vif in enumerate(vifs, start):
            mac = vif.mac or self.registry.mac_for(name, i, None, dry=dry)
            owner = live.get(mac)
            if owner is not None and owner != name:
                raise ConflictError(f"vif {i}: MAC {mac} is already used by domain {owner}",
                                    mac=mac)
            if any(n.mac == mac for n in nics):
                raise ConflictError(f"vif {i}: MAC {mac} used twice", mac=mac)
            if vif.mac and not dry:
                self.registry.mac_for(name, i, vif.mac)
            if vif.type == "nat" and is_root():
                self._nat_address(vif, nics)
            elif (vif.type == "user" or not is_root()) and not vif.ip:
                vif.ip, vif.gateway = "10.0.2.15/24", "10.0.2.2"  # QEMU's user network
            nics.append(NicPlan(index=i, vif=vif, mac=mac, tap=None))
        return nics

    def _nat_address(self, vif: VifSpec, planned: list[NicPlan]) -> None:
        """A NAT vif without ip= gets the lowest free address of the NAT network, and
        the NAT bridge as its gateway."""
        gw = NAT_GATEWAY.split("/")[0]
        vif.gateway = vif.gateway or gw
        if vif.ip:
            return
        used = {n.vif.ip.split("/")[0] for d in self.domains.values() for n in d.record.nics
                if n.vif.ip} | {n.vif.ip.split("/")[0] for n in planned if n.vif.ip}
        prefix = gw.rsplit(".", 1)[0]
        for host in range(10, 250):
            if f"{prefix}.{host}" not in used:
                vif.ip = f"{prefix}.{host}/24"
                return
        raise ResourceError("the NAT network 10.213.0.0/24 has no free address")

    def plumb(self, domid: int, nics: list[NicPlan]) -> None:
        """Create the taps (root) or fall back to user networking."""
        for nic in nics:
            if self.remote:
                continue  # dom0's xl plugs the vif into its bridge
            if not is_root() or nic.vif.type == "user":
                nic.tap = None
                continue
            nic.tap = nic.vif.vifname or f"vif{domid}.{nic.index}"
            if nic.vif.type == "nat":
                self.net.ensure_nat()
                bridge = NAT_BRIDGE
            else:
                bridge = nic.vif.bridge or DEFAULT_BRIDGE
                self.net.ensure_bridge(bridge)
            self.net.add_tap(nic.tap, bridge)

    def unplumb(self, nics: list[NicPlan]) -> None:
        for nic in nics:
            if nic.tap:
                self.net.del_tap(nic.tap)

    # ---- state and events ------------------------------------------------------------
    def _set_state(self, dom: Domain, state: State, reason: str = "") -> None:
        dom.record.state, dom.record.reason = state, reason
        if dom.record.uuid in self.domains:
            dom.record.save(self.layout.domain_dir(dom.record.uuid))

        async def notify() -> None:
            async with dom.changed:
                dom.changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    def _sink(self, dom: Domain) -> Any:
        async def on_event(name: str, data: dict[str, Any]) -> None:
            await self._on_event(dom, name, data)
        return on_event

    async def _on_event(self, dom: Domain, name: str, data: dict[str, Any]) -> None:
        log.info("%s: %s %s", dom.name, name, data)
        if dom.expect_exit or dom.busy in ("saving", "migrating"):
            return
        st = dom.record.state
        if name == "STOP" and st not in (State.SHUTDOWN, State.CRASHED):
            self._set_state(dom, State.PAUSED)
        elif name == "RESUME":
            self._set_state(dom, State.RUNNING)
        elif name == "RESET" and "domid" in data and dom.inst is not None:
            dom.record.pid = dom.inst.pid  # xl restarted the domain under a new id
            self._set_state(dom, State.RUNNING, "rebooted")
        elif name == "SHUTDOWN":
            reason = str(data.get("reason", ""))
            if dom.reboot_pending and reason != "guest-panic":
                # `reboot`: the guest shut down cleanly on our request; power it on again
                dom.reboot_pending = False
                await self._apply(dom, Action.RESTART, "rebooted on request")
            elif reason == "guest-reset":
                await self._apply(dom, dom.record.spec.on_reboot, "guest rebooted")
            elif reason in ("guest-shutdown", "host-qmp-system-powerdown", "host-signal",
                            "host-ui"):
                await self._apply(dom, dom.record.spec.on_poweroff, "guest powered off")
        elif name == "GUEST_PANICKED":
            await self._apply(dom, dom.record.spec.on_crash, "guest crashed", crash=True)
        elif name == "DOMAIN_GONE":  # xl destroyed it (its on_* action): forget it
            asyncio.get_running_loop().create_task(self._destroy_locked(dom))
        elif name == "PROCESS_EXITED":
            self._set_state(dom, State.LOST, "its QEMU exited unexpectedly")
            self.unplumb(dom.record.nics)

    async def _apply(self, dom: Domain, action: Action, why: str, crash: bool = False) -> None:
        assert dom.inst is not None
        if action in (Action.DESTROY, Action.COREDUMP_DESTROY):
            log.info("%s: %s, destroying (on_* = %s)", dom.name, why, action.value)
            asyncio.get_running_loop().create_task(self._destroy_locked(dom))
        elif action is Action.PRESERVE:
            self._set_state(dom, State.CRASHED if crash else State.SHUTDOWN, why)
        else:  # restart and its variants
            await dom.inst.reset()
            await dom.inst.unpause()
            self._set_state(dom, State.RUNNING, why + ", restarted")

    async def _destroy_locked(self, dom: Domain) -> None:
        async with dom.lock:
            await self.teardown(dom)

    async def teardown(self, dom: Domain) -> None:
        """Stop the domain's process and remove every trace of it. Idempotent."""
        dom.expect_exit = True
        if dom.inst is not None:
            try:
                await dom.inst.destroy()
            except SanvisorError as exc:  # it is going away anyway: say so, go on
                log.warning("%s: destroy: %s", dom.name, exc)
            await dom.inst.close()
        self.unplumb(dom.record.nics)
        self.domains.pop(dom.record.uuid, None)
        shutil.rmtree(self.layout.domain_dir(dom.record.uuid), ignore_errors=True)
        self._set_state(dom, State.DYING, "destroyed")

    async def wait_for(self, dom: Domain, done: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        async with dom.changed:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError_(f"{dom.name}: {what} within {timeout:.0f}s",
                                        domain=dom.name)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(dom.changed.wait(), left)
