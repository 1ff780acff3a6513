"""The Xen instance's share of xm's other verbs, each one xl command: vcpu-list,
vcpu-pin, sched-credit2 (or sched-credit on a credit host), dump-core, sysrq,
trigger, rename, block-list and network-list; and the pins, weight and cap in
the domain's xl.cfg, so that a restore or an incoming migration keeps them.

The parsers of xl's tables are pure (unit-tested on xl's own output).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

from sanvisor.drivers.base import LaunchPlan, VcpuInfo
from sanvisor.errors import HypervisorError
from sanvisor.model.cpulist import MAX_CPUS, format_cpus, parse_cpus

if TYPE_CHECKING:
    from sanvisor.drivers.xen.driver import XenDriver
    from sanvisor.drivers.xen.xl import Xl

DUMP_DIR = "/var/lib/xen/sanvisor-save"


def _cpuset(text: str, ncpus: int) -> list[int]:
    """xl's bitmap print: ``all``, ``none`` or ``0-1,3``."""
    if text == "all":
        return list(range(ncpus))
    if text == "none":
        return []
    return sorted(parse_cpus(text, MAX_CPUS))


def parse_vcpu_list(out: str, ncpus: int) -> list[VcpuInfo]:
    """`xl vcpu-list DOM`: Name ID VCPU CPU State Time(s) Affinity (Hard / Soft)."""
    rows = []
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 7:
            continue
        _name, _domid, vcpu, cpu, state, secs, hard = parts[:7]
        online = not state.endswith("p")
        rows.append(VcpuInfo(vcpu=int(vcpu), online=online,
                             cpu=int(cpu) if cpu.isdigit() else None,
                             running=state.startswith("r"), seconds=float(secs),
                             affinity=_cpuset(hard, ncpus)))
    return rows


def parse_block_list(out: str) -> list[dict[str, Any]]:
    """`xl block-list DOM`: Vdev BE handle state evt-ch ring-ref BE-path."""
    keys = ("vdev", "be", "handle", "state", "evtch", "ring_ref", "be_path")
    return [dict(zip(keys, ln.split()[:7], strict=True)) for ln in out.splitlines()[1:]
            if len(ln.split()) >= 7]


def parse_network_list(out: str) -> list[dict[str, Any]]:
    """`xl network-list DOM`: Idx BE Mac Addr. handle state evt-ch tx-/rx-ring-ref BE-path."""
    rows = []
    for ln in out.splitlines()[1:]:
        p = ln.split()
        if len(p) >= 8:
            rows.append({"idx": p[0], "be": p[1], "mac": p[2], "handle": p[3],
                         "state": p[4], "evtch": p[5], "ring_ref": p[6], "be_path": p[7]})
    return rows


def policy_lines(plan: LaunchPlan, ncpus: int) -> list[str]:
    """xl.cfg lines for the domain's vcpu-pin and sched-credit settings (pins to CPUs
    this host lacks are left out: xl would refuse the domain)."""
    lines = []
    here = set(range(ncpus))
    pins = {v: sorted(set(c) & here) for v, c in plan.vcpu_pins.items()}
    if any(pins.values()):
        per_vcpu = [format_cpus(pins[v]) if pins.get(v) else "all"
                    for v in range(plan.spec.maxvcpus)]
        lines.append("cpus = [ " + ", ".join(f'"{c}"' for c in per_vcpu) + " ]")
    if plan.credit:
        lines.append(f"cpu_weight = {int(plan.credit.get('weight', 256))}")
        lines.append(f"cap = {int(plan.credit.get('cap', 0))}")
    return lines


class XenExtras:
    plan: LaunchPlan
    drv: XenDriver
    xl: Xl
    pid: int
    console: Any

    if TYPE_CHECKING:
        @property
        def name(self) -> str: ...
        async def _x(self, *args: str) -> str: ...
        async def _dom0(self, argv: list[str]) -> None: ...

    async def vcpu_info(self) -> list[VcpuInfo]:
        out = await self._x("vcpu-list", self.name)
        ncpus = await asyncio.to_thread(self.drv.host_cpus)
        return parse_vcpu_list(out, ncpus)

    async def pin_vcpu(self, vcpu: int, cpus: list[int]) -> None:
        await self._x("vcpu-pin", self.name, str(vcpu), format_cpus(cpus))
        self.plan.vcpu_pins[vcpu] = list(cpus)

    async def set_credit(self, weight: int, cap: int) -> None:
        verb = await asyncio.to_thread(self.drv.sched_verb)
        await self._x(verb, "-d", self.name, "-w", str(weight), "-c", str(cap))
        self.plan.credit = {"weight": weight, "cap": cap}

    async def credit(self) -> tuple[int, int] | None:
        """`xl sched-credit2 -d DOM`: Name ID Weight Cap."""
        verb = await asyncio.to_thread(self.drv.sched_verb)
        for line in (await self._x(verb, "-d", self.name)).splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 4 and parts[0] == self.name:
                return int(parts[2]), int(parts[3])
        return None

    async def dump_core(self, fd: int) -> None:
        """`xl dump-core` into dom0's tmpfs, then streamed out into ``fd``."""
        img = f"{DUMP_DIR}/{self.name}.{self.pid}.core"
        await self._dom0(["mkdir", "-p", DUMP_DIR])
        try:
            await self._x("dump-core", self.name, img)
            await asyncio.to_thread(self.drv.read_file, img, fd)
        finally:
            with contextlib.suppress(Exception):
                await self._dom0(["rm", "-f", img])

    async def sysrq(self, key: str) -> None:
        await self._x("sysrq", self.name, key)

    async def trigger(self, what: str) -> None:
        try:
            await self._x("trigger", self.name, what)
        except HypervisorError as exc:
            raise HypervisorError(f"{exc} (a PV domain takes only nmi)") from exc

    async def renamed(self, old: str) -> None:
        await self._x("rename", old, self.name)
        if self.console is not None:
            self.console.name = self.name  # `xl console` of the new name from now on
        await asyncio.to_thread(self.drv.write_config, self.plan)

    async def devices(self, kind: str) -> list[dict[str, Any]] | None:
        out = await self._x(f"{kind}-list", self.name)
        return parse_block_list(out) if kind == "block" else parse_network_list(out)


class XenHostExtras:
    """XenDriver's share: the host's CPUs and scheduler (`xl info`, read once) and
    its message buffer (`xl dmesg`)."""

    xl: Xl
    _host: dict[str, str] | None = None

    def _host_info(self) -> dict[str, str]:
        if self._host is None:
            self._host = self.xl.host()
        return self._host

    def host_cpus(self) -> int:
        raw = self._host_info().get("nr_cpus", "")
        return int(raw) if raw.isdigit() and int(raw) > 0 else 1

    def sched_verb(self) -> str:
        """xl's command for the host's scheduler: sched-credit2 (Xen 4.17's default)."""
        return ("sched-credit" if self._host_info().get("xen_scheduler") == "credit"
                else "sched-credit2")

    def hypervisor_log(self, clear: bool = False) -> str | None:
        return self.xl("dmesg", *(["-c"] if clear else []))
