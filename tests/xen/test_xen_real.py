"""The Xen driver on a real Xen 4.17, nested under QEMU (TCG): one host for the module.

The driver reaches dom0's xl through the nested host's command channel (its second
serial port on a unix socket), exactly as a runner on a real dom0 would run xl.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sanvisor.drivers.base import LaunchPlan
from sanvisor.drivers.xen.driver import XenDriver
from sanvisor.errors import HypervisorError
from sanvisor.model.config import parse_config

pytestmark = [pytest.mark.xen,
              pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                 reason="qemu-system-x86_64 is not installed")]
KERNEL, INITRD = "/srv/domu/vmlinux", "/srv/domu/initrd.cpio"


@pytest.fixture(scope="module")
def xen() -> Iterator[Any]:
    from sanvisor.xenhost import XenHost, build_xen_kit

    work = Path(tempfile.mkdtemp(prefix="svx", dir="/tmp"))
    host = XenHost(build_xen_kit(), work, name="xen1")
    try:
        host.start(timeout=240, attempts=4)
        yield host
    finally:
        host.stop()
        shutil.rmtree(work, ignore_errors=True)


def _driver(xen: Any) -> XenDriver:
    return XenDriver(lambda argv, stdin: xen.run(argv, stdin=stdin), xen.put_file,
                     spawn=xen.spawn, poll=0.3)


def _plan(text: str, tmp: Path) -> LaunchPlan:
    spec = parse_config(text, filename="x.cfg").spec
    return LaunchPlan(spec=spec, rundir=tmp, kernel=Path(KERNEL), initrd=Path(INITRD),
                      cmdline=f"console=hvc0 sv.hostname={spec.name}")


def _marker(xen: Any, name: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    log = f"/var/log/xen/console/guest-{name}.log"
    while time.monotonic() < deadline:
        if f"SANVISOR-READY {name}" in xen.run(["cat", log])[1]:
            return
        time.sleep(0.5)
    raise AssertionError(f"no marker from {name}")


async def _events(name: str, data: dict[str, Any]) -> None:
    return None


def test_xl_answers_from_dom0(xen: Any) -> None:
    rc, out, _ = xen.run(["xl", "info"])
    assert rc == 0 and "xen_version            : 4.17" in out


def test_driver_lifecycle_on_real_xen(xen: Any, tmp_path: Path) -> None:
    drv = _driver(xen)

    async def go() -> None:
        inst = await drv.launch(_plan("name='x1'\nmemory=128\nmaxmem=256\n", tmp_path),
                                _events)
        try:
            assert (await inst.status()).status == "running"
            await asyncio.to_thread(_marker, xen, "x1")
            await inst.pause()
            assert (await inst.status()).status == "paused"
            await inst.unpause()
            assert (await inst.status()).status == "running"
            await inst.set_balloon(112)
            assert await inst.balloon_mib() == 112
        finally:
            await inst.destroy()
            await inst.close()
        assert drv.xl.info("x1") is None

    asyncio.run(go())


def test_xl_failures_keep_xls_reason(xen: Any, tmp_path: Path) -> None:
    drv = _driver(xen)
    with pytest.raises(HypervisorError) as exc:
        asyncio.run(drv.launch(_plan("name='huge'\nmemory=65536\n", tmp_path), _events))
    assert str(exc.value).startswith("xl create failed: ")
    assert drv.xl.info("huge") is None
    missing = _plan("name='nokernel'\n", tmp_path)
    missing.kernel = Path("/srv/missing-kernel")
    with pytest.raises(HypervisorError, match=r"^xl create failed: "):
        asyncio.run(drv.launch(missing, _events))


def test_a_domain_made_outside_sanvisor_is_shown_not_touched(xen: Any) -> None:
    from sanvisor.xenhost import pv_config

    xen.put_file("/etc/xen/byhand.cfg", pv_config("byhand").encode())
    rc, _, err = xen.run(["xl", "create", "/etc/xen/byhand.cfg"])
    assert rc == 0, err
    try:
        drv = _driver(xen)
        assert [d["name"] for d in drv.hypervisor_domains() if d["domid"]] == ["byhand"]
        assert drv.xl.info("byhand") is not None  # still running: never clobbered
    finally:
        xen.run(["xl", "destroy", "byhand"])
