"""The hypervisor driver interface (Ganeti hv_base idea: small, paired hooks).

A driver launches and re-finds *instances*; an instance is one running domain
on this host. Everything the agent does to a guest goes through these methods,
so a Xen driver (xl) and the QEMU driver (QMP) are interchangeable.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sanvisor.errors import HypervisorError
from sanvisor.model.domain import DiskSpec, DomainSpec, VifSpec
from sanvisor.model.lifecycle import DomainEvent
from sanvisor.model.migration import ConvergencePolicy, MigrationReport

#: How a driver tells the agent what happened to a domain (model/lifecycle.py's events).
EventSink = Callable[[DomainEvent], Coroutine[Any, Any, None]]


@dataclass
class NicPlan:
    """A vif resolved on this host: its MAC is final, its tap exists (or user mode)."""

    index: int
    vif: VifSpec
    mac: str
    tap: str | None  # None = user-mode networking


@dataclass
class LaunchPlan:
    """Everything needed to start a domain here, resolved and checked."""

    spec: DomainSpec
    rundir: Path
    kernel: Path
    initrd: Path | None
    cmdline: str
    nics: list[NicPlan] = field(default_factory=list)
    dimms_mib: list[int] = field(default_factory=list)  # hot-added memory to recreate
    target_mib: int = 0  # the balloon target now (0: the config's memory)
    vcpus_now: int = 0  # 0 = spec.vcpus
    incoming: bool = False  # start waiting for a migration stream
    paused: bool = False
    accel: str = ""  # filled in by the driver: "tcg" or "kvm"
    guest_channel: bool = False  # the guest answers on the control channel (guest kit)
    disk_sources: dict[str, str] = field(default_factory=dict)  # target -> NBD socket
    vcpu_pins: dict[int, list[int]] = field(default_factory=dict)  # vCPU -> host CPUs
    credit: dict[str, int] = field(default_factory=dict)  # sched-credit weight, cap


@dataclass(frozen=True)
class MigrationCaps:
    """What a driver can do to move a domain to another host (Ganeti's hv_base has
    paired hooks; these are ours)."""

    live: bool = False  # pre-copy while the guest runs
    offline: bool = False  # paused, moved, resumed (xm's migrate without -l)
    postcopy: bool = False


@dataclass(frozen=True)
class StreamTls:
    """A migration stream between two hosts of a pool, encrypted and mutually
    authenticated (docs/pool.md): the host's credentials, a directory laid out as QEMU's
    tls-creds-x509 object reads it (ca-cert.pem, server-*.pem, client-*.pem)."""

    creds: Path
    address: str = ""  # target: this host's pool address, where the stream is accepted
    peer: str = ""  # source: the target host's name, which its certificate must bear
    peer_dn: str = ""  # target: the source's certificate subject (the only one let in)


class IncomingMigration(abc.ABC):
    """The target side of a migration, prepared and listening at ``address``."""

    address: str  # what the source's migrate_to is given
    pid: int = 0  # the process receiving it, when there is one already (QEMU)

    @abc.abstractmethod
    async def finish(self, timeout: float) -> Instance:
        """Wait until the domain has arrived; the instance that now runs it here."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Give up: nothing of the incoming domain is left on this host."""

    async def switchover(self) -> None:
        """The domain is this host's now (the pool's ownership moved): run it as soon as
        it has arrived (QEMU: `cont`, which in the incoming state means "start when the
        stream is in"). Until then an incoming domain never runs by itself."""
        return None


Progress = Callable[[dict[str, Any]], None]
#: called by a source right before its point of no return (QEMU: before post-copy
#: starts); raising refuses it, and the migration is cancelled
Switchover = Callable[[], Awaitable[None]]


@dataclass
class RunStatus:
    running: bool
    status: str  # the hypervisor's own word (QEMU: running, paused, shutdown, ...)


@dataclass
class Stats:
    cpu_seconds: float
    vcpus_busy: int
    mem_kib: int
    vcpus: int
    blk_rd_bytes: int = 0
    blk_wr_bytes: int = 0
    blk_rd_ops: int = 0
    blk_wr_ops: int = 0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0


