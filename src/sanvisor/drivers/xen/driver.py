"""XenDriver and XenInstance: the driver interface over xl.

There is no event stream from xl, so a watcher polls `xl list` and turns state
changes into the events the agent knows (STOP, RESUME, SHUTDOWN, and the
domain's disappearance). xl applies on_poweroff/on_reboot/on_crash itself,
from the xl.cfg we write.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sanvisor.drivers.base import (
    Driver,
    EventSink,
    Instance,
    LaunchPlan,
    NicPlan,
    RunStatus,
    Stats,
)
from sanvisor.drivers.xen import xlcfg
from sanvisor.drivers.xen.xl import Runner, Xl
from sanvisor.errors import HypervisorError, SanvisorError
from sanvisor.model.domain import DiskSpec

log = logging.getLogger(__name__)
CFG_DIR = "/etc/xen/sanvisor"
STATES = {"r": "running", "b": "running", "p": "paused", "s": "shutdown", "c": "crashed",
          "d": "dying"}


class XenInstance(Instance):
    def __init__(self, xl: Xl, plan: LaunchPlan, domid: int, events: EventSink,
                 poll: float) -> None:
        self.xl = xl
        self.plan = plan
        self.pid = domid  # the agent's "pid" of a Xen domain is its domid
        self._sink = events
        self._poll = poll
        self._last = ""
        self._task: asyncio.Task[None] | None = None
        self._cpu = 0.0

    @property
    def name(self) -> str:
        return self.plan.spec.name

    async def _x(self, *args: str) -> str:
        return await asyncio.to_thread(self.xl, *args)

    def start_watch(self) -> None:
        self._task = asyncio.create_task(self._watch(), name=f"xl-watch-{self.name}")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll)
            try:
                info = await asyncio.to_thread(self.xl.info, self.name)
            except (SanvisorError, OSError) as exc:  # a channel hiccup: look again later
                log.warning("%s: xl list failed: %s", self.name, exc)
                continue
            if info is None:
                await self._sink("DOMAIN_GONE", {"domid": self.pid})
                return
            if info.domid != self.pid:  # xl restarted it (on_reboot=restart): a new domid
                self.pid = info.domid
                await self._sink("RESET", {"domid": info.domid})
            self._cpu = info.cpu_seconds
            letter = info.letter
            if letter != self._last:
                event = {"p": "STOP", "r": "RESUME", "b": "RESUME", "s": "SHUTDOWN",
                         "c": "GUEST_PANICKED"}.get(letter)
                if event and self._last:
                    await self._sink(event, {"xl_state": info.state, "handled_by": "xl"})
                self._last = letter

    async def status(self) -> RunStatus:
        info = await asyncio.to_thread(self.xl.info, self.name)
        if info is None:
            return RunStatus(running=False, status="gone")
        st = STATES.get(info.letter, "running")
        return RunStatus(running=st == "running", status=st)

    async def pause(self) -> None:
        await self._x("pause", self.name)

    async def unpause(self) -> None:
        await self._x("unpause", self.name)

    async def powerdown(self) -> None:
        await self._x("shutdown", self.name)

    async def reset(self) -> None:
        await self._x("reboot", self.name)

    async def destroy(self) -> None:
        with contextlib.suppress(SanvisorError):  # already gone is fine
            await self._x("destroy", self.name)

    async def save_to(self, fd: int) -> None:
        raise HypervisorError("save through the Xen driver writes the image inside dom0: "
                              "use save_in_dom0")

    async def restore_from(self, fd: int) -> None:
        raise HypervisorError("restore through the Xen driver reads the image inside dom0")

    async def save_in_dom0(self, path: str) -> None:
        await self._x("save", self.name, path)

    async def set_balloon(self, mib: int) -> None:
        await self._x("mem-set", self.name, f"{mib}m")

    async def balloon_mib(self) -> int:
        info = await asyncio.to_thread(self.xl.info, self.name)
        return (info.memory_kib >> 10) if info else 0

    async def add_memory(self, mib: int, index: int) -> None:
        # a PV guest grows by ballooning up to maxmem: raise the ceiling, no DIMM
        await self._x("mem-max", self.name, f"{self.plan.spec.maxmem}m")

    async def set_vcpus(self, count: int) -> int:
        await self._x("vcpu-set", self.name, str(count))
        return self.plan.spec.maxvcpus  # PV vCPUs stay allocated, offline in the guest

    async def attach_disk(self, disk: DiskSpec, index: int, source: str | None = None
                          ) -> None:
        await self._x("block-attach", self.name, xlcfg.disk_entry(disk))

    async def detach_disk(self, disk: DiskSpec) -> None:
        vdev = disk.target if disk.target.startswith("xvd") else "xvd" + disk.target[-1]
        await self._x("block-detach", self.name, vdev)

    async def attach_nic(self, nic: NicPlan) -> None:
        await self._x("network-attach", self.name, *xlcfg.vif_entry(nic).split(", "))

    async def detach_nic(self, nic: NicPlan) -> None:
        await self._x("network-detach", self.name, nic.mac)

    def cpu_usage(self) -> tuple[float, int]:
        return self._cpu, 1 if self._last == "r" else 0

    async def stats(self) -> Stats:
        info = await asyncio.to_thread(self.xl.info, self.name)
        if info is None:
            return Stats(cpu_seconds=0, vcpus_busy=0, mem_kib=0, vcpus=0)
        return Stats(cpu_seconds=info.cpu_seconds, vcpus_busy=int(info.letter == "r"),
                     mem_kib=info.memory_kib, vcpus=info.vcpus)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def console_socket(self) -> Path:
        return self.plan.rundir / "console.sock"

    @property
    def console_log(self) -> Path:
        return self.plan.rundir / "console.log"


class XenDriver(Driver):
    name = "xen"
    memory_block_mib = 1  # PV guests balloon to any size up to maxmem

    def __init__(self, run: Runner, put_file: Callable[[str, bytes], None], *,
                 poll: float = 0.5) -> None:
        self.xl = Xl(run)
        self._put = put_file
        self._poll = poll

    def config_text(self, plan: LaunchPlan) -> str:
        return xlcfg.render(plan.spec, kernel=str(plan.kernel),
                            ramdisk=str(plan.initrd) if plan.initrd else None,
                            cmdline=plan.cmdline, nics=plan.nics)

    async def launch(self, plan: LaunchPlan, events: EventSink) -> Instance:
        path = f"{CFG_DIR}/{plan.spec.name}.cfg"
        data = self.config_text(plan).encode()

        def put() -> None:
            with self.xl.lock:  # the same channel as xl's commands
                self._put(path, data)

        await asyncio.to_thread(put)
        args = ["create", *(["-p"] if plan.paused else []), path]
        await asyncio.to_thread(functools.partial(self.xl, *args))
        info = await asyncio.to_thread(self.xl.info, plan.spec.name)
        if info is None:
            raise HypervisorError(f"xl created {plan.spec.name} but it is gone already")
        inst = XenInstance(self.xl, plan, info.domid, events, self._poll)
        inst.start_watch()
        return inst

    async def reattach(self, plan: LaunchPlan, pid: int, events: EventSink) -> Instance | None:
        info = await asyncio.to_thread(self.xl.info, plan.spec.name)
        if info is None or info.domid != pid:
            return None
        inst = XenInstance(self.xl, plan, info.domid, events, self._poll)
        inst.start_watch()
        return inst

    def hypervisor_domains(self) -> list[dict[str, Any]]:
        """`xl list`, Domain-0 and domains made outside sanvisor included."""
        return [vars(d) for d in self.xl.list()]
