"""A Xen migration (stop-and-copy: `migrate` without -l) that fails after the target
restored the domain ends with exactly one copy in the pool, running, its memory intact
(a /run/mark written before): (a) the target's finish fails, (b) the source's destroy
of its stopped copy fails, (c) the source's agent dies after the stream ended and never
calls back, (d) the same, its agent kept away until the target's incoming copy
expired (whose `xl destroy` fails at first: kept dying). The dom0 faults are real
(xenhost/faults.py: the agents of this module run with the test-only
SANVISOR_TEST_DOM0_FAULTS), the agent is SIGKILLed for real. Every
test counts the domain's copies in both dom0s (`list` shows xl's whole `xl list`,
domains the agent does not track included, as "foreign") and reads the mark. One
guest for the module, moved by the tests in turn: xen1 -> (a) xen1 -> (b) xen2 -> (c)
xen2 -> (d) xen2."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanvisor.lab.guestshell import GuestShell
from tests.guest.conftest import write_config
from tests.guest.helpers import Sanvisor, wait_until

pytestmark = pytest.mark.xen
NAME = "mgf"
MARK = "written-before-the-move"
RESTORED = "the incoming stream ended: xl restore exited with status 0"
#: s: (d)'s target expires an incoming migration this long after preparing it; it
#: must cover the stop-and-copy (~15-25 s here) with room to spare
EXPIRY = 45


class Host(Sanvisor):
    """A lab Xen host whose agent runs with a fault file (empty: no faults)."""

    def __init__(self, home: Path, faults: Path) -> None:
        super().__init__(home, None)
        self.faults = faults
        self.held = faults.with_name(faults.name + ".held")

    def restart_agent(self, *, faults: bool, **extra: str) -> None:
        self.run("agent", "stop", check=False)
        env = dict(os.environ, **extra)
        if faults:
            env.update(SANVISOR_TEST_DOM0_FAULTS=str(self.faults),
                       SANVISOR_MIGRATE_WATCH_S="0.5")
        else:
            env.pop("SANVISOR_TEST_DOM0_FAULTS", None)
        subprocess.run(self.argv("agent", "start"), env=env, check=True,
                       capture_output=True, timeout=120)

    def copies(self) -> list[str]:
        """The states of NAME's copies in this dom0 (xl list, tracked or not)."""
        return [str(r["state"]) for r in self.json("list") if r["name"] == NAME]

    def restored(self) -> int:
        """How many incoming streams this host's agent restored so far."""
        return (self.home / "agent.log").read_text().count(RESTORED)

    def shell(self) -> GuestShell:
        return GuestShell(self.domain(NAME)["console_socket"])


def _running(states: list[str]) -> bool:
    return len(states) == 1 and states[0] in ("running", "blocked")


@pytest.fixture(scope="module")
def hosts(xen_lab: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[Host, Host]]:
    d = tmp_path_factory.mktemp("faults")
    a, b = Host(xen_lab / "xen1", d / "xen1"), Host(xen_lab / "xen2", d / "xen2")
    try:
        for h in (a, b):
            h.faults.write_text("")
            h.restart_agent(faults=True)
        cfg = write_config(d / "mgf.cfg", name=NAME, memory=96,
                           disk=["phy:/srv/domu/initrd.cpio,xvda,r"],
                           vif=["bridge=xenbr0, ip=10.213.77.4/24"])
        a.run("create", str(cfg))
        a.wait_marker(NAME)
        a.shell().run(f"echo {MARK} > /run/mark")
        yield a, b
    finally:
        for h in (a, b):
            h.faults.write_text("")
            h.run("destroy", NAME, check=False)
            if h.agent_pid() is None:
                h.start_agent()
        for h in (a, b):
            wait_until(f"no {NAME} on {h.home.name}", lambda h=h: not h.copies(), 60)
            h.restart_agent(faults=False)  # the next module's agents have no faults


def test_finish_failing_on_the_target_keeps_the_source_copy(hosts: tuple[Host, Host],
                                                             tmp_path: Path) -> None:
    """The target restored the domain, then cannot run it (its `xl unpause` fails): the
    target destroys its copy and gives the domain back; the source's runs on."""
    a, b = hosts
    b.faults.write_text(f"fail xl unpause {NAME}\n")
    line = a.fail("migrate", NAME, str(b.home))
    b.faults.write_text("")
    assert "xl unpause failed" in line and "TEST FAULT" in line, line
    wait_until("one copy, running on xen1", lambda: _running(a.copies()) and not b.copies(),
               60)
    assert a.shell().run("cat /run/mark") == MARK
    # and the pool knows it runs on xen1 again (the target gave it back; the source
    # took it again): the name cannot start on xen2
    clash = write_config(tmp_path / "clash.cfg", name=NAME, memory=64)
    assert "runs on xen1" in b.fail("create", str(clash))
    assert not b.copies()


