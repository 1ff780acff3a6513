"""What this host gives a domain: boot files, disks, memory, NICs and their taps.

Checks without side effects (``check_*``, ``plan_*``) and the host-side plumbing
(taps on bridges) with its undo. Paths of a Xen host are dom0's, so it leaves
those checks to xl, which names what is wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sanvisor.agent import hostinfo
from sanvisor.agent.network import DEFAULT_BRIDGE, NAT_BRIDGE, NAT_GATEWAY, Network, is_root
from sanvisor.agent.records import DomainRecord
from sanvisor.agent.table import DomainTable
from sanvisor.drivers.base import Driver, LaunchPlan, NicPlan
from sanvisor.errors import ConfigError, ConflictError, ResourceError
from sanvisor.guestkit.build import KERNEL_ARGS
from sanvisor.model.domain import DomainSpec, VifSpec

TYPE_CHECKING = False
if TYPE_CHECKING:
    from sanvisor.storage.multipathd import Multipathd

MEM_OVERHEAD_MIB = 48  # what a QEMU process costs beyond guest RAM (TCG, measured ~40)
Kit = Callable[[], tuple[Path, Path]]


def kernel_cmdline(spec: DomainSpec, nics: list[NicPlan], kit_args: str = KERNEL_ARGS,
                   console: str = "ttyS0") -> str:
    """The guest kernel's command line: console, root, extra, and for the guest kit
    its tuned arguments and the sv.* keys its /init reads. ``console``: the guest's
    console device when its config names none (the driver's)."""
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


class HostResources:
    def __init__(self, layout_table: DomainTable, driver: Driver, network: Network,
                 kit: Kit | None, mapper: Multipathd | None, kit_args: str | None) -> None:
        self.table = layout_table
        self.driver = driver
        self.net = network
        self.kit = kit  # (kernel, initrd) of the guest kit, for configs without a kernel
        self.mapper = mapper  # the multipath daemon: /dev/mapper/NAME -> its NBD socket
        self.kit_args = kit_args or KERNEL_ARGS
        self.remote = driver.name == "xen"  # guests live in a dom0: its files, its net

    # ---- checks (no side effects) ---------------------------------------------------
    def boot_files(self, spec: DomainSpec) -> tuple[str, str | None]:
        if spec.kernel:
            for key, path in (("kernel", spec.kernel), ("ramdisk", spec.ramdisk)):
                if path and not self.remote and not Path(path).is_file():
                    raise ConfigError(f"{key}: {path}: no such file", file=spec.source)
            return spec.kernel, spec.ramdisk
        if self.kit is None:
            raise ConfigError("kernel: not given and no guest kit configured", file=spec.source)
        kernel, initrd = self.kit()
        return str(kernel), str(initrd)

    def cmdline(self, spec: DomainSpec, nics: list[NicPlan]) -> str:
        return kernel_cmdline(spec, nics, self.kit_args, self.driver.console_device)

    def mapped(self, path: str) -> Path | None:
        """The NBD socket of a multipath device or an active LV's path (/dev/VG/LV), or
        None for a plain path."""
        if self.mapper is None or not path.startswith("/dev/"):
            return None
        return self.mapper.device(path)

    def check_disks(self, spec: DomainSpec) -> None:
        if self.remote:
            return  # paths are dom0's: xl checks them and says so
        from sanvisor.agent.diskprobe import probe_file

        for disk in spec.disks:
            if not disk.path or disk.backend == "nbd":
                continue  # an empty CD-ROM; a network disk QEMU connects to at start
            p = Path(disk.path)
            if self.mapper is not None:
                if self.mapped(disk.path) is not None:
                    continue  # a map or an LV: served here
                if hint := self.mapper.hint(disk.path):
                    raise ConfigError(f"disk {disk.target}: {hint}", file=spec.source)
                if disk.path.startswith("/dev/mapper/"):
                    raise ConfigError(
                        f"disk {disk.target}: no multipath device {disk.path} on this host "
                        f"(maps: {', '.join(self.mapper.names()) or 'none; scsi rescan?'})",
                        file=spec.source)
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
        live = self.table.live_macs()
        registry = self.table.registry
        nics: list[NicPlan] = []
        for i, vif in enumerate(vifs, start):
            mac = vif.mac or registry.mac_for(name, i, None, dry=dry)
            owner = live.get(mac)
            if owner is not None and owner != name:
                raise ConflictError(f"vif {i}: MAC {mac} is already used by domain {owner}",
                                    mac=mac)
            if any(n.mac == mac for n in nics):
                raise ConflictError(f"vif {i}: MAC {mac} used twice", mac=mac)
            if vif.mac and not dry:
                registry.mac_for(name, i, vif.mac)
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
        used = {n.vif.ip.split("/")[0] for d in self.table for n in d.record.nics
                if n.vif.ip} | {n.vif.ip.split("/")[0] for n in planned if n.vif.ip}
        prefix = gw.rsplit(".", 1)[0]
        for host in range(10, 250):
            if f"{prefix}.{host}" not in used:
                vif.ip = f"{prefix}.{host}/24"
                return
        raise ResourceError("the NAT network 10.213.0.0/24 has no free address")

    def identities(self, disks: dict[str, str]) -> dict[str, str | None]:
        """path -> what names that disk here (drivers/xen/diskid.py): a multipath map's
        WWID, a device's WWID or dm uuid, a read-only file's bytes; None if absent.
        ``disks``: path -> mode. On a Xen host, as dom0 sees them. Blocking."""
        from sanvisor.drivers.xen.diskid import identities
        from sanvisor.drivers.xen.local import LocalDom0

        seen = self.driver.disk_identities(disks)
        if seen is not None:
            return seen
        out: dict[str, str | None] = {}
        rest: dict[str, str] = {}
        for path, mode in disks.items():
            if path.startswith("/dev/mapper/") and self.mapper is not None:
                name = path.removeprefix("/dev/mapper/")
                wwid = next((w for w, mp in self.mapper.maps.items() if mp.name == name),
                            None)
                out[path] = f"wwid:{wwid}" if wwid else None
            elif self.mapper is not None and (lv := self.mapper.volumes.identity(path)):
                out[path] = lv  # an LV: its dm uuid, the same on every host of the pool
            elif path.startswith("nbd://"):
                out[path] = f"nbd:{path}"  # a network export: the same server and name
            else:
                rest[path] = mode
        out.update(identities(LocalDom0().run, rest))
        return out

    def check_bridges(self, nics: list[NicPlan]) -> None:
        """Every bridged NIC's bridge exists here (a migration target creates none)."""
        if self.remote:
            return
        for nic in nics:
            bridge = nic.vif.bridge or DEFAULT_BRIDGE
            if nic.vif.type == "bridge" and is_root() and \
                    not Path("/sys/class/net", bridge, "bridge").exists():
                raise ConfigError(f"vif {nic.index}: bridge {bridge} does not exist on this "
                                  "host")

    # ---- plumbing (undo: unplumb) -----------------------------------------------------
    def plumb(self, domid: int, nics: list[NicPlan]) -> None:
        """Create the taps (root) or fall back to user networking; on a failure the
        taps made so far are removed again."""
        done: list[NicPlan] = []
        try:
            for nic in nics:
                if self.remote:
                    continue  # dom0's xl plugs the vif into its bridge
                if not is_root() or nic.vif.type == "user":
                    nic.tap = None
                    continue
                tap = nic.vif.vifname or f"vif{domid}.{nic.index}"
                if nic.vif.type == "nat":
                    self.net.ensure_nat()
                    bridge = NAT_BRIDGE
                else:
                    bridge = nic.vif.bridge or DEFAULT_BRIDGE
                    self.net.ensure_bridge(bridge)
                self.net.add_tap(tap, bridge)  # refuses a name that exists: never ours
                nic.tap = tap
                done.append(nic)
        except BaseException:
            self.unplumb(done)
            raise

    def unplumb(self, nics: list[NicPlan]) -> None:
        """Remove the taps the agent made for these NICs (and only those)."""
        for nic in nics:
            if nic.tap:
                self.net.del_tap(nic.tap)
                nic.tap = None

    # ---- what a driver needs to start or find a domain --------------------------------
    def launch_plan(self, rec: DomainRecord, *, incoming: bool = False,
                    paused: bool = False) -> LaunchPlan:
        return LaunchPlan(
            spec=rec.spec, rundir=self.table.layout.domain_dir(rec.uuid),
            kernel=Path(rec.kernel), initrd=Path(rec.initrd) if rec.initrd else None,
            cmdline=rec.cmdline, nics=rec.nics, dimms_mib=rec.dimms_mib,
            target_mib=rec.target_mib, vcpus_now=rec.vcpus_present or rec.vcpus,
            incoming=incoming, paused=paused, guest_channel=rec.spec.kernel is None,
            disk_sources={d.target: str(s) for d in rec.spec.disks
                          if (s := self.mapped(d.path)) is not None},
            vcpu_pins={int(k): list(v) for k, v in rec.vcpu_pins.items()},
            credit=dict(rec.credit))
