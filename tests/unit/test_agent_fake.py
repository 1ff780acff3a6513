"""The agent's verbs, state machine, undo paths and restart, on the fake driver (no
hypervisor): milliseconds each. Real guests prove the rest (tests/guest)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sanvisor.agent.manager import Manager
from sanvisor.agent.network import Network
from sanvisor.agent.service import HostService
from sanvisor.command import Result
from sanvisor.drivers.fake import FakeDriver, FakeInstance
from sanvisor.errors import ConflictError, HypervisorError, RecordError, SanvisorError
from sanvisor.model.config import parse_config
from sanvisor.model.domain import DomainSpec, State
from sanvisor.paths import Layout


class FakeNetwork(Network):
    """Taps and bridges recorded, never made (the tests run as root)."""

    def __init__(self) -> None:
        super().__init__(runner=lambda argv, **kw: Result(list(argv), 0, "", ""))
        self.taps: set[str] = set()

    def ensure_bridge(self, name: str) -> None:
        pass

    def ensure_nat(self) -> None:
        pass

    def add_tap(self, tap: str, bridge: str) -> None:
        assert tap not in self.taps
        self.taps.add(tap)

    def del_tap(self, tap: str) -> None:
        self.taps.discard(tap)


def _kit(tmp: Path) -> Callable[[], tuple[Path, Path]]:
    k, i = tmp / "vmlinux", tmp / "initrd"
    k.write_text("k")
    i.write_text("i")
    return lambda: (k, i)


class Host:
    def __init__(self, home: Path, driver: FakeDriver | None = None) -> None:
        self.layout = Layout(home / "agent")
        self.layout.ensure()
        self.driver = driver or FakeDriver()
        self.net = FakeNetwork()
        self.m = Manager(self.layout, self.driver, self.net, kit=_kit(home))
        self.svc = HostService(self.m, host_name="fake1")

    def inst(self, name: str) -> FakeInstance:
        inst = self.m.table.find(name).inst
        assert isinstance(inst, FakeInstance)
        return inst


def spec(text: str = "", name: str = "web1") -> DomainSpec:
    return parse_config(f"name='{name}'\nmemory=128\n{text}").spec


def run(tmp_path: Path, scenario: Callable[[Host], Awaitable[None]]) -> None:
    async def main() -> None:
        host = Host(tmp_path)
        await host.m.start()
        await scenario(host)
        await asyncio.sleep(0)
    asyncio.run(main())


async def settle() -> None:
    """Let the tasks an event started (a destroy, a restart) run."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_create_pause_unpause_destroy(tmp_path: Path) -> None:
    async def go(h: Host) -> None:
        info = await h.svc.create(spec("vif=['bridge=xenbr0']"))
        assert info["state"] == "running" and info["vifs"][0]["tap"] == "vif1.0"
        assert h.net.taps == {"vif1.0"}
        assert (await h.svc.pause("web1"))["state"] == "paused"
        assert (await h.svc.unpause("1"))["state"] in ("running", "blocked")
        gone = await h.svc.destroy("web1")
        assert gone["state"] == "gone" and h.net.taps == set()
        assert list(h.layout.domains.iterdir()) == []
    run(tmp_path, go)


def test_the_guest_powers_off_and_the_config_decides(tmp_path: Path) -> None:
    async def go(h: Host) -> None:
        await h.svc.create(spec("on_poweroff='preserve'"))
        await h.svc.create(spec("", name="web2"))
        await h.inst("web1").guest("poweroff")
        await h.inst("web2").guest("poweroff")
        await settle()
        assert h.m.table.find("web1").state is State.SHUTDOWN
        with pytest.raises(SanvisorError, match="does not exist"):
            h.m.table.find("web2")  # on_poweroff=destroy
    run(tmp_path, go)


