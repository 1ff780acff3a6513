"""xm's other verbs through the agent, on the fake driver: managed domains and
autostart, vCPU pins and credit kept across save/restore, reboot under a new id,
every domain at once, dump-core, sysrq, trigger, rename, dmesg, xm's device rows.
Real guests prove the rest (tests/guest/test_xm_verbs.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sanvisor.agent.service import HostService
from sanvisor.errors import (
    ConflictError,
    HypervisorError,
    NotFoundError,
    SanvisorError,
    UsageError,
)
from sanvisor.model.domain import State
from tests.unit.test_agent_fake import Host, run, settle, spec


def test_managed_domains_new_start_delete(tmp_path: Path) -> None:
    async def go(h: Host) -> None:
        row = await h.svc.register(spec("vcpus=2\nmaxvcpus=2"))
        assert (row["letters"], row["domid"], row["vcpus"]) == ("------", None, 2)
        rows = await h.svc.domains()
        assert [(r["name"], r["letters"]) for r in rows] == [("Domain-0", "r-----"),
                                                             ("web1", "------")]
        assert (await h.svc.lookup("web1"))["state"] == "stopped"
        assert (await h.svc.lookup(row["uuid"]))["name"] == "web1"
        with pytest.raises(ConflictError, match=r"registered \(managed\): start it with"):
            await h.svc.create(spec())  # create is the unmanaged path
        with pytest.raises(ConflictError, match="registered"):
            await h.svc.preview(spec())
        info = await h.svc.start_managed("web1")
        assert info["uuid"] == row["uuid"] and info["managed"] and info["vcpus"] == 2
        assert [r["name"] for r in await h.svc.domains()].count("web1") == 1
        with pytest.raises(ConflictError, match="already running"):
            await h.svc.start_managed("web1")
        with pytest.raises(ConflictError, match="delete needs a domain that does not run"):
            await h.svc.delete("web1")
        with pytest.raises(ConflictError, match="new registers a domain that does not run"):
            await h.svc.register(spec())
        await h.svc.destroy("web1")
        assert (await h.svc.lookup("web1"))["letters"] == "------"  # registered still
        again = await h.svc.start_managed("web1")
        assert again["uuid"] == row["uuid"] and again["vifs"] == info["vifs"]
        await h.svc.destroy("web1")
        assert (await h.svc.delete("web1"))["state"] == "deleted"
        with pytest.raises(NotFoundError, match="not registered"):
            await h.svc.start_managed("web1")
        assert [r["name"] for r in await h.svc.domains()] == ["Domain-0"]
    run(tmp_path, go)


def test_registrations_outlive_the_agent_and_autostart(tmp_path: Path) -> None:
    async def first(h: Host) -> None:
        await h.svc.register(spec("on_xend_start = 'start'", name="auto1"))
        await h.svc.register(spec("", name="manual1"), autostart=False)
        await h.svc.register(spec("", name="auto2"), autostart=True)
        await h.svc.start_managed("auto2")
        await h.inst("auto2").vanish()  # its process dies with the host
        await settle()
        assert h.m.table.find("auto2").state is State.LOST
        assert not h.svc.configs.get("auto1").spec["unknown"]  # read, not kept
    run(tmp_path, first)

    async def second(h: Host) -> None:
        started = await h.svc.autostart()
        assert sorted(started) == ["auto1", "auto2"]
        rows = {r["name"]: r for r in await h.svc.domains()}
        assert rows["auto1"]["state"] == "running" and rows["auto2"]["state"] == "running"
        assert rows["manual1"]["letters"] == "------" and not rows["manual1"]["autostart"]
        assert await h.svc.autostart() == []  # running already: left alone
    run(tmp_path, second)


def test_vcpu_pins_and_credit_are_kept_across_save_and_restore(tmp_path: Path) -> None:
    async def go(h: Host) -> None:
        await h.svc.create(spec("vcpus=2\nmaxvcpus=3"))
        rows = await h.svc.vcpu_pin("web1", "1", "0-3,^2")
        assert [(r["vcpu"], r["affinity_text"], r["state"]) for r in rows] == [
            (0, "any cpu", "r--"), (1, "0-1,3", "r--"), (2, "any cpu", "--p")]
        await h.svc.vcpu_pin("web1", "2", "3")  # not online yet: kept for when it is
        await h.svc.vcpu_pin("web1", "0", "all")  # every CPU: no pin
        assert h.m.table.find("web1").record.vcpu_pins == {"1": [0, 1, 3], "2": [3]}
        for vcpu, cpus, why in (("3", "0", "not one of web1's"), ("x", "0", "not one of"),
                                ("0", "4", r"CPU 4 does not exist on this host \(it has 4"),
                                ("0", "^1", "leaves no CPU")):
            with pytest.raises(ConflictError, match=why):
                await h.svc.vcpu_pin("web1", vcpu, cpus)
        assert (await h.svc.sched_credit("web1", 512, 50))[0] == {
            "name": "web1", "domid": 1, "weight": 512, "cap": 50}
        with pytest.raises(ConflictError, match=r"cap: 301 is outside 0..300"):
            await h.svc.sched_credit("web1", None, 301)
        with pytest.raises(UsageError, match="need -d DOM"):
            await h.svc.sched_credit(None, 100)
        save = tmp_path / "web1.save"
        await h.svc.save("web1", str(save))
        back = await h.svc.restore(str(save))
        assert back["vcpu_pins"] == {"1": [0, 1, 3], "2": [3]}
        assert back["credit"] == {"weight": 512, "cap": 50}
        inst = h.inst("web1")
        assert inst.plan.vcpu_pins == {1: [0, 1, 3], 2: [3]}  # what the driver applies
        assert inst.st["credit"] == {"weight": 512, "cap": 50}
        assert (await h.svc.sched_credit(None))[0]["weight"] == 512
        await h.svc.sched_credit("web1", 256, 0)
        assert h.m.table.find("web1").record.credit == {}  # the default: nothing kept
    run(tmp_path, go)


def test_a_reboot_gives_a_new_id_and_wait_sees_it_back(tmp_path: Path) -> None:
    async def go(h: Host) -> None:
        first = await h.svc.create(spec())
        after = await h.svc.reboot("web1", wait=True, timeout=5)
        assert after["domid"] > first["domid"] and after["state"] == "running"
        assert after["uuid"] == first["uuid"] and h.inst("web1").st["boots"] == 2
        h.driver.obey_power_button = False
        with pytest.raises(SanvisorError, match="did not reboot"):
            await h.svc.reboot("web1", wait=True, timeout=0.2)
    run(tmp_path, go)


def test_shutdown_and_reboot_of_every_domain(tmp_path: Path) -> None:
    async def go(h: Host) -> None:
        for name in ("a1", "a2", "a3"):
            await h.svc.create(spec("", name=name))
        await h.svc.pause("a3")  # a paused guest cannot see the button: it fails alone
        rows = await h.svc.all_domains("shutdown", wait=True, timeout=0.5)
        assert [(r["name"], r["state"], bool(r.get("error"))) for r in rows] == [
            ("a1", "gone", False), ("a2", "gone", False), ("a3", "paused", True)]
        assert "did not shut down" in rows[2]["error"]
        await h.svc.unpause("a3")
        await h.svc.create(spec("", name="a4"))
        ids = {d.name: d.record.domid for d in h.m.table}
        rows = await h.svc.all_domains("reboot", wait=True, timeout=5)
        assert all(r["domid"] != ids[r["name"]] for r in rows) and len(rows) == 2
    run(tmp_path, go)


def test_dump_core_writes_a_whole_file_or_nothing(tmp_path: Path) -> None:
    async def go(h: Host) -> None:
        await h.svc.create(spec("on_crash='preserve'"))
        core = tmp_path / "web1.core"
        got = await h.svc.dump_core("web1", str(core))
        assert core.read_bytes().startswith(b"\x7fELF") and got["bytes"] == core.stat().st_size
        assert got["state"] in ("running", "blocked")
        h.driver.fail_next["dump-core"] = HypervisorError("QEMU refused dump-guest-memory")
        with pytest.raises(HypervisorError):
            await h.svc.dump_core("web1", str(tmp_path / "b.core"))
        assert not (tmp_path / "b.core.part").exists() and not (tmp_path / "b.core").exists()
        (tmp_path / "c.core.part").write_text("")
        with pytest.raises(ConflictError, match="exists"):
            await h.svc.dump_core("web1", str(tmp_path / "c.core"))
        with pytest.raises(UsageError, match="absolute"):
            await h.svc.dump_core("web1", "rel.core")
        await h.inst("web1").guest("panic")
        await settle()
        await h.svc.dump_core("web1", str(tmp_path / "crashed.core"))  # the point of it
        assert (tmp_path / "crashed.core").exists()
    run(tmp_path, go)


def test_sysrq_trigger_and_their_refusals(tmp_path: Path) -> None:
    async def go(h: Host) -> None:
        await h.svc.create(spec())
        await h.svc.sysrq("web1", "s")
        assert h.inst("web1").st["sysrq"] == ["s"]
        for bad in ("", "ss", "!", "S"):
            with pytest.raises(UsageError, match="not a SysRq key"):
                await h.svc.sysrq("web1", bad)
        with pytest.raises(UsageError, match="not one of nmi, reset, power"):
            await h.svc.trigger("web1", "init")
        await h.svc.trigger("web1", "nmi")
        await h.svc.pause("web1")
        with pytest.raises(ConflictError, match=r"web1 is paused \(p\): sysrq needs"):
            await h.svc.sysrq("web1", "s")
        await h.svc.unpause("web1")
        await h.svc.trigger("web1", "power")  # the power button: on_poweroff=destroy
        await settle()
        assert len(h.m.table) == 0
    run(tmp_path, go)


def test_rename_keeps_uuid_macs_and_registration(tmp_path: Path) -> None:
    async def go(h: Host) -> None:
        await h.svc.register(spec("vif=['type=user']"))
        before = await h.svc.start_managed("web1")
        await h.svc.create(spec("", name="other"))
        with pytest.raises(ConflictError, match="domain other already exists"):
            await h.svc.rename("web1", "other")
        for bad in ("Domain-0", "no/slash", ""):
            with pytest.raises(UsageError, match="rename: name"):
                await h.svc.rename("web1", bad)
        after = await h.svc.rename("web1", "web9")
        assert (after["uuid"], after["domid"], after["vifs"]) == (
            before["uuid"], before["domid"], before["vifs"])
        assert h.svc.configs.get("web1") is None and h.svc.configs.get("web9") is not None
        await h.svc.destroy("web9")
        again = await h.svc.start_managed("web9")  # its MAC and uuid followed the name
        assert again["vifs"][0]["mac"] == before["vifs"][0]["mac"]
        assert again["uuid"] == before["uuid"]
    run(tmp_path, go)


def test_dmesg_is_the_hypervisors_or_the_agents(tmp_path: Path) -> None:
    async def go(h: Host) -> None:
        got = await h.svc.dmesg()
        assert got["source"] == "agent"  # QEMU-like: the agent's event log stands in
        h.driver.dmesg = ["(XEN) Xen version 4.17", "(XEN) d1v0 hello"]
        assert (await h.svc.dmesg(clear=True))["text"].endswith("d1v0 hello\n")
        assert (await h.svc.dmesg())["text"] == ""  # cleared
        h.m.layout.log.write_text("".join(f"line {i}\n" for i in range(10)))
        assert (await h.svc.agent_log(2))["text"] == "line 8\nline 9\n"
    run(tmp_path, go)


def test_device_rows_in_xms_columns(tmp_path: Path) -> None:
    async def go(h: Host) -> None:
        disk = tmp_path / "d.img"
        disk.write_bytes(b"\0" * 4096)
        await h.svc.create(spec(f"disk=['file:{disk},sda,w', 'file:{disk},xvdb,r']\n"
                                "vif=['bridge=xenbr0']"))
        blocks = await h.svc.device_rows("web1", "block")
        assert [(b["vdev"], b["state"], b["target"]) for b in blocks] == [
            (2048, 4, "sda"), (51728, 4, "xvdb")]
        nets = await h.svc.device_rows("web1", "network")
        assert nets[0]["idx"] == 0 and nets[0]["bridge"] == "xenbr0"
        assert nets[0]["be_path"] == "/machine/peripheral/nic0"
    run(tmp_path, go)


def test_the_configs_seam(tmp_path: Path) -> None:
    """Any ConfigStore can stand where the host's is (the pool's state store later)."""
    from sanvisor.agent.configstore import ConfigStore, Registration

    class Memory(ConfigStore):
        def __init__(self) -> None:
            self.regs: dict[str, Registration] = {}

        def get(self, name: str) -> Registration | None:
            return self.regs.get(name)

        def all(self) -> list[Registration]:
            return list(self.regs.values())

        def put(self, reg: Registration) -> None:
            self.regs[reg.name] = reg

        def remove(self, name: str) -> bool:
            return self.regs.pop(name, None) is not None

        def rename(self, old: str, new: str) -> None:
            self.regs[new] = self.regs.pop(old)

    async def go(h: Host) -> None:
        store = Memory()
        svc = HostService(h.m, host_name="fake1", configs=store)
        await svc.register(spec())
        assert list(store.regs) == ["web1"] and not (h.layout.home / "managed").exists()
        await svc.start_managed("web1")
    run(tmp_path, go)


def test_concurrent_starts_of_one_registered_domain_start_one(tmp_path: Path) -> None:
    async def go(h: Host) -> None:
        await h.svc.register(spec())
        got = await asyncio.gather(h.svc.start_managed("web1"),
                                   h.svc.start_managed("web1"), return_exceptions=True)
        assert sum(isinstance(g, ConflictError) for g in got) == 1
        assert len(h.driver.live) == 1
    run(tmp_path, go)


def test_a_managed_domain_that_left_by_migration_is_not_started_here(tmp_path: Path
                                                                     ) -> None:
    """Its registration stays on this host (until the pool's store holds them): neither
    `start` nor autostart may run a second copy of a domain that runs elsewhere."""
    from sanvisor.model.lifecycle import Busy

    async def go(h: Host) -> None:
        await h.svc.register(spec(), autostart=True)
        await h.svc.start_managed("web1")
        dom = h.m.table.find("web1")
        dom.busy = Busy.MIGRATING  # as agent/migration.py leaves it once the target runs it
        await h.m.life.teardown(dom)
        row = await h.svc.lookup("web1")
        assert (row["state"], row["letters"]) == ("away", "------")
        with pytest.raises(ConflictError, match="left this host by migration"):
            await h.svc.start_managed("web1")
        assert await h.svc.autostart() == []
        await h.svc.register(spec())  # taken back on purpose
        assert (await h.svc.start_managed("web1"))["state"] == "running"
        await h.svc.destroy("web1")  # an ordinary end: still registered, startable
        assert (await h.svc.lookup("web1"))["state"] == "stopped"
    run(tmp_path, go)
