"""Fixtures shared by every test package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

#: The tiers, each selectable by marker: unit (seconds, nothing booted), guest (real
#: QEMU guests), lab (the SAN lab: array, namespaces, fabrics), xen (nested Xen hosts),
#: store (the pool's state store on SQLite and on a real etcd server).
TIERS = ("unit", "guest", "lab", "xen", "store")
_DIR_TIER = {"unit": "unit", "guest": "guest", "storage": "lab", "xen": "xen",
             "store": "store"}


def pytest_configure(config: pytest.Config) -> None:
    """The data-path engine is the only data path (agents do not start without it):
    a checkout that has not run scripts/setup.sh (a copy of the index, say) gets it
    built here, as setup.sh does, unless SANVISOR_ENGINE names one."""
    root = Path(__file__).resolve().parents[1]
    out = root / "build" / "engine"
    if os.environ.get("SANVISOR_ENGINE") or (out / "sanvisor-engine").exists():
        return
    proc = subprocess.run(["make", "-s", "-C", str(root / "engine"), f"OUT={out}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise pytest.UsageError(f"cannot build the data-path engine (make -C engine): "
                                f"{proc.stderr.strip()[-300:]}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test without a tier marker gets its directory's tier."""
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            tier = _DIR_TIER.get(Path(str(item.fspath)).parent.name)
            if tier is not None:
                item.add_marker(getattr(pytest.mark, tier))


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which accelerator this run's guests use, and why (CI prints it)."""
    try:
        from sanvisor.drivers.qemu.binary import qemu_binary, qemu_version
        from sanvisor.drivers.qemu.probe import AccelProbe
        from sanvisor.guestkit import build_kit, default_cache_dir

        kit = build_kit()
        qemu = qemu_binary()
        choice = AccelProbe(lambda: (kit.kernel, kit.initrd), qemu=qemu,
                            cache_dir=default_cache_dir().parent).decide()
    except Exception as exc:  # a header must not stop the run
        return [f"accelerator: unknown ({type(exc).__name__}: {exc})"]
    extra = f"; warning: {choice.warning}" if choice.warning else ""
    return [f"accelerator: {choice.accel} ({choice.reason}){extra}",
            f"guests' QEMU: {qemu} ({qemu_version(qemu) or 'version unknown'})"]


@pytest.fixture(scope="session")
def kit() -> object:
    """The guest kit (built once, cached across runs)."""
    from sanvisor.guestkit import build_kit

    return build_kit()


@pytest.fixture(scope="session")
def xen_lab() -> Iterator[Path]:
    """Two nested Xen lab hosts, ``xen1`` and ``xen2`` (``lab up --xen-hosts 2``), for
    the whole session; their agents' homes are ``<lab>/xen1`` and ``<lab>/xen2``.
    Skipped with the reason when this machine cannot boot them (not root, no QEMU)."""
    if os.geteuid() != 0:
        pytest.skip("the Xen lab needs root")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (run .ci/run or scripts/setup.sh)")
    root = Path(tempfile.mkdtemp(prefix="svxl", dir="/tmp"))
    shutil.rmtree(root)
    env = dict(os.environ, SANVISOR_LAB_HOME=str(root))
    cmd = [sys.executable, "-m", "sanvisor"]
    try:
        up = subprocess.run([*cmd, "lab", "up", "--hosts", "0", "--xen-hosts", "2",
                             "--loopback"], env=env, capture_output=True, text=True,
                            timeout=600)
        if up.returncode != 0:
            raise AssertionError(f"lab up --xen-hosts 2 failed: {up.stderr}{up.stdout}")
        yield root
    finally:
        subprocess.run([*cmd, "lab", "down"], env=env, capture_output=True, timeout=300)
        shutil.rmtree(root, ignore_errors=True)
