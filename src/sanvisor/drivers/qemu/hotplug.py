"""The QEMU instance's hotplug verbs: memory (balloon, DIMMs), vCPUs (plug, unplug, or
Xen's PV semantics under TCG), disks and NICs, and the guest kit's control channel.

A mixin of QemuInstance: it uses the instance's QMP client and plan.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sanvisor.drivers.base import LaunchPlan, NicPlan
from sanvisor.drivers.qemu import argv as qargv
from sanvisor.errors import DeviceError, HypervisorError, TimeoutError_
from sanvisor.model.domain import DiskSpec
from sanvisor.waiting import wait_until_async

Pred = Callable[[dict[str, Any]], bool]


def _path_is(path: str) -> Pred:
    """DEVICE_DELETED for ``path`` or a child of it (QEMU 7.2 reports only the
    CPU's lapic child when a CPU is unplugged)."""
    def pred(data: dict[str, Any]) -> bool:
        got = str(data.get("path", ""))
        return got == path or got.startswith(path + "/")
    return pred


class QemuHotplug:
    plan: LaunchPlan

    if TYPE_CHECKING:
        async def qmp(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float = 30.0) -> Any: ...
        async def _run_until_event(self, cmd: str, args: dict[str, Any], name: str,
                                   done: Pred, timeout: float) -> dict[str, Any]: ...
        async def apply_pins(self) -> None: ...

    async def set_balloon(self, mib: int) -> None:
        await self.qmp("balloon", {"value": mib << 20})

    async def balloon_mib(self) -> int:
        info = await self.qmp("query-balloon")
        return int(info["actual"]) >> 20

    async def add_memory(self, mib: int, index: int) -> None:
        mem_id, dimm_id = f"mem{index}", f"dimm{index}"
        await self.qmp("object-add", {"qom-type": "memory-backend-ram", "id": mem_id,
                                      "size": mib << 20})
        try:
            await self.qmp("device_add", {"driver": "pc-dimm", "id": dimm_id, "memdev": mem_id})
        except HypervisorError:
            with contextlib.suppress(HypervisorError):
                await self.qmp("object-del", {"id": mem_id})
            raise

    async def _slot_free(self, path: str) -> bool:
        return not any(c.get("qom-path") == path for c in await self._cpus())

    async def _cpus(self) -> list[dict[str, Any]]:
        return list(await self.qmp("query-hotpluggable-cpus"))

    async def set_vcpus(self, count: int) -> int:
        """Plug the lowest free CPU slots, unplug the highest present ones (never CPU 0).

        Under TCG, a guest with the control channel gets Xen's PV semantics instead of
        an unplug: its extra vCPUs stay plugged and go offline inside the guest (QEMU
        7.2 cannot unplug a TCG vCPU safely, see _check_tcg_budget)."""
        def topo(c: dict[str, Any]) -> tuple[int, ...]:
            p = c["props"]
            return tuple(int(p.get(k, 0)) for k in ("socket-id", "die-id", "core-id",
                                                     "thread-id"))

        slots = sorted(await self._cpus(), key=topo)
        present = [i for i, c in enumerate(slots) if c.get("qom-path")]
        free = [i for i, c in enumerate(slots) if not c.get("qom-path")]
        cooperative = "tcg" in self.plan.accel and self.plan.guest_channel
        if count > len(present):
            self._check_tcg_budget(count - len(present))
            for i in free[: count - len(present)]:
                self._note_tcg_context()
                await self.qmp("device_add", {"driver": slots[i]["type"], "id": f"cpu{i}",
                                              **slots[i]["props"]})
                present.append(i)
        elif count < len(present) and not cooperative:
            if "tcg" in self.plan.accel:
                raise HypervisorError(
                    f"cannot unplug vCPUs of {self.plan.spec.name} under TCG: QEMU 7.2 "
                    "crashes on the next save or migration after a TCG vCPU unplug, and "
                    "this guest has no sanvisor control channel to offline them itself",
                    domain=self.plan.spec.name)
            for i in list(reversed(present))[: len(present) - count]:
                if i == 0:
                    break
                path = str(slots[i]["qom-path"])  # also names CPUs from the command line
                await self._run_until_event(
                    "device_del", {"id": path}, "DEVICE_DELETED", _path_is(path), timeout=30)

                with contextlib.suppress(TimeoutError_):  # right after the lapic goes
                    await wait_until_async(f"vCPU slot {path} to free",
                                           functools.partial(self._slot_free, path), 5.0)
                present.remove(i)
        await self.apply_pins()  # vcpu-pin also holds for vCPUs plugged later
        if cooperative:
            answer = await self.guest_request(f"vcpus {count}")
            if not answer.startswith("ok"):
                raise HypervisorError(f"the guest refused vcpus {count}: {answer}")
        return len(present)

    async def guest_request(self, line: str, timeout: float = 15.0) -> str:
        """One request on the guest-kit control channel (virtio-serial), one answer."""
        path = str(self.plan.rundir / "ctl.sock")
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_unix_connection(path)
                try:
                    writer.write(line.encode() + b"\n")
                    await writer.drain()
                    answer = await reader.readline()
                finally:
                    writer.close()
        except (TimeoutError, OSError) as exc:
            raise HypervisorError(f"{self.plan.spec.name} did not answer on its control "
                                  f"channel ({line!r}): {exc or 'timeout'}") from exc
        return answer.decode(errors="replace").strip()

    # QEMU 7.2 under multi-threaded TCG gives each vCPU thread a TCG context and never
    # frees it (at most maxcpus per process): plugging a vCPU again after an unplug
    # aborts QEMU (tcg_register_thread: n < tcg_max_ctxs). Single-threaded TCG is no
    # way out: there, unplugging a vCPU crashes QEMU (qemu_thread_join deadlock).
    # So we count contexts and refuse, clearly, the plug that would kill the guest.
    def _tcg_file(self) -> Path:
        return self.plan.rundir / "tcg-contexts"

    def _tcg_used(self) -> int:
        try:
            return int(self._tcg_file().read_text())
        except (OSError, ValueError):
            return self.plan.vcpus_now or self.plan.spec.vcpus

    def _check_tcg_budget(self, more: int) -> None:
        if "tcg" not in self.plan.accel:
            return
        left = self.plan.spec.maxvcpus - self._tcg_used()
        if more > left:
            raise HypervisorError(
                f"cannot plug {more} more vCPU(s) into {self.plan.spec.name}: under TCG, "
                "QEMU 7.2 cannot plug a vCPU again after one was unplugged "
                f"({left} plug(s) left until the domain restarts)",
                domain=self.plan.spec.name)

    def _note_tcg_context(self) -> None:
        if "tcg" in self.plan.accel:
            self._tcg_file().write_text(str(self._tcg_used() + 1))

    async def attach_disk(self, disk: DiskSpec, index: int, source: str | None = None
                          ) -> None:
        if disk.path:
            await self.qmp("blockdev-add", qargv.disk_blockdev(disk, source))
        try:
            await self.qmp("device_add", qargv.disk_device(disk))
        except HypervisorError:
            if disk.path:
                with contextlib.suppress(HypervisorError):
                    await self.qmp("blockdev-del", {"node-name": qargv.disk_node(disk)})
            raise

    async def detach_disk(self, disk: DiskSpec) -> None:
        dev = f"dev-{disk.target}"
        await self._run_until_event("device_del", {"id": dev}, "DEVICE_DELETED",
                                    lambda d: d.get("device") == dev, timeout=30)
        if disk.path:
            try:
                await self.qmp("blockdev-del", {"node-name": qargv.disk_node(disk)})
            except HypervisorError as exc:
                raise DeviceError(f"disk {disk.target} left the guest but its backend "
                                  f"could not be closed: {exc}") from exc

    async def attach_nic(self, nic: NicPlan) -> None:
        await self.qmp("netdev_add", qargv.nic_netdev(nic))
        try:
            await self.qmp("device_add", qargv.nic_device(nic))
        except HypervisorError:
            with contextlib.suppress(HypervisorError):
                await self.qmp("netdev_del", {"id": f"net{nic.index}"})
            raise

    async def detach_nic(self, nic: NicPlan) -> None:
        dev = f"nic{nic.index}"
        await self._run_until_event("device_del", {"id": dev}, "DEVICE_DELETED",
                                    lambda d: d.get("device") == dev, timeout=30)
        await self.qmp("netdev_del", {"id": f"net{nic.index}"})
