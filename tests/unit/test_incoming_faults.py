"""A migration's target never leaves an untracked copy (issue 13, item 9), on the fake
driver: an incoming migration neither finished nor aborted expires after the agent's
SANVISOR_MIGRATE_EXPIRY; an abort that cannot destroy the incoming copy keeps it in
the table, dying, and retries it; `destroy` of a dying copy (the target's or a
source's stale one) tries again at once and says what came of it, every other verb is
refused naming the state. The migration settings are checked at the agent's start."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import sanvisor.agent.life as life
from sanvisor.agent.incoming import MigrationSettings
from sanvisor.agent.manager import Manager
from sanvisor.agent.migration import Migrations
from sanvisor.agent.service import HostService
from sanvisor.drivers.fake import FakeDriver, FakeInstance
from sanvisor.errors import ConfigError, ConflictError, HypervisorError
from sanvisor.model.config import parse_config
from sanvisor.model.domain import State
from sanvisor.model.migration import ConvergencePolicy
from sanvisor.paths import Layout
from sanvisor.waiting import wait_until_async

STUCK = HypervisorError("TEST: dom0 refuses the destroy")


class Target:
    def __init__(self, home: Path, expiry: float = 3600.0) -> None:
        self.layout = Layout(home)
        self.layout.ensure()
        self.driver = FakeDriver()
        kernel, initrd = home / "vmlinux", home / "initrd"
        kernel.write_text("k")
        initrd.write_text("i")
        self.svc = HostService(Manager(self.layout, self.driver,
                                       kit=lambda: (kernel, initrd)))
        self.migs = Migrations(self.svc, MigrationSettings(timeout=60.0, expiry=expiry))

    async def arrive(self, name: str = "g1") -> str:
        """An incoming migration of a new domain ``name``, prepared here; its uuid."""
        spec = parse_config(f"name='{name}'\nmemory=64\n", filename=f"{name}.cfg").spec
        source = Target(self.layout.home.parent / f"source-{name}")
        await source.svc.create(spec)
        rec = source.svc.table.find(name).record
        await source.svc.destroy(name)
        body: dict[str, Any] = {
            "record": rec.to_dict(), "disks": {}, "live": False,
            "policy": ConvergencePolicy().to_dict(), "driver": "fake",
            "accelerator": "fake", "source": "", "token": None}
        await self.migs.incoming(body)
        return rec.uuid

    def copy(self, name: str = "g1") -> FakeInstance:
        """The fake hypervisor's copy of ``name`` here (gone or not)."""
        found = [i for i in self.driver.live.values() if i.plan.spec.name == name]
        assert len(found) == 1, found
        return found[0]


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


async def _gone(t: Target, name: str = "g1") -> None:
    await wait_until_async(f"{name} gone from the target",
                           lambda: asyncio.sleep(0, name not in
                                                 {d.name for d in t.svc.table}), 10)


def test_an_incoming_migration_expires(tmp_path: Path) -> None:
    t = Target(tmp_path / "t", expiry=0.2)

    async def go() -> None:
        await t.arrive()
        copy = t.copy()
        assert t.svc.table.find("g1").state is State.PAUSED
        await _gone(t)
        assert copy.st["status"] == "gone"
        assert ("g1", "abort") in t.driver.calls and not t.migs.pending

    run(go)


def test_an_abort_that_cannot_destroy_keeps_the_copy_dying_and_retries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(life, "DROP_RETRY_S", 0.05)
    t = Target(tmp_path / "t")

    async def go() -> None:
        uuid = await t.arrive()
        t.driver.fail_next["abort"] = STUCK
        with pytest.raises(HypervisorError, match="its incoming copy on this host could "
                                                  "not be destroyed"):
            await t.migs.abort(uuid)
        dom = t.svc.table.find("g1")  # tracked, never an untracked paused copy
        assert dom.state is State.DYING and t.copy().st["status"] == "paused"
        with pytest.raises(ConflictError, match=r"g1 is dying \(d\): unpause needs"):
            await t.svc.unpause("g1")
        await _gone(t)  # the retry destroyed it
        assert t.copy().st["status"] == "gone"
        assert [c for c in t.driver.calls if c == ("g1", "abort")] == [("g1", "abort")] * 2

    run(go)


