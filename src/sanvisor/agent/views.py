"""What the agent shows: the rows of `list`, `info`, `top`, and Domain-0 (the host).

A mixin of HostService: read-only, no verb logic. The hypervisor's own list (xl's
on a Xen host) is read once per view, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import TYPE_CHECKING, Any

from sanvisor.agent import hostinfo
from sanvisor.agent.configstore import ConfigStore, Registration
from sanvisor.agent.network import DEFAULT_BRIDGE, NAT_BRIDGE
from sanvisor.agent.table import Domain, DomainTable
from sanvisor.drivers.base import Driver, NicPlan
from sanvisor.errors import NotFoundError, SanvisorError
from sanvisor.model.domain import State
from sanvisor.pool.tls import Credentials, expiry

DOMAIN0 = ("Domain-0", "0")
DOMAIN0_UUID = "00000000-0000-0000-0000-000000000000"


def nic_bridge(nic: NicPlan) -> str | None:
    """The bridge a NIC is on (None: user-mode networking, no bridge)."""
    if nic.vif.type == "user" or (nic.tap is None and nic.vif.type != "nat"
                                  and not nic.vif.bridge):
        return None
    if nic.vif.type == "nat":
        return NAT_BRIDGE
    return nic.vif.bridge or DEFAULT_BRIDGE


class Views:
    table: DomainTable
    driver: Driver
    host_name: str
    configs: ConfigStore

    if TYPE_CHECKING:  # agent/managed.py
        def stopped_rows(self, running: set[str]) -> list[dict[str, Any]]: ...
        def registered_row(self, reg: Registration) -> dict[str, Any]: ...

    async def _listing(self) -> list[dict[str, Any]]:
        try:
            return await asyncio.to_thread(self.driver.hypervisor_domains)
        except Exception:  # an unreachable dom0 must not break `list`
            return []

    @staticmethod
    def host_row(listing: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        row: dict[str, Any] = {"name": "Domain-0", "domid": 0, "uuid": DOMAIN0_UUID,
                               "state": "running", "uptime": hostinfo.uptime()}
        d = next((d for d in listing or [] if d["domid"] == 0), None)
        if d is not None:  # a Xen host: xl's own Domain-0
            row.update(mem_mib=d["memory_kib"] >> 10, vcpus=d["vcpus"], letters=d["state"],
                       cpu_seconds=d["cpu_seconds"])
        else:
            row.update(mem_mib=hostinfo.mem_total_mib(), vcpus=hostinfo.cpu_count(),
                       letters="r-----", cpu_seconds=round(hostinfo.cpu_seconds(), 1))
        return row

    async def domain0(self) -> dict[str, Any]:
        """Domain-0: the host itself, as `list` shows it."""
        return self.host_row(await self._listing())

    async def lookup(self, ref: str) -> dict[str, Any]:
        """One domain's row by name, id or uuid; Domain-0 (the host) included."""
        if ref in DOMAIN0 or ref == DOMAIN0_UUID:
            return await self.domain0()
        try:
            return self.info(self.table.find(ref))
        except NotFoundError:  # a registered domain that does not run
            reg = next((r for r in self.configs.all() if ref in (r.name, r.uuid)), None)
            if reg is None:
                raise
            return self.registered_row(reg)

    async def facts(self) -> dict[str, Any]:
        """`sanvisor info`: this host as `xm info` showed it, and its accelerator."""
        u = os.uname()
        mi = hostinfo.meminfo()
        driver = self.driver
        facts: dict[str, Any] = {
            "host": self.host_name, "release": u.release, "version": u.version,
            "machine": u.machine, "nr_cpus": hostinfo.cpu_count(),
            **hostinfo.cpu_topology(), "total_memory": mi.get("MemTotal", 0) // 1024,
            "free_memory": mi.get("MemAvailable", 0) // 1024, "driver": driver.name}
        try:
            facts.update(await asyncio.to_thread(driver.host_facts))
        except (SanvisorError, OSError) as exc:  # an unreachable dom0: say so, go on
            facts["driver_error"] = str(exc)
        acc = driver.accelerator()
        facts["accelerator"] = acc["accel"]
        facts["accelerator_reason"] = acc["reason"]
        if acc.get("warning"):
            facts["accelerator_warning"] = acc["warning"]
        facts["domains"] = len(self.table)
        facts["home"] = str(self.table.layout.home)
        creds = Credentials.of_home(self.table.layout.home)
        if creds.present():  # a pool member: when its TLS credentials end
            end, warning = await asyncio.to_thread(expiry, creds)
            if end is not None:
                facts["tls_expires"] = f"{end:%Y-%m-%d %H:%M} UTC"
            if warning:
                facts["tls_warning"] = warning
        return facts

    def info(self, dom: Domain) -> dict[str, Any]:
        rec = dom.record
        state = rec.state
        cpu, busy = (dom.inst.cpu_usage() if dom.inst is not None and state is not State.LOST
                     else (0.0, 0))
        if state is State.RUNNING and busy == 0:
            state = State.BLOCKED
        return {
            "name": rec.spec.name, "domid": rec.domid, "uuid": rec.uuid,
            "state": state.value, "letters": state.letters, "reason": rec.reason,
            "mem_mib": rec.target_mib, "maxmem_mib": rec.max_mib,
            "vcpus": rec.vcpus, "maxvcpus": rec.spec.maxvcpus,
            "cpu_seconds": round(cpu, 1), "uptime": round(time.time() - rec.created, 1),
            "pid": rec.pid,
            "console_socket": str(self.table.layout.domain_dir(rec.uuid) / "console.sock"),
            "console_log": str(self.table.layout.domain_dir(rec.uuid) / "console.log"),
            "kernel": rec.kernel, "initrd": rec.initrd, "cmdline": rec.cmdline,
            "managed": self.configs.get(rec.spec.name) is not None,
            "vcpu_pins": dict(rec.vcpu_pins), "credit": dict(rec.credit),
            "disks": [vars(d) for d in rec.spec.disks],
            "vifs": [{"index": n.index, "mac": n.mac, "tap": n.tap, "bridge": nic_bridge(n),
                      "type": n.vif.type, "ip": n.vif.ip} for n in rec.nics],
            "config": rec.spec.to_dict(),
        }

    def view(self, dom: Domain) -> dict[str, Any]:
        """The domain after a verb: its row, or what is left of it if it is gone."""
        if dom in self.table:
            return self.info(dom)
        rec = dom.record
        return {"name": rec.spec.name, "domid": rec.domid, "uuid": rec.uuid,
                "state": "gone", "reason": rec.reason}

    async def domains(self) -> list[dict[str, Any]]:
        listing = await self._listing()
        doms = sorted(self.table, key=lambda d: d.record.domid)
        rows = [self.host_row(listing)] + [self.info(d) for d in doms]
        ours = {d.name for d in doms}
        rows += self.stopped_rows(ours)  # registered, not running: state ------
        for f in listing:  # xl's domains that sanvisor did not make: shown, untouched
            if f["domid"] != 0 and f["name"] not in ours:
                rows.append({"name": f["name"], "domid": f["domid"], "uuid": "",
                             "mem_mib": f["memory_kib"] >> 10, "vcpus": f["vcpus"],
                             "letters": f["state"], "state": "foreign",
                             "cpu_seconds": f["cpu_seconds"], "foreign": True})
        return rows

    async def stats(self) -> list[dict[str, Any]]:
        """`top`'s frame: Domain-0 (the host) first, then each domain with its counters."""
        out = [await self._host_stats()]
        for dom in sorted(self.table, key=lambda d: d.record.domid):
            row = self.info(dom)
            if dom.inst is not None and dom.record.state is not State.LOST:
                with contextlib.suppress(Exception):
                    st = vars(await dom.inst.stats())
                    # the vCPUs online now: under TCG offlined ones stay plugged
                    st["vcpus"] = dom.record.vcpus or st["vcpus"]
                    row["stats"] = st
            out.append(row)
        return out


    async def _host_stats(self) -> dict[str, Any]:
        listing = await self._listing()
        row = self.host_row(listing)
        total = hostinfo.meminfo().get("MemTotal", 0)
        if listing:  # Xen: xl's Domain-0, and the machine's memory from `xl info` (once)
            if not getattr(self, "_xen_mem_kib", 0):
                with contextlib.suppress(Exception):
                    facts = await asyncio.to_thread(self.driver.host_facts)
                    self._xen_mem_kib = int(str(facts.get("total_memory", 0))) << 10
            total = getattr(self, "_xen_mem_kib", 0) or total
            used = int(row["mem_mib"]) << 10
        else:  # the host itself: the memory its processes (guests included) use
            used = total - hostinfo.meminfo().get("MemAvailable", 0)
        row["stats"] = {"cpu_seconds": row["cpu_seconds"], "mem_kib": used,
                        "vcpus": row["vcpus"]}
        row["host_mem_kib"] = total
        row["letters"] = row.get("letters", "r-----")
        return row