@dataclass
class VcpuInfo:
    """One vCPU as `vcpu-list` shows it."""

    vcpu: int
    online: bool
    cpu: int | None = None  # the host CPU it runs on now (None: offline or unknown)
    running: bool = False
    seconds: float = 0.0
    affinity: list[int] = field(default_factory=list)  # the host CPUs it may run on


def cannot(what: str) -> HypervisorError:
    return HypervisorError(f"this hypervisor cannot {what}")


class Instance(abc.ABC):
    """One domain running under a hypervisor on this host."""

    pid: int

    @abc.abstractmethod
    def cpu_usage(self) -> tuple[float, int]:
        """(CPU seconds used so far, vCPUs running right now); cheap, no I/O to the guest."""

    @abc.abstractmethod
    async def status(self) -> RunStatus: ...
    @abc.abstractmethod
    async def pause(self) -> None: ...
    @abc.abstractmethod
    async def unpause(self) -> None: ...
    @abc.abstractmethod
    async def powerdown(self) -> None: ...
    @abc.abstractmethod
    async def reset(self) -> None: ...
    @abc.abstractmethod
    async def destroy(self) -> None: ...

    async def reboot(self) -> bool:
        """Reboot cleanly if the hypervisor does it itself (xl reboot): True. False (the
        default): the agent powers the guest down and starts it again on SHUTDOWN."""
        return False
    @abc.abstractmethod
    async def save_to(self, fd: int) -> None: ...
    @abc.abstractmethod
    async def restore_from(self, fd: int) -> None: ...
    @abc.abstractmethod
    async def set_balloon(self, mib: int) -> None: ...
    @abc.abstractmethod
    async def balloon_mib(self) -> int: ...
    @abc.abstractmethod
    async def add_memory(self, mib: int, index: int) -> None: ...
    @abc.abstractmethod
    async def set_vcpus(self, count: int) -> int:
        """Make ``count`` vCPUs online in the guest; return how many are present."""
    @abc.abstractmethod
    async def attach_disk(self, disk: DiskSpec, index: int, source: str | None = None
                          ) -> None: ...
    @abc.abstractmethod
    async def detach_disk(self, disk: DiskSpec) -> None: ...
    @abc.abstractmethod
    async def attach_nic(self, nic: NicPlan) -> None: ...
    @abc.abstractmethod
    async def detach_nic(self, nic: NicPlan) -> None: ...
    @abc.abstractmethod
    async def stats(self) -> Stats: ...
    @abc.abstractmethod
    async def close(self) -> None:
        """Let go of the instance without stopping it (agent shutdown)."""

    async def settle_outgoing(self, resume: bool) -> None:
        """After an agent restart: an outgoing migration this instance was in (in
        progress, or through but never switched over: the agent that drove it died) is
        cancelled, and the guest runs on here if ``resume``. Default: nothing to do."""
        return None

    async def migrate_to(self, address: str, *, live: bool, policy: ConvergencePolicy,
                         progress: Progress, timeout: float,
                         switchover: Switchover | None = None,
                         tls: StreamTls | None = None) -> MigrationReport:
        """Source side: send the domain to an IncomingMigration's ``address`` (over TLS
        when ``tls`` is given). On success this copy is stopped for good (the target runs
        it once the agents switched it over); on failure before ``switchover`` was
        called, it runs on."""
        raise HypervisorError("this driver cannot migrate a domain")

    # ---- xm's diagnostics and CPU controls (agent/cpus.py, agent/diag.py); a driver
    # that cannot do one leaves the default: a one-line refusal -----------------------
    async def vcpu_info(self) -> list[VcpuInfo]:
        raise cannot("list vCPUs")

    async def pin_vcpu(self, vcpu: int, cpus: list[int]) -> None:
        raise cannot("pin vCPUs")

    async def set_credit(self, weight: int, cap: int) -> None:
        raise cannot("set scheduler weights")

    async def credit(self) -> tuple[int, int] | None:
        """(weight, cap) as the hypervisor's scheduler holds them; None: the agent's
        record says (QEMU)."""
        return None

    async def dump_core(self, fd: int) -> None:
        raise cannot("dump a domain's memory")

    async def sysrq(self, key: str) -> None:
        raise cannot("send a SysRq key")

    async def trigger(self, what: str) -> None:
        raise cannot(f"send a {what} trigger")

    async def grow_disk(self, disk: DiskSpec, size: int) -> None:
        """The volume under ``disk`` grew to ``size`` bytes: the guest sees the new size
        without a reboot (an LV extended online; docs/volumes.md)."""
        raise cannot("grow a disk online")

    async def renamed(self, old: str) -> None:
        """The domain's name changed (the spec holds the new one); the hypervisor's own
        name follows it where it has one (xl rename). QEMU: nothing to do."""
        return None

    async def devices(self, kind: str) -> list[dict[str, Any]] | None:
        """``block`` or ``network`` rows as the hypervisor sees them (xl block-list);
        None: the agent builds them from its record (QEMU)."""
        return None

    async def wait_alive(self, timeout: float) -> str | None:
        """Wait until the freshly started guest shows a sign of life (it printed on its
        console, or its kernel is running); None when it did, else where it is stuck.
        Default: the hypervisor's own create already proved it (xl create)."""
        return None