def test_destroy_of_a_dying_incoming_copy_tries_again_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(life, "DROP_RETRY_S", 3600.0)  # only `destroy` retries here
    t = Target(tmp_path / "t", expiry=0.1)

    async def go() -> None:
        t.driver.fail_next["abort"] = STUCK
        await t.arrive()
        await wait_until_async("expired, kept dying", lambda: asyncio.sleep(
            0, t.svc.table.find("g1").state is State.DYING), 10)
        t.driver.fail_next["abort"] = STUCK  # still stuck: said, and kept
        with pytest.raises(HypervisorError, match=r"g1 is dying \(d\): its copy on this "
                                                  r"host still cannot be destroyed \(TEST"):
            await t.svc.destroy("g1")
        assert t.svc.table.find("g1").state is State.DYING
        await t.svc.destroy("g1")  # dom0 lets it now: gone at once
        assert "g1" not in {d.name for d in t.svc.table}
        assert t.copy().st["status"] == "gone" and not t.svc.life.dying

    run(go)


def test_destroy_of_a_dying_stale_source_copy(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The source's side (Lifecycle.drop_copy after a migration): the same."""
    monkeypatch.setattr(life, "DROP_RETRY_S", 3600.0)
    t = Target(tmp_path / "s")

    async def go() -> None:
        await t.svc.create(parse_config("name='g2'\nmemory=64\n", filename="g2.cfg").spec)
        dom = t.svc.table.find("g2")
        copy = t.copy("g2")
        t.driver.fail_next["destroy"] = STUCK
        with pytest.raises(HypervisorError, match="its stopped copy on this host could"):
            await t.svc.life.drop_copy(dom, "it migrated to host2")
        assert dom.state is State.DYING
        t.driver.fail_next["destroy"] = STUCK
        with pytest.raises(HypervisorError, match="still cannot be destroyed"):
            await t.svc.destroy("g2")
        assert dom in t.svc.table and copy.st["status"] == "running"
        await t.svc.destroy("g2")
        assert dom not in t.svc.table and copy.st["status"] == "gone"

    run(go)


def test_migration_settings_from_the_environment() -> None:
    assert MigrationSettings.from_env({}) == MigrationSettings(600.0, 660.0)
    assert MigrationSettings.from_env({"SANVISOR_MIGRATE_TIMEOUT": "30"}).expiry == 90.0
    got = MigrationSettings.from_env({"SANVISOR_MIGRATE_TIMEOUT": "30",
                                      "SANVISOR_MIGRATE_EXPIRY": "5.5"})
    assert (got.timeout, got.expiry) == (30.0, 5.5)
    for bad in ("0", "-1", "nan", "inf", "ten", "1e9"):
        with pytest.raises(ConfigError, match=f"SANVISOR_MIGRATE_EXPIRY='{bad}': not a "
                                              "number of seconds") as err:
            MigrationSettings.from_env({"SANVISOR_MIGRATE_EXPIRY": bad})
        assert "\n" not in str(err.value)


def test_a_dying_copy_found_after_a_restart_is_destroyed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(life, "DROP_RETRY_S", 3600.0)
    t = Target(tmp_path / "s")

    async def go() -> None:
        await t.svc.create(parse_config("name='g3'\nmemory=64\n", filename="g3.cfg").spec)
        t.driver.fail_next["destroy"] = STUCK
        with pytest.raises(HypervisorError, match="could not be destroyed"):
            await t.svc.life.drop_copy(t.svc.table.find("g3"), "it migrated to host2")
        again = HostService(Manager(t.layout, t.driver))  # the agent restarted
        await again.m.start()
        assert "g3" not in {d.name for d in again.table}
        # destroyed again at the restart (the first failed), and it succeeded
        assert t.driver.calls.count(("g3", "destroy")) >= 2
        assert not any(i.plan.spec.name == "g3" for i in t.driver.live.values())

    run(go)
