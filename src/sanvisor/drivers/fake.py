"""A driver with no hypervisor behind it (Ganeti's hv_fake): domains are a few bytes
of state in their run directory. It honours the driver interface and its events,
so the agent's verbs, state machine, undo paths and restart logic are tested in
milliseconds, and a pool of hundreds of domains can be simulated. It is never
what a feature is called done on: real guests prove that.

Faults for tests: ``FakeDriver.fail_next[verb] = error`` makes the next call of
that verb raise; :meth:`FakeInstance.guest` injects what a guest would do (power
off, reboot, panic); :meth:`FakeInstance.vanish` is its process dying. It receives
migrations (:class:`FakeIncoming`: the target side, for the agent's target logic) but
sends none.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from pathlib import Path
from typing import Any

from sanvisor.drivers.base import (
    Driver,
    EventSink,
    IncomingMigration,
    Instance,
    LaunchPlan,
    NicPlan,
    RunStatus,
    Stats,
    StreamTls,
    VcpuInfo,
)
from sanvisor.errors import HypervisorError
from sanvisor.model.domain import DiskSpec
from sanvisor.model.lifecycle import DomainEvent, EventKind
from sanvisor.model.migration import ConvergencePolicy

STATE_FILE = "fake.json"
_PIDS = itertools.count(1_000_000)


class FakeInstance(Instance):
    def __init__(self, drv: FakeDriver, plan: LaunchPlan, pid: int, events: EventSink,
                 state: dict[str, Any]) -> None:
        self.drv = drv
        self.plan = plan
        self.pid = pid
        self._sink = events
        self.st = state

    # ---- the fake hypervisor's state ----------------------------------------------------
    def _save(self) -> None:
        path = self.plan.rundir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.st))
        os.replace(tmp, path)

    def _verb(self, name: str) -> None:
        self.drv.calls.append((self.plan.spec.name, name))
        err = self.drv.fail_next.pop(name, None)
        if err is not None:
            raise err
        if self.st["status"] == "gone":
            raise HypervisorError(f"{self.plan.spec.name}: no such fake domain")

    async def _set(self, status: str, event: EventKind | None = None, **kw: Any) -> None:
        self.st["status"] = status
        self._save()
        if event is not None:
            await self._sink(DomainEvent(event, **kw))

    # ---- what tests inject ----------------------------------------------------------------
    async def guest(self, what: str) -> None:
        """The guest does ``what``: 'poweroff', 'reboot' or 'panic'."""
        kind = {"poweroff": EventKind.POWERED_OFF, "reboot": EventKind.RESET_REQUESTED,
                "panic": EventKind.CRASHED}[what]
        status = {"poweroff": "shutdown", "reboot": "shutdown", "panic": "guest-panicked"}
        await self._set(status[what], kind, detail=f"fake guest {what}")

    async def vanish(self) -> None:
        """Its process dies (kill -9 of a QEMU)."""
        await self._set("gone", EventKind.EXITED, detail="fake process killed")

    # ---- the interface ----------------------------------------------------------------------
    def cpu_usage(self) -> tuple[float, int]:
        return float(self.st.get("cpu", 0.0)), 1 if self.st["status"] == "running" else 0

    async def status(self) -> RunStatus:
        return RunStatus(running=self.st["status"] == "running", status=self.st["status"])

    async def pause(self) -> None:
        self._verb("pause")
        await self._set("paused")

    async def unpause(self) -> None:
        self._verb("unpause")
        await self._set("running")

    async def powerdown(self) -> None:
        """The ACPI button: a cooperative guest powers off (later, as a real one would),
        unless the test made it ignore the button."""
        self._verb("powerdown")
        if self.drv.obey_power_button and self.st["status"] == "running":
            asyncio.get_running_loop().call_soon(
                lambda: asyncio.ensure_future(self.guest("poweroff")))

    async def reset(self) -> None:
        self._verb("reset")
        self.st["boots"] = int(self.st.get("boots", 1)) + 1
        await self._set("paused")

    async def destroy(self) -> None:
        self._verb("destroy")
        self.st["status"] = "gone"
        (self.plan.rundir / STATE_FILE).unlink(missing_ok=True)

    async def save_to(self, fd: int) -> None:
        self._verb("save")
        await self._set("paused")
        os.write(fd, json.dumps(self.st).encode())

    async def restore_from(self, fd: int) -> None:
        self._verb("restore")
        data = b""
        while chunk := os.read(fd, 1 << 16):
            data += chunk
        self.st.update(json.loads(data), status="paused")
        self._save()

    async def set_balloon(self, mib: int) -> None:
        self._verb("balloon")
        self.st["balloon"] = mib
        self._save()

    async def balloon_mib(self) -> int:
        return int(self.st.get("balloon", self.plan.spec.memory))

    async def add_memory(self, mib: int, index: int) -> None:
        self._verb("add-memory")
        self.st.setdefault("dimms", []).append(mib)
        self._save()

    async def set_vcpus(self, count: int) -> int:
        self._verb("vcpus")
        self.st["vcpus"] = count
        self._save()
        return max(count, int(self.st.get("plugged", count)))

    async def attach_disk(self, disk: DiskSpec, index: int, source: str | None = None
                          ) -> None:
        self._verb("attach-disk")
        self.st.setdefault("disks", []).append(disk.target)
        self._save()

    async def detach_disk(self, disk: DiskSpec) -> None:
        self._verb("detach-disk")
        self.st["disks"] = [d for d in self.st.get("disks", []) if d != disk.target]
        self._save()

    async def attach_nic(self, nic: NicPlan) -> None:
        self._verb("attach-nic")
        self.st.setdefault("nics", []).append(nic.mac)
        self._save()

    async def detach_nic(self, nic: NicPlan) -> None:
        self._verb("detach-nic")
        self.st["nics"] = [m for m in self.st.get("nics", []) if m != nic.mac]
        self._save()

    async def vcpu_info(self) -> list[VcpuInfo]:
        self._verb("vcpu-list")
        plugged = max(int(self.st.get("vcpus", 1)), int(self.st.get("plugged", 0)))
        pins = self.st.get("pins", {})
        return [VcpuInfo(vcpu=v, online=v < plugged, cpu=0 if v < plugged else None,
                         running=self.st["status"] == "running" and v < plugged,
                         seconds=float(self.st.get("cpu", 0.0)),
                         affinity=pins.get(str(v), list(range(self.drv.ncpus))))
                for v in range(self.plan.spec.maxvcpus)]

    async def pin_vcpu(self, vcpu: int, cpus: list[int]) -> None:
        self._verb("vcpu-pin")
        self.st.setdefault("pins", {})[str(vcpu)] = list(cpus)
        self.plan.vcpu_pins[vcpu] = list(cpus)
        self._save()

    async def set_credit(self, weight: int, cap: int) -> None:
        self._verb("sched-credit")
        self.st["credit"] = {"weight": weight, "cap": cap}
        self._save()

    async def dump_core(self, fd: int) -> None:
        self._verb("dump-core")
        os.write(fd, b"\x7fELF fake core of " + self.plan.spec.name.encode())

    async def sysrq(self, key: str) -> None:
        self._verb("sysrq")
        self.st.setdefault("sysrq", []).append(key)
        self._save()

    async def trigger(self, what: str) -> None:
        self._verb(f"trigger-{what}")
        if what == "power":
            await self.powerdown()

    async def stats(self) -> Stats:
        return Stats(cpu_seconds=float(self.st.get("cpu", 0.0)), vcpus_busy=0,
                     mem_kib=(await self.balloon_mib()) << 10,
                     vcpus=int(self.st.get("vcpus", self.plan.spec.vcpus)))

    async def close(self) -> None:
        self.drv.live.pop(self.pid, None)


class FakeIncoming(IncomingMigration):
    """A migration arriving: the domain's copy, paused, that ``finish`` hands over and
    ``abort`` destroys (``fail_next["abort"]``: that abort fails, the copy stays)."""

    def __init__(self, inst: FakeInstance) -> None:
        self.inst = inst
        self.pid = inst.pid
        self.address = f"fake:{inst.plan.rundir}"

    async def finish(self, timeout: float) -> Instance:
        self.inst._verb("finish")
        return self.inst

    async def abort(self) -> None:
        self.inst.drv.calls.append((self.inst.plan.spec.name, "abort"))
        err = self.inst.drv.fail_next.pop("abort", None)
        if err is not None:
            raise err
        if self.inst.st["status"] != "gone":
            await self.inst.destroy()


class FakeDriver(Driver):
    name = "fake"

    def __init__(self) -> None:
        self.fail_next: dict[str, BaseException] = {}  # verb -> raised once
        self.calls: list[tuple[str, str]] = []  # (domain, verb), in order
        self.live: dict[int, FakeInstance] = {}
        self.obey_power_button = True
        self.ncpus = 4  # host CPUs domains can be pinned to
        self.dmesg: list[str] | None = None  # a hypervisor buffer (None: QEMU-like, none)

    def host_cpus(self) -> int:
        return self.ncpus

    def hypervisor_log(self, clear: bool = False) -> str | None:
        if self.dmesg is None:
            return None
        text = "".join(f"{line}\n" for line in self.dmesg)
        if clear:
            self.dmesg.clear()
        return text

    def accelerator(self) -> dict[str, object]:
        return {"accel": "fake", "reason": "the fake driver: no hypervisor"}

    async def launch(self, plan: LaunchPlan, events: EventSink) -> Instance:
        err = self.fail_next.pop("launch", None)
        if err is not None:
            raise err
        plan.rundir.mkdir(parents=True, exist_ok=True, mode=0o700)
        status = "paused" if plan.paused or plan.incoming else "running"
        inst = FakeInstance(self, plan, next(_PIDS), events,
                            {"status": status, "vcpus": plan.vcpus_now or plan.spec.vcpus,
                             "pins": {str(v): c for v, c in plan.vcpu_pins.items()},
                             "credit": dict(plan.credit)})
        inst.st["pid"] = inst.pid
        inst._save()
        self.live[inst.pid] = inst
        return inst

    async def incoming(self, plan: LaunchPlan, events: EventSink, *, live: bool,
                       policy: ConvergencePolicy,
                       tls: StreamTls | None = None) -> IncomingMigration:
        inst = await self.launch(plan, events)  # plan.incoming: paused
        assert isinstance(inst, FakeInstance)
        return FakeIncoming(inst)

    async def reattach(self, plan: LaunchPlan, pid: int, events: EventSink
                       ) -> Instance | None:
        path: Path = plan.rundir / STATE_FILE
        try:
            st = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if st.get("pid") != pid or st.get("status") == "gone":
            return None
        inst = FakeInstance(self, plan, pid, events, st)
        self.live[pid] = inst
        return inst