def test_a_shut_down_domain_admits_only_destroy(tmp_path: Path) -> None:
    """Issue 13 (11): save of a preserved shut-down guest exited 0 and lost it."""
    async def go(h: Host) -> None:
        await h.svc.create(spec("on_poweroff='preserve'"))
        await h.inst("web1").guest("poweroff")
        await settle()
        save = tmp_path / "web1.save"
        refusals: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("save", lambda: h.svc.save("web1", str(save))),
            ("pause", lambda: h.svc.pause("web1")),
            ("unpause", lambda: h.svc.unpause("web1")),
            ("reboot", lambda: h.svc.reboot("web1")),
            ("mem-set", lambda: h.svc.mem_set("web1", 96)),
            ("vcpu-set", lambda: h.svc.vcpu_set("web1", 1)),
            ("block-attach", lambda: h.svc.block_attach("web1", f"file:{save},sdb,w")),
        ]
        for verb, call in refusals:
            with pytest.raises(ConflictError) as err:
                await call()
            assert str(err.value).startswith(f"web1 is shut down (s): {verb} needs")
        assert not save.exists() and not Path(f"{save}.part").exists()
        assert h.m.table.find("web1").state is State.SHUTDOWN
        await h.svc.destroy("web1")
    run(tmp_path, go)


def test_a_crashed_guest_is_kept_or_restarted(tmp_path: Path) -> None:
    async def go(h: Host) -> None:
        await h.svc.create(spec("on_crash='preserve'"))
        await h.svc.create(spec("on_crash='restart'", name="web2"))
        await h.inst("web1").guest("panic")
        await h.inst("web2").guest("panic")
        await settle()
        assert h.m.table.find("web1").state is State.CRASHED
        with pytest.raises(ConflictError, match="crashed"):
            await h.svc.save("web1", str(tmp_path / "x.save"))
        assert h.m.table.find("web2").state is State.RUNNING
        assert h.inst("web2").st["boots"] == 2
    run(tmp_path, go)


def test_reboot_powers_the_guest_on_again(tmp_path: Path) -> None:
    async def go(h: Host) -> None:
        await h.svc.create(spec())
        await h.svc.reboot("web1")
        await settle()
        dom = h.m.table.find("web1")
        assert dom.state is State.RUNNING and not dom.reboot_pending
        assert h.inst("web1").st["boots"] == 2
        assert dom.record.reason == "rebooted on request, restarted"
    run(tmp_path, go)


def test_a_failed_launch_leaves_nothing(tmp_path: Path) -> None:
    async def go(h: Host) -> None:
        h.driver.fail_next["launch"] = HypervisorError("QEMU could not start web1: boom")
        with pytest.raises(HypervisorError, match="boom"):
            await h.svc.create(spec("vif=['bridge=xenbr0, mac=00:16:3e:00:00:07']"))
        assert len(h.m.table) == 0 and h.net.taps == set()
        assert list(h.layout.domains.iterdir()) == []
        assert h.m.table.live_macs() == {}
        await h.svc.create(spec("vif=['mac=00:16:3e:00:00:07']"))  # the name is free
    run(tmp_path, go)


