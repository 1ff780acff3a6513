"""The Xen driver against a fake xl (the runner is injected, as on a real dom0).

What runs on the real nested Xen is in tests/guest (when the Xen host kit is
there); here: xl.cfg rendering, xl output parsing, xl errors kept in ours.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from sanvisor.drivers.base import LaunchPlan, NicPlan
from sanvisor.drivers.xen.driver import XenDriver
from sanvisor.drivers.xen.xl import DomInfo, Xl, xl_reason
from sanvisor.errors import HypervisorError, NotFoundError
from sanvisor.model.config import parse_config

HEADER = "Name                                        ID   Mem VCPUs\tState\tTime(s)\n"


class FakeXl:
    """Just enough of xl: create/list/pause/unpause/destroy, with xl's messages."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.doms: dict[str, dict[str, Any]] = {}
        self.next_id = 1
        self.calls: list[list[str]] = []

    def put(self, path: str, data: bytes) -> None:
        self.files[path] = data

    def run(self, argv: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        self.calls.append(argv)
        _, verb, *rest = argv
        if verb == "list":
            rows = [f"{'Domain-0':<40} {0:>5} {1536:>5} {2:>5}     r-----      12.0"]
            rows += [f"{n:<40} {d['id']:>5} {d['mem']:>5} {1:>5}     {d['state']}       0.4"
                     for n, d in self.doms.items()]
            return 0, HEADER + "\n".join(rows) + "\n", ""
        if verb == "create":
            cfg = self.files[rest[-1]].decode()
            name = cfg.split('name = "')[1].split('"')[0]
            mem = int(cfg.split("memory = ")[1].split()[0])
            if mem > 1000:
                return 1, "", (f"Parsing config from {rest[-1]}\nlibxl: error: "
                               "libxl_create.c:720:initiate_domain_create: Domain 7:cannot "
                               "allocate 2048 MiB: not enough memory in dom0\n")
            self.doms[name] = {"id": self.next_id, "mem": mem,
                               "state": "--p---" if "-p" in rest else "-b----"}
            self.next_id += 1
            return 0, "", f"Parsing config from {rest[-1]}\n"
        name = rest[-1]
        if name not in self.doms:
            return 1, "", f"Invalid domain identifier: {name}\n"
        if verb == "pause":
            self.doms[name]["state"] = "--p---"
        elif verb == "unpause":
            self.doms[name]["state"] = "-b----"
        elif verb == "destroy":
            del self.doms[name]
        return 0, "", ""


def _plan(tmp: Path, text: str) -> LaunchPlan:
    spec = parse_config(text, filename="x.cfg").spec
    nics = [NicPlan(index=i, vif=v, mac=v.mac or "00:16:3e:00:00:0a", tap=None)
            for i, v in enumerate(spec.vifs)]
    return LaunchPlan(spec=spec, rundir=tmp, kernel=Path("/boot/vmlinux"),
                      initrd=Path("/boot/initrd"), cmdline="console=hvc0", nics=nics)


async def _noevents(name: str, data: dict[str, Any]) -> None:
    return None


def test_xl_cfg_rendering(tmp_path: Path) -> None:
    plan = _plan(tmp_path, "name='vd'\nmemory=512\nmaxmem=1024\nvcpus=2\n"
                 "vif=['mac=00:16:3e:00:00:01, bridge=xenbr0']\n"
                 "disk=['phy:/dev/mapper/mpath5,/dev/sda,w']\nextra='quote\"inject'\n")
    text = XenDriver(FakeXl().run, FakeXl().put).config_text(plan)
    assert 'name = "vd"\ntype = "pv"\nkernel = "/boot/vmlinux"' in text
    assert "memory = 512\nmaxmem = 1024\nvcpus = 2\nmaxvcpus = 2" in text
    assert ('disk = [ "vdev=xvda, access=rw, format=raw, backendtype=phy, '
            'target=/dev/mapper/mpath5" ]') in text
    assert 'vif = [ "mac=00:16:3e:00:00:01, bridge=xenbr0" ]' in text
    assert 'extra = "console=hvc0"' in text  # the plan's cmdline, quoted
    # a parsed round trip: what we write is valid xl.cfg for our own parser too
    back = parse_config(text.replace("type = \"pv\"\n", ""), filename="out.cfg").spec
    assert back.disks[0].path == "/dev/mapper/mpath5" and back.vifs[0].bridge == "xenbr0"
    # a PVH guest stays PVH (it rendered as PV once: no live migration for it then)
    pvh = XenDriver(FakeXl().run, FakeXl().put).config_text(
        _plan(tmp_path, "name='vh'\ntype='pvh'\nmemory=128\n"))
    assert 'name = "vh"\ntype = "pvh"\n' in pvh


def test_lifecycle_and_errors_through_the_runner(tmp_path: Path) -> None:
    fake = FakeXl()
    drv = XenDriver(fake.run, fake.put, poll=0.01)

    async def go() -> None:
        inst = await drv.launch(_plan(tmp_path, "name='g1'\nmemory=128\n"), _noevents)
        assert (await inst.status()).status == "running"
        await inst.pause()
        assert (await inst.status()).status == "paused"
        await inst.unpause()
        assert fake.calls[-1] == ["xl", "unpause", "g1"]
        await inst.destroy()
        await inst.close()
        with pytest.raises(HypervisorError) as exc:
            await drv.launch(_plan(tmp_path, "name='big'\nmemory=2048\n"), _noevents)
        assert str(exc.value) == ("xl create failed: Domain 7:cannot allocate 2048 MiB: "
                                  "not enough memory in dom0")

    asyncio.run(go())
    with pytest.raises(NotFoundError, match="Invalid domain identifier: nope"):
        Xl(fake.run)("pause", "nope")


def test_foreign_domains_are_listed_not_touched(tmp_path: Path) -> None:
    fake = FakeXl()
    fake.doms["made-by-hand"] = {"id": 9, "mem": 256, "state": "-b----"}
    drv = XenDriver(fake.run, fake.put)
    from sanvisor.agent.manager import Manager
    from sanvisor.agent.service import HostService
    from sanvisor.paths import Layout

    layout = Layout(tmp_path / "home")
    layout.ensure()
    rows = asyncio.run(HostService(Manager(layout, drv)).domains())
    assert [(r["name"], r["state"]) for r in rows] == [("Domain-0", "running"),
                                                       ("made-by-hand", "foreign")]
    assert rows[0]["mem_mib"] == 1536  # xl's Domain-0, not the machine's memory
    assert sum(c[1] == "list" for c in fake.calls) == 1  # one xl list for the view
    assert not any(c[1] in ("destroy", "pause") for c in fake.calls)


def test_xl_reason_keeps_xls_words() -> None:
    assert xl_reason("", "", 3) == "exit status 3"
    assert xl_reason("Parsing config from a.cfg\nxl: some failure\n", "", 1) == \
        "xl: some failure"


def test_xl_reason_prefers_the_first_error_and_the_scripts_word() -> None:
    err = ("Parsing config from /etc/xen/t1.cfg\n"
           "domainbuilder: detail: xc_dom_release: called\n"
           "block: /dev/nope: no such device\n"
           "libxl: error: libxl_exec.c:117:libxl_report_child_exitstatus: "
           "/etc/xen/scripts/block add [139] exited with error status 1\n"
           "libxl: error: libxl_create.c:1672:domcreate_launch_dm: Domain 1:unable to add "
           "disk devices\n"
           "libxl: error: libxl_domain.c:1064:domain_destroy_cb: Domain 1:Destruction of "
           "domain failed\n")
    assert xl_reason(err, "", 3) == ("/etc/xen/scripts/block add [139] exited with error "
                                     "status 1 (block: /dev/nope: no such device)")
    mem = ("libxl: error: libxl_create.c:720:libxl__domain_make: Domain 2:failed to "
           "free memory for the domain\n")
    assert xl_reason(mem, "", 1) == "Domain 2:failed to free memory for the domain"


def test_dominfo_tells_a_reboot_from_a_poweroff() -> None:
    def info(state: str) -> DomInfo:
        return DomInfo(name="a", domid=3, state=state, memory_kib=0, vcpus=1,
                       cpu_seconds=0.0)

    assert info("---sr-").rebooting and info("---sr-").letter == "s"
    assert not info("---s--").rebooting  # powered off
    assert not info("-b----").rebooting and info("-b----").letter == "b"


def test_a_missing_boot_file_is_named() -> None:
    from sanvisor.drivers.xen.driver import _name_boot_file

    plan = LaunchPlan(spec=parse_config("name='a'\n").spec, rundir=Path("/tmp/x"),
                      kernel=Path("/srv/k"), initrd=Path("/srv/i"), cmdline="")
    err = HypervisorError("xl create failed: xc_dom_kernel_file failed: No such file")
    assert str(_name_boot_file(err, plan)).endswith("(dom0 path /srv/k)")
    other = HypervisorError("xl create failed: out of memory")
    assert _name_boot_file(other, plan) is other
