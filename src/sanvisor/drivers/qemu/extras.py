"""The QEMU instance's share of xm's other verbs: vcpu-list and vcpu-pin (the vCPU
threads QMP's query-cpus-fast names), sched-credit (cgroups, drivers/qemu/cgroup.py),
dump-core (QMP dump-guest-memory, an ELF core `crash` reads), sysrq (the guest
kit's control channel), trigger (NMI, reset, power button), and a disk grown
under the guest (an LV extended online).

A mixin of QemuInstance: it uses the instance's QMP client, pid and plan.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from sanvisor.drivers.base import LaunchPlan, VcpuInfo
from sanvisor.drivers.qemu import argv as qargv
from sanvisor.drivers.qemu import cgroup
from sanvisor.errors import HypervisorError
from sanvisor.model.domain import DiskSpec
from sanvisor.model.sched import Credit
from sanvisor.waiting import wait_until_async

log = logging.getLogger(__name__)
DUMP_TIMEOUT = 900.0
GROW_TIMEOUT = 30.0  # seconds for QEMU to reconnect to a grown volume
#: xm trigger's names -> the QMP command that does it
TRIGGERS = {"nmi": "inject-nmi", "reset": "system_reset", "power": "system_powerdown"}


def thread_stat(pid: int, tid: int) -> tuple[str, float, int | None]:
    """(state letter, CPU seconds, CPU it last ran on) of one thread, from /proc."""
    try:
        raw = open(f"/proc/{pid}/task/{tid}/stat").read()  # noqa: SIM115 - one read
    except OSError:
        return "?", 0.0, None
    fields = raw.rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return fields[0], (int(fields[11]) + int(fields[12])) / tick, int(fields[36])


class QemuExtras:
    plan: LaunchPlan
    pid: int

    if TYPE_CHECKING:
        async def qmp(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float = 30.0) -> Any: ...
        async def guest_request(self, line: str, timeout: float = 15.0) -> str: ...
        _qmp: Any

    async def grow_disk(self, disk: DiskSpec, size: int) -> None:
        """QEMU's NBD client learns an export's size at its handshake, and refuses to
        grow before ("Cannot grow NBD nodes"): the data path has just closed its
        connection (engine ``reopen``); a read makes QEMU reconnect now, then
        block_resize passes the size up, and scsi-hd tells the guest (a capacity
        change: Linux rescans the disk, /sys/block/sdX/size follows)."""
        node = qargv.disk_node(disk)

        async def resized() -> bool:
            try:
                await self.qmp("block_resize", {"node-name": node, "size": size})
                return True
            except HypervisorError as exc:
                if "Cannot grow" not in str(exc):
                    raise
            with contextlib.suppress(HypervisorError):  # reconnects with the new size
                await self.qmp("human-monitor-command",
                               {"command-line": f"qemu-io {node} \"read 0 512\""})
            return False

        await wait_until_async(f"disk {disk.target} to reach {size} bytes", resized,
                               GROW_TIMEOUT, 0.05)

    async def vcpu_threads(self) -> dict[int, int]:
        """vCPU index -> its thread id, for every vCPU plugged now."""
        return {int(c["cpu-index"]): int(c["thread-id"])
                for c in await self.qmp("query-cpus-fast")}

    async def vcpu_info(self) -> list[VcpuInfo]:
        threads = await self.vcpu_threads()
        out = []
        for vcpu in range(self.plan.spec.maxvcpus):
            tid = threads.get(vcpu)
            if tid is None:
                out.append(VcpuInfo(vcpu=vcpu, online=False))
                continue
            state, seconds, cpu = thread_stat(self.pid, tid)
            try:
                affinity = sorted(os.sched_getaffinity(tid))
            except OSError:
                affinity = []
            out.append(VcpuInfo(vcpu=vcpu, online=True, cpu=cpu, running=state == "R",
                                seconds=round(seconds, 1), affinity=affinity))
        return out

    async def pin_vcpu(self, vcpu: int, cpus: list[int]) -> None:
        """Pin the vCPU's thread now (if plugged) and remember it for vCPUs plugged
        later (vcpu-set) in the plan."""
        self.plan.vcpu_pins[vcpu] = list(cpus)
        tid = (await self.vcpu_threads()).get(vcpu)
        if tid is not None:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError as exc:
                raise HypervisorError(f"vcpu-pin: cannot pin vCPU {vcpu} (thread {tid}) "
                                      f"of {self.plan.spec.name}: {exc.strerror}") from exc

    async def apply_pins(self) -> None:
        """The plan's pins on the vCPUs plugged now, on the CPUs this host has (a
        pin naming only CPUs it lacks is left out, and said in the log)."""
        if not self.plan.vcpu_pins:
            return
        here = set(range(os.cpu_count() or 1))
        threads = await self.vcpu_threads()
        for vcpu, cpus in self.plan.vcpu_pins.items():
            usable = sorted(set(cpus) & here)
            if not usable:
                log.warning("%s: vCPU %d is pinned to CPUs %s, which this host lacks: "
                            "left unpinned", self.plan.spec.name, vcpu, cpus)
                continue
            if vcpu in threads:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(threads[vcpu], usable)

    async def set_credit(self, weight: int, cap: int) -> None:
        credit = Credit(weight, cap)
        cgroup.apply(self.pid, self.plan.rundir.name, credit)
        self.plan.credit = credit.to_dict()

    def apply_credit(self) -> None:
        """At start: the plan's weight and cap, if any (a host without a usable CPU
        controller starts the domain anyway, and says so in the log)."""
        if not self.plan.credit or Credit(**self.plan.credit).is_default:
            return
        try:
            cgroup.apply(self.pid, self.plan.rundir.name, Credit(**self.plan.credit))
        except HypervisorError as exc:
            log.warning("%s: weight and cap not applied: %s", self.plan.spec.name, exc)

    def drop_credit(self) -> None:
        cgroup.remove(self.plan.rundir.name)

    async def dump_core(self, fd: int) -> None:
        """QMP dump-guest-memory into ``fd``: an ELF core (PT_NOTE with the vCPUs'
        registers, a PT_LOAD per RAM block) that `crash` and gdb read."""
        self._qmp.send_fd_scm(fd)
        await self.qmp("getfd", {"fdname": "svdump"})
        await self.qmp("dump-guest-memory", {"paging": False, "protocol": "fd:svdump"},
                       timeout=DUMP_TIMEOUT)

    async def sysrq(self, key: str) -> None:
        if not self.plan.guest_channel:
            raise HypervisorError(
                f"sysrq: {self.plan.spec.name} has no sanvisor control channel (a guest-kit "
                "guest has one); QEMU reaches a guest's SysRq only through the guest here "
                "(no keyboard, and a serial console without BREAK)")
        answer = await self.guest_request(f"sysrq {key}")
        if not answer.startswith("ok"):
            raise HypervisorError(f"sysrq: the guest refused {key!r}: {answer}")

    async def trigger(self, what: str) -> None:
        cmd = TRIGGERS.get(what)
        if cmd is None:
            raise HypervisorError(f"trigger: QEMU has no {what!r} trigger "
                                  f"(it has {', '.join(TRIGGERS)})")
        await self.qmp(cmd)
