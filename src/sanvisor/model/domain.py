"""The domain specification: what a config file describes, typed and validated.

No I/O here: checks that need the host (files exist, memory available) live in
the agent and the drivers.
"""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from sanvisor.errors import ConfigError

XEN_OUI = "00:16:3e"
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_TARGET_RE = re.compile(r"^(?:/dev/)?((?:sd|xvd|hd|vd)[a-z]{1,2})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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
    """One ``disk = [...]`` entry: ``phy:/dev/vg/lv,sda,w``."""

    target: str  # guest-side name as written, normalised: "sda", "xvdb"
    backend: str = "phy"  # phy | file
    path: str = ""  # host-side path; empty for an empty CD-ROM
    mode: str = "w"  # r | w
    devtype: str = "disk"  # disk | cdrom

    @property
    def readonly(self) -> bool:
        return self.mode == "r"

    @staticmethod
    def normalise_target(raw: str) -> str:
        m = _TARGET_RE.match(raw.strip())
        if not m:
            raise ValueError(f"invalid disk target {raw!r} (expected sdX, xvdX, hdX or vdX)")
        return m.group(1)


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
        seen: set[str] = set()
        for d in self.disks:
            if d.target in seen:
                raise bad(f"disk: target {d.target} used twice")
            seen.add(d.target)
        macs: set[str] = set()
        for v in self.vifs:
            if v.mac:
                if v.mac in macs:
                    raise bad(f"vif: MAC {v.mac} used twice")
                macs.add(v.mac)
        if self.ramdisk and not self.kernel:
            raise bad("ramdisk: given without a kernel")

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