class Driver(abc.ABC):
    name: str
    memory_block_mib: int = 128  # granularity of memory hot-plug
    console_device: str = "ttyS0"  # the guest's console when its config names none
    life_timeout: float = 30.0  # seconds a new guest has to show a sign of life

    migration: MigrationCaps = MigrationCaps()

    async def incoming(self, plan: LaunchPlan, events: EventSink, *, live: bool,
                       policy: ConvergencePolicy,
                       tls: StreamTls | None = None) -> IncomingMigration:
        """Target side: get ready to receive the domain ``plan`` describes (a stream over
        TLS on ``tls.address`` when given; else one from this machine)."""
        raise HypervisorError(f"the {self.name} driver cannot receive a migration")

    def disk_identities(self, disks: dict[str, str]) -> dict[str, str | None] | None:
        """path -> identity where the hypervisor sees the disks (Xen: in dom0); None
        when they are this host's paths (the agent knows them). Blocking."""
        return None

    def accelerator(self) -> dict[str, object]:
        """What runs the guests' CPUs here, and why (``sanvisor info``)."""
        return {"accel": self.name, "reason": f"domains run under {self.name}"}

    def hypervisor_version(self) -> str:
        """The hypervisor program's version where both ends of a migration must run the
        same one (QEMU: its ``--version``); "" when it does not matter or is unknown."""
        return ""

    def host_facts(self) -> dict[str, object]:
        """Facts the hypervisor knows better than the host's /proc (Xen: `xl info`);
        blocking. QEMU: which QEMU."""
        return {}

    def host_cpus(self) -> int:
        """How many CPUs domains can be pinned to here (Xen: dom0's `xl info`)."""
        return os.cpu_count() or 1

    def hypervisor_log(self, clear: bool = False) -> str | None:
        """The hypervisor's own message buffer (`xl dmesg [-c]`); None: it has none
        (QEMU: the agent's event log stands in). Blocking."""
        return None

    def hypervisor_domains(self) -> list[dict[str, Any]]:
        """Every domain the hypervisor itself lists (Domain-0 and domains made outside
        sanvisor included), as dicts of name, domid, state, memory_kib, vcpus,
        cpu_seconds. Blocking. QEMU has no such list: []."""
        return []

    @abc.abstractmethod
    async def launch(self, plan: LaunchPlan, events: EventSink) -> Instance: ...

    @abc.abstractmethod
    async def reattach(self, plan: LaunchPlan, pid: int, events: EventSink) -> Instance | None:
        """Find a running instance again after an agent restart; None if it is gone."""
