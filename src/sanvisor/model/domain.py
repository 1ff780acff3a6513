"""The domain specification: what a config file describes, typed and validated.

No I/O here: checks that need the host (files exist, memory available) live in
the agent and the drivers.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from sanvisor.errors import ConfigError

XEN_OUI = "00:16:3e"
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")
_TARGET_RE = re.compile(r"^(?:/dev/)?((sd|xvd|hd|vd)([a-z]{1,2})([0-9]*))\Z")
MAX_PARTITION = 15  # xvdX1..xvdX15, as blkfront numbers them (16 minors a disk)
#: The guest kit boots in this much memory (docs/guest-kit.md); less gets a warning.
GUEST_KIT_MIN_MIB = 96
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
#: a network interface name the kernel takes and a shell cannot misread (<= 15 bytes);
#: these patterns end with \Z, not $ ($ also matches before a final newline: "web1\n")
IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}\Z")
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
NIC_MODELS = ("virtio-net-pci", "e1000", "e1000e", "rtl8139", "ne2k_pci", "pcnet")
VIF_TYPES = ("bridge", "nat", "user")
DISK_BACKENDS = ("phy", "file", "nbd")


class Action(enum.StrEnum):
    """on_poweroff / on_reboot / on_crash values (xl.cfg(5))."""

    DESTROY = "destroy"
    RESTART = "restart"
    PRESERVE = "preserve"
    RENAME_RESTART = "rename-restart"
    COREDUMP_DESTROY = "coredump-destroy"
    COREDUMP_RESTART = "coredump-restart"
    SOFT_RESET = "soft-reset"


class State(enum.StrEnum):
    """Domain states, with the xm letter each shows as."""

    RUNNING = "running"  # r
    BLOCKED = "blocked"  # b (running, all vCPUs idle)
    PAUSED = "paused"  # p
    SHUTDOWN = "shutdown"  # s (guest shut down, domain kept: on_poweroff=preserve)
    CRASHED = "crashed"  # c
    DYING = "dying"  # d
    LOST = "lost"  # its hypervisor process died while nobody watched

    @property
    def letters(self) -> str:
        slots = "rbpscd"
        mark = {
            State.RUNNING: "r",
            State.BLOCKED: "b",
            State.PAUSED: "p",
            State.SHUTDOWN: "s",
            State.CRASHED: "c",
            State.DYING: "d",
            State.LOST: "c",
        }[self]
        return "".join(ch if ch == mark else "-" for ch in slots)


@dataclass
class DiskSpec:
    """One ``disk = [...]`` entry: ``phy:/dev/vg/lv,sda,w``.

    A target may name a partition (``xvda2``), as xen-tools writes them: the volume
    is then a disk of its own to the guest (docs/config.md, "What the guest sees")."""

    target: str  # guest-side name as written, normalised: "sda", "xvdb", "xvda2"
    backend: str = "phy"  # phy | file | nbd
    path: str = ""  # host-side path (nbd: nbd://HOST:PORT[/EXPORT]); empty: empty CD-ROM
    mode: str = "w"  # r | w
    devtype: str = "disk"  # disk | cdrom

    @property
    def readonly(self) -> bool:
        return self.mode == "r"

    @property
    def slot(self) -> tuple[int, int]:
        """(disk index, partition): xvda -> (0, 0), sdb -> (1, 0), xvda2 -> (0, 2)."""
        return target_slot(self.target)

    @staticmethod
    def normalise_target(raw: str) -> str:
        m = _TARGET_RE.match(raw.strip())
        if not m:
            raise ValueError(f"invalid disk target {raw!r} (expected sdX, xvdX, hdX or vdX, "
                             "or a partition of one such as xvda2)")
        part = m.group(4)
        if part and not (part[0] != "0" and int(part) <= MAX_PARTITION):
            raise ValueError(f"invalid disk target {raw!r} (partition numbers go from 1 "
                             f"to {MAX_PARTITION})")
        return m.group(1)


def target_slot(target: str) -> tuple[int, int]:
    """(disk index, partition) of a normalised target, whatever its prefix: sda, xvda
    and hda are disk 0, sdaa is disk 26; a whole disk has partition 0."""
    m = _TARGET_RE.match(target)
    if not m:
        raise ValueError(f"invalid disk target {target!r}")
    n = 0
    for ch in m.group(3):
        n = n * 26 + (ord(ch) - ord("a") + 1)
    return n - 1, int(m.group(4) or 0)


def target_split(target: str) -> tuple[str, str, int]:
    """(prefix, letters, partition): xvda2 -> ("xvd", "a", 2)."""
    m = _TARGET_RE.match(target)
    if not m:
        raise ValueError(f"invalid disk target {target!r}")
    return m.group(2), m.group(3), int(m.group(4) or 0)


@dataclass
class VifSpec:
    """One ``vif = [...]`` entry: ``mac=00:16:3e:00:00:01, bridge=xenbr0``."""

    mac: str | None = None
    bridge: str | None = None
    model: str = "virtio-net-pci"
    ip: str | None = None  # "10.0.0.2" or "10.0.0.2/24"; passed to the guest
    gateway: str | None = None
    vifname: str | None = None
    type: str = "bridge"  # bridge | nat | user
    extra: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def check_ifname(key: str, name: str) -> str:
        if not IFNAME_RE.match(name):
            raise ValueError(f"invalid {key} {name!r} (an interface name: letters, digits, "
                             "'_', '.', '-', at most 15)")
        return name

    @staticmethod
    def check_mac(mac: str) -> str:
        mac = mac.strip().lower()
        if not _MAC_RE.match(mac):
            raise ValueError(f"invalid MAC address {mac!r}")
        if int(mac[:2], 16) & 1:
            raise ValueError(f"MAC address {mac!r} is a multicast address")
        return mac


@dataclass
class DomainSpec:
    """What a domain is, independent of where it runs."""

    name: str
    memory: int = 128  # MiB at boot
    maxmem: int = 0  # MiB; 0 = same as memory
    vcpus: int = 1
    maxvcpus: int = 0  # 0 = same as vcpus
    kernel: str | None = None  # None = the guest kit's
    ramdisk: str | None = None
    root: str | None = None
    extra: str = ""
    uuid: str | None = None
    disks: list[DiskSpec] = field(default_factory=list)
    vifs: list[VifSpec] = field(default_factory=list)
    on_poweroff: Action = Action.DESTROY
    on_reboot: Action = Action.RESTART
    on_crash: Action = Action.DESTROY
    builder: str = "pv"  # xl "type": pv | pvh | hvm
    unknown: dict[str, Any] = field(default_factory=dict)  # kept, warned about
    source: str | None = None  # config file it came from

    def __post_init__(self) -> None:
        self.kernel = self.kernel or None  # kernel="" on the command line: the guest kit
        self.ramdisk = self.ramdisk or None
        if not self.maxmem:
            self.maxmem = self.memory
        if not self.maxvcpus:
            self.maxvcpus = self.vcpus

    def validate(self) -> None:
        """Checks that need no I/O. Raises ConfigError naming the field."""
        f = self.source

        def bad(msg: str) -> ConfigError:
            return ConfigError(msg, file=f)

        self._check_types(bad)
        if not _NAME_RE.match(self.name):
            raise bad(f"name: invalid domain name {self.name!r}")
        if self.memory <= 0:
            raise bad(f"memory: must be positive, got {self.memory}")
        if self.maxmem < self.memory:
            raise bad(f"maxmem: {self.maxmem} MiB is less than memory ({self.memory} MiB)")
        if self.vcpus <= 0:
            raise bad(f"vcpus: must be positive, got {self.vcpus}")
        if self.maxvcpus < self.vcpus:
            raise bad(f"vcpus: {self.vcpus} is more than maxvcpus ({self.maxvcpus})")
        if self.maxvcpus > 64:
            raise bad(f"maxvcpus: {self.maxvcpus} is more than 64")
        seen: dict[tuple[int, int], str] = {}
        for d in self.disks:
            slot = d.slot
            if slot in seen:
                if seen[slot] == d.target:
                    raise bad(f"disk: target {d.target} used twice")
                raise bad(f"disk: {seen[slot]} and {d.target} name the same disk")
            seen[slot] = d.target
        for (n, part), target in seen.items():
            if part and (n, 0) in seen:
                raise bad(f"disk: {target} is a partition of {seen[n, 0]}, which is also "
                          "a disk of this domain (give one or the other)")
        macs: set[str] = set()
        for v in self.vifs:
            _check_vif(v, bad)  # first: a MAC of the wrong type is refused, not hashed
            if v.mac:
                if v.mac in macs:
                    raise bad(f"vif: MAC {v.mac} used twice")
                macs.add(v.mac)
        if self.ramdisk and not self.kernel:
            raise bad("ramdisk: given without a kernel")

    def _check_types(self, bad: Callable[[str], ConfigError]) -> None:
        """Every field has the type and form a parsed config gives it: a spec may also
        come from an API body or a save file."""
        for key in ("memory", "maxmem", "vcpus", "maxvcpus"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or not abs(v) < 1 << 40:
                raise bad(f"{key}: expected an integer, got {v!r}")
        if not isinstance(self.name, str):
            raise bad(f"name: expected a string, got {self.name!r}")
        for key in ("kernel", "ramdisk", "root", "extra", "uuid", "source"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, str) or "\0" in v
                                  or ("\n" in v and key not in ("extra", "root"))):
                raise bad(f"{key}: expected one line of text, got {v!r}")
        if self.uuid is not None and not _UUID_RE.match(self.uuid):
            raise bad(f"uuid: invalid UUID {self.uuid!r}")
        for key in ("on_poweroff", "on_reboot", "on_crash"):
            if not isinstance(getattr(self, key), Action):
                raise bad(f"{key}: invalid action {getattr(self, key)!r}")
        if self.builder not in ("pv", "pvh", "hvm"):
            raise bad(f"type: invalid domain type {self.builder!r}")
        if not isinstance(self.disks, list) or not isinstance(self.vifs, list):
            raise bad("disk/vif: expected lists")
        for d in self.disks:
            if not isinstance(d, DiskSpec):
                raise bad(f"disk: invalid entry {d!r}")
            try:
                if DiskSpec.normalise_target(str(d.target)) != d.target:
                    raise ValueError(f"invalid disk target {d.target!r}")
            except ValueError as exc:
                raise bad(f"disk: {exc}") from None
            if (d.backend not in DISK_BACKENDS or d.mode not in ("r", "w")
                    or d.devtype not in ("disk", "cdrom") or not isinstance(d.path, str)
                    or "\0" in d.path or "\n" in d.path):
                raise bad(f"disk {d.target}: invalid backend, mode, type or path")
        for v in self.vifs:
            if not isinstance(v, VifSpec):
                raise bad(f"vif: invalid entry {v!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("on_poweroff", "on_reboot", "on_crash"):
            d[k] = getattr(self, k).value
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DomainSpec:
        data = dict(data)
        data["disks"] = [DiskSpec(**x) for x in data.get("disks", [])]
        data["vifs"] = [VifSpec(**x) for x in data.get("vifs", [])]
        for k in ("on_poweroff", "on_reboot", "on_crash"):
            if k in data:
                data[k] = Action(data[k])
        return cls(**data)


def _check_vif(v: VifSpec, bad: Callable[[str], ConfigError]) -> None:
    import ipaddress

    try:
        if v.mac is not None:
            VifSpec.check_mac(str(v.mac))
        for key in ("bridge", "vifname"):
            if getattr(v, key) is not None:
                VifSpec.check_ifname(key, str(getattr(v, key)))
        if v.model not in NIC_MODELS:
            raise ValueError(f"unknown NIC model {v.model!r}")
        if v.type not in VIF_TYPES:
            raise ValueError(f"invalid vif type {v.type!r}")
        if v.ip is not None:
            for part in str(v.ip).split():
                ipaddress.ip_interface(part)
        if v.gateway is not None:
            ipaddress.ip_address(str(v.gateway))
        if not isinstance(v.extra, dict) or not all(
                isinstance(k, str) and isinstance(x, str) for k, x in v.extra.items()):
            raise ValueError("invalid extra settings")
    except ValueError as exc:
        raise bad(f"vif: {exc}") from None
