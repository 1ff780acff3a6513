"""`migrate` between the lab's two nested Xen hosts: refusals (a name that runs on the
other host, live migration of a PV guest without log-dirty), then the guest moved with
its memory (a tmpfs mark survives), its MAC and its disk; and a PVH guest moved live
(the nested hosts have HAP: log-dirty works for it). Both streams go dom0 to dom0 over
the lab's LAN (drivers/xen/migrate.py), as the source agent's log says."""

from __future__ import annotations

from pathlib import Path

import pytest

from sanvisor.lab.guestshell import GuestShell
from tests.guest.conftest import write_config
from tests.guest.helpers import Sanvisor

pytestmark = pytest.mark.xen
NAME = "mg1"
PVH = "mp1"


def _lan_moves(home: Path, name: str) -> int:
    """How many of ``name``'s moves from this host sent xl's stream over the LAN."""
    text = (home / "agent.log").read_text()
    return text.count(f"{name}: xl's stream goes to 10.213.100.")


def test_migrate_moves_a_running_guest(xen_lab: Path, tmp_path: Path) -> None:
    a, b = Sanvisor(xen_lab / "xen1", None), Sanvisor(xen_lab / "xen2", None)
    # a dom0 file present, identical, on both hosts stands in for the shared LUN
    cfg = write_config(tmp_path / "mg1.cfg", name=NAME, memory=128,
                       disk=["phy:/srv/domu/initrd.cpio,xvda,r"],
                       vif=["bridge=xenbr0, ip=10.213.77.2/24"])
    a.run("create", str(cfg))
    try:
        a.wait_marker(NAME)
        before = a.domain(NAME)
        guest = GuestShell(before["console_socket"])
        guest.run("echo moved-not-rebooted > /run/mark")
        c1 = guest.counter()

        # the pool: a domain of that name cannot start on the other host (the clash
        # a migration's preflight would meet cannot even be made)
        clash = write_config(tmp_path / "clash.cfg", name=NAME, memory=96)
        line = b.fail("create", str(clash))
        assert "domain mg1 runs on xen1" in line, line
        assert NAME not in b.names()
        assert a.domain(NAME)["state"] in ("running", "blocked")

        # live: xl migrate needs log-dirty, which Debian's Xen 4.17 (no shadow paging)
        # refuses for PV guests: a one-line refusal, the guest untouched where it was
        line = a.fail("migrate", "-l", NAME, str(xen_lab / "xen2"))
        assert "log-dirty" in line and "EOPNOTSUPP" in line, line
        assert NAME not in b.names()
        assert guest.run("cat /run/mark") == "moved-not-rebooted"  # still here, alive
        a.run("migrate", NAME, str(xen_lab / "xen2"))  # xm's default: stop, copy, restart

        assert NAME not in a.names()
        after = b.domain(NAME)
        assert after["state"] in ("running", "blocked")
        assert after["vifs"][0]["mac"] == before["vifs"][0]["mac"]
        moved = GuestShell(after["console_socket"])
        assert moved.run("cat /run/mark") == "moved-not-rebooted"  # its memory came along
        assert moved.counter() >= c1
        assert moved.run("dd if=/dev/xvda bs=6 count=1 2>/dev/null") == "070701"
        # xl's stream went dom0 to dom0 over the lab's LAN, not through the agents (the
        # refused -l above had set up its stream too)
        assert _lan_moves(xen_lab / "xen1", NAME) == 2

        # PVH on HAP: xl migrate live, the guest running all along
        pcfg = write_config(tmp_path / "mp1.cfg", name=PVH, type="pvh", memory=128,
                            disk=["phy:/srv/domu/initrd.cpio,xvda,r"],
                            vif=["bridge=xenbr0, ip=10.213.77.3/24"])
        a.run("create", str(pcfg))
        a.wait_marker(PVH)
        pv = GuestShell(a.domain(PVH)["console_socket"])
        assert pv.run("cat /sys/hypervisor/guest_type") == "PVH"
        pv.run("echo live > /run/mark")
        c2 = pv.counter()
        mac = a.domain(PVH)["vifs"][0]["mac"]
        a.run("migrate", "-l", PVH, str(xen_lab / "xen2"))
        assert PVH not in a.names()
        there = b.domain(PVH)
        assert there["state"] in ("running", "blocked") and there["vifs"][0]["mac"] == mac
        pv = GuestShell(there["console_socket"])
        assert pv.run("cat /run/mark") == "live"
        assert pv.counter() >= c2
        assert _lan_moves(xen_lab / "xen1", PVH) == 1
    finally:
        for name in (NAME, PVH):
            a.run("destroy", name, check=False)
            b.run("destroy", name, check=False)