def test_source_destroy_failing_is_reported_and_retried(hosts: tuple[Host, Host]) -> None:
    """The domain runs on the target; the source's `xl destroy` of its stopped copy
    fails: `migrate` says so (non-zero), the copy stays tracked on the source, dying (no
    verb admitted: it can never run again), and the agent destroys it once dom0 lets
    it."""
    a, b = hosts
    a.faults.write_text(f"fail xl destroy {NAME}\n")
    try:
        line = a.fail("migrate", NAME, str(b.home))
        assert "could not be destroyed" in line and "TEST FAULT" in line, line
        assert _running(b.copies())
        assert a.copies() == ["dying"]  # tracked, never an untracked paused copy
        assert "dying" in a.fail("unpause", NAME)
        assert b.shell().run("cat /run/mark") == MARK
    finally:
        a.faults.write_text("")
    wait_until("the stale copy destroyed", lambda: not a.copies(), 60)
    assert _running(b.copies())


def test_source_agent_killed_after_the_stream_keeps_one_copy(hosts: tuple[Host, Host]
                                                            ) -> None:
    """The source's agent dies after the whole image left (the target restored it,
    paused) and before it called the target back. Back, it takes the domain again (a new
    fencing token) and resumes its paused copy; the target, seeing the source's hold
    change, destroys the copy it restored."""
    a, b = hosts  # the guest is on b (xen2) now: b is the source
    b.faults.write_text(f"hold rm -rf /run/sv-migrate/{NAME}\n")
    seen = a.restored()
    mig = subprocess.Popen(b.argv("migrate", NAME, str(a.home)), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_until("the source's stream ended (held)", b.held.exists, 180)
        wait_until("the target restored it", lambda: a.restored() > seen, 120)
        assert a.copies() == ["paused"] and len(b.copies()) == 1, (a.copies(), b.copies())
        b.kill_agent()
        _, err = mig.communicate(timeout=60)
        assert mig.returncode != 0, err
    finally:
        if mig.poll() is None:
            mig.kill()
            mig.wait()
        b.faults.write_text("")
    b.restart_agent(faults=True)
    wait_until("one copy, running on xen2", lambda: _running(b.copies()) and not a.copies(),
               60)
    assert b.shell().run("cat /run/mark") == MARK


def test_source_agent_kept_away_the_target_copy_expires(hosts: tuple[Host, Host]) -> None:
    """As (c), but the source's agent stays away: the target's incoming copy expires
    (SANVISOR_MIGRATE_EXPIRY) and is destroyed; its `xl destroy` failing at first, the
    copy is kept dying (never untracked), `destroy` says dom0's refusal, and the copy
    goes once dom0 lets it. The source's copy, left paused, is the only one: its agent,
    back, runs it on."""
    a, b = hosts  # the guest is on b (xen2): b is the source, a (xen1) the target
    a.restart_agent(faults=True, SANVISOR_MIGRATE_EXPIRY=str(EXPIRY))
    a.faults.write_text(f"fail xl destroy {NAME}\n")
    b.faults.write_text(f"hold rm -rf /run/sv-migrate/{NAME}\n")
    seen = a.restored()
    began = time.monotonic()
    mig = subprocess.Popen(b.argv("migrate", NAME, str(a.home)), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_until("the source's stream ended (held)", b.held.exists, EXPIRY)
        wait_until("the target restored it", lambda: a.restored() > seen, 60)
        took = time.monotonic() - began
        assert took < EXPIRY - 5, f"the move took {took:.0f}s: EXPIRY is too short"
        assert a.copies() == ["paused"], a.copies()
        b.kill_agent()  # and not started again until the target expired its copy
        _, err = mig.communicate(timeout=60)
        assert mig.returncode != 0, err
    finally:
        if mig.poll() is None:
            mig.kill()
            mig.wait()
        b.faults.write_text("")
    try:
        wait_until("the incoming copy expired, kept dying", lambda: a.copies() == ["dying"],
                   EXPIRY + 30)
        line = a.fail("destroy", NAME)  # tried again at once: dom0 still refuses
        assert "still cannot be destroyed" in line and "TEST FAULT" in line, line
        assert "is dying (d)" in a.fail("unpause", NAME)
        assert a.copies() == ["dying"]
    finally:
        a.faults.write_text("")
    wait_until("the dying copy destroyed", lambda: not a.copies(), 30)
    b.restart_agent(faults=True)
    wait_until("one copy, running on xen2", lambda: _running(b.copies()) and not a.copies(),
               60)
    assert b.shell().run("cat /run/mark") == MARK