def test_two_concurrent_creates_of_one_name_start_one(tmp_path: Path) -> None:
    """Issue 13 (4): the name was checked before the launch was awaited."""
    async def go(h: Host) -> None:
        results = await asyncio.gather(h.svc.create(spec()), h.svc.create(spec()),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1 and isinstance(errors[0], ConflictError)
        assert len(h.m.table) == 1 and len(h.driver.live) == 1
    run(tmp_path, go)


def test_a_failed_nic_attach_is_undone(tmp_path: Path) -> None:
    async def go(h: Host) -> None:
        await h.svc.create(spec())
        h.driver.fail_next["attach-nic"] = HypervisorError("QEMU refused device_add")
        with pytest.raises(HypervisorError):
            await h.svc.network_attach("web1", "bridge=xenbr0")
        assert h.net.taps == set() and h.m.table.find("web1").record.nics == []
    run(tmp_path, go)


def test_a_failed_save_gives_the_domain_back(tmp_path: Path) -> None:
    async def go(h: Host) -> None:
        await h.svc.create(spec())
        h.driver.fail_next["save"] = HypervisorError("save failed: disk full")
        target = tmp_path / "web1.save"
        with pytest.raises(HypervisorError):
            await h.svc.save("web1", str(target))
        assert not target.exists() and not Path(f"{target}.part").exists()
        assert h.m.table.find("web1").state is State.RUNNING
        assert h.inst("web1").st["status"] == "running"
    run(tmp_path, go)


def test_save_and_restore(tmp_path: Path) -> None:
    async def go(h: Host) -> None:
        await h.svc.create(spec("vif=['mac=00:16:3e:00:00:09']"))
        await h.svc.mem_set("web1", 96)
        target = tmp_path / "web1.save"
        assert (await h.svc.save("web1", str(target)))["state"] == "gone"
        back = await h.svc.restore(str(target))
        assert back["name"] == "web1" and back["vifs"][0]["mac"] == "00:16:3e:00:00:09"
        assert h.inst("web1").st["balloon"] == 96
        with pytest.raises(ConflictError, match="already exists"):
            await h.svc.restore(str(target))  # a second copy of a running domain
    run(tmp_path, go)


def test_a_crafted_save_file_changes_nothing(tmp_path: Path) -> None:
    """Issue 13 (6): a header's uuid '../../x' made restore delete a directory."""
    async def go(h: Host) -> None:
        await h.svc.create(spec())
        target = tmp_path / "web1.save"
        await h.svc.save("web1", str(target))
        victim = h.layout.home.parent / "x"
        victim.mkdir()
        (victim / "keep").write_text("precious")
        from sanvisor.agent import savefile

        fd, hdr = savefile.read_header(target)
        os.close(fd)
        for field, bad in (("uuid", "../../x"), ("domid", "1; rm -rf /"),
                           ("kernel", "relative/vmlinux"), ("nics", [{"index": 0}])):
            rec = dict(hdr["record"], **{field: bad})
            data = bytearray(target.read_bytes())
            head = savefile.MAGIC + json.dumps({**hdr, "record": rec}).encode() + b"\n"
            data[:savefile.HEADER_SIZE] = head.ljust(savefile.HEADER_SIZE, b" ")
            crafted = tmp_path / f"crafted-{field}.save"
            crafted.write_bytes(bytes(data))
            with pytest.raises(RecordError):
                await h.svc.restore(str(crafted))
        assert (victim / "keep").read_text() == "precious"
        assert len(h.m.table) == 0
    run(tmp_path, go)


def test_the_agent_finds_its_domains_again(tmp_path: Path) -> None:
    async def first(h: Host) -> None:
        for n in ("a", "b", "c"):
            await h.svc.create(spec(name=n))
        await h.svc.pause("b")
        await h.inst("c").vanish()  # its process dies while the agent is away
        h.m.table.find("c").record.state = State.RUNNING  # as if nobody saw it
        h.m.table.save(h.m.table.find("c"))
        await h.m.stop()

    run(tmp_path, first)

    async def second() -> None:
        h = Host(tmp_path)
        await h.m.start()
        states = {d.name: d.state for d in h.m.table}
        assert states == {"a": State.RUNNING, "b": State.PAUSED, "c": State.LOST}
        assert "exited while the agent was away" in h.m.table.find("c").record.reason
        with pytest.raises(ConflictError, match="lost"):
            await h.svc.pause("c")
        await h.svc.destroy("c")
    asyncio.run(second())


def test_a_simulated_pool_of_many_domains(tmp_path: Path) -> None:
    async def go(h: Host) -> None:
        for i in range(300):
            await h.svc.create(spec(name=f"d{i}"))
        rows = await h.svc.domains()
        assert len(rows) == 301 and rows[0]["name"] == "Domain-0"
        assert len({r["domid"] for r in rows}) == 301
    run(tmp_path, go)
