"""A Xen domain's copy that must go (it migrated away) is never passed over: its failed
`xl destroy` is raised, the copy stays tracked and dying, and is destroyed again until
it is gone; a copy a dead agent's migration left paused runs on after the restart; the
test-only dom0 fault file (xenhost/faults.py) fails and holds commands as it says."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

import sanvisor.agent.life as life
from sanvisor.agent.manager import Manager
from sanvisor.agent.service import HostService
from sanvisor.drivers.xen.driver import XenDriver
from sanvisor.errors import HypervisorError
from sanvisor.model.config import parse_config
from sanvisor.model.domain import State
from sanvisor.paths import Layout
from sanvisor.waiting import wait_until, wait_until_async
from sanvisor.xenhost.faults import Dom0Faults
from tests.unit.test_xen_driver import FakeXl, _noevents, _plan


class StuckXl(FakeXl):
    """xl whose destroy fails while ``stuck`` (dom0 refusing), the domain left there."""

    stuck = True

    def run(self, argv: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        if argv[1:2] == ["destroy"] and self.stuck and argv[-1] in self.doms:
            self.calls.append(argv)
            return 1, "", "libxl: error: libxl_domain.c:1:destroy: cannot destroy it\n"
        if argv[:1] == ["rm"]:
            self.calls.append(argv)
            return 0, "", ""
        return super().run(argv, stdin)


def test_a_failed_destroy_is_raised_and_gone_is_fine(tmp_path: Path) -> None:
    fake = StuckXl()
    drv = XenDriver(fake.run, fake.put, poll=0.01)

    async def go() -> None:
        inst = await drv.launch(_plan(tmp_path, "name='g1'\nmemory=128\n"), _noevents)
        with pytest.raises(HypervisorError, match="cannot destroy it"):
            await inst.destroy()
        assert "g1" in fake.doms
        fake.stuck = False
        await inst.destroy()
        await inst.destroy()  # already gone: fine
        await inst.close()

    asyncio.run(go())


def test_settle_outgoing_resumes_a_copy_left_paused(tmp_path: Path) -> None:
    fake = StuckXl()
    drv = XenDriver(fake.run, fake.put, poll=0.01)

    async def go() -> None:
        inst = await drv.launch(_plan(tmp_path, "name='g1'\nmemory=128\n"), _noevents)
        await inst.pause()
        await inst.settle_outgoing(resume=False)  # paused by its user: stays so
        assert (await inst.status()).status == "paused"
        await inst.settle_outgoing(resume=True)
        assert (await inst.status()).status == "running"
        assert ["rm", "-rf", "/run/sv-migrate/g1"] in fake.calls
        fake.stuck = False
        await inst.destroy()
        await inst.close()

    asyncio.run(go())


def test_drop_copy_keeps_a_stale_copy_dying_until_destroyed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(life, "DROP_RETRY_S", 0.01)
    fake = StuckXl()
    layout = Layout(tmp_path / "home")
    layout.ensure()
    svc = HostService(Manager(layout, XenDriver(fake.run, fake.put, poll=0.01)))

    async def go() -> None:
        await svc.create(parse_config("name='g1'\nmemory=128\nkernel='/boot/vmlinuz'\n",
                                        filename="g1.cfg").spec)
        dom = svc.table.find("g1")
        with pytest.raises(HypervisorError, match="could not be destroyed"):
            await svc.life.drop_copy(dom, "it migrated to xen2")
        assert dom in svc.table and dom.state is State.DYING  # tracked, never run again
        assert "g1" in fake.doms
        fake.stuck = False
        await wait_until_async("the stale copy destroyed",
                               lambda: asyncio.sleep(0, dom not in svc.table), 10)
        assert "g1" not in fake.doms

    asyncio.run(go())


def test_fault_file_fails_and_holds(tmp_path: Path) -> None:
    path = tmp_path / "faults"
    faults = Dom0Faults(path)
    assert faults.fail(["xl", "destroy", "g1"]) is None  # no file: no faults
    path.write_text("# comment\nfail xl destroy g1\nhold rm -rf /run/x\n")
    rc, _, err = faults.fail(["xl", "destroy", "g1"]) or (0, "", "")
    assert rc == 1 and "TEST FAULT: xl destroy g1 made to fail" in err
    assert faults.fail(["xl", "destroy", "g2"]) is None
    done = threading.Event()
    t = threading.Thread(target=lambda: (faults.hold(["rm", "-rf", "/run/x"]), done.set()))
    t.start()
    held = path.with_name("faults.held")
    wait_until("held", held.exists, 10)
    assert held.read_text() == "rm -rf /run/x\n" and not done.is_set()
    path.write_text("fail xl destroy g1\n")
    t.join(10)
    assert done.is_set() and not held.exists()
