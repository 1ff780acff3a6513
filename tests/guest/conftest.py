"""Fixtures for tests on real QEMU guests (TCG).

One agent per test session, in a network namespace of its own when root (so
its bridges and taps never touch the host's network), with a home in /tmp.
Everything is removed at the end, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.helpers import Sanvisor, qemu_pids

ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        skip = pytest.mark.skip(reason="qemu-system-x86_64 is not installed "
                                "(run .ci/run or scripts/setup.sh)")
        for item in items:
            if "guest" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def netns() -> Iterator[str | None]:
    if not ROOT:
        yield None
        return
    name = f"svtest{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="session")
def sv(qemu_sv: Sanvisor) -> Sanvisor:
    """The CLI of the session's QEMU agent (the lifecycle suite overrides it per
    hypervisor)."""
    return qemu_sv


@pytest.fixture(scope="session")
def qemu_sv(kit: object, netns: str | None) -> Iterator[Sanvisor]:
    home = Path(tempfile.mkdtemp(prefix="svt", dir="/tmp"))
    s = Sanvisor(home, netns)
    try:
        s.start_agent()
        yield s
    finally:
        with contextlib.suppress(Exception):
            for name in s.names():
                s.run("destroy", name, check=False)
        s.run("agent", "stop", check=False)
        for pid in qemu_pids(home):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)


def write_config(path: Path, **keys: object) -> Path:
    """Write an xl config; str values are quoted, lists rendered as xl lists."""
    lines = []
    for k, v in keys.items():
        if isinstance(v, list):
            items = ", ".join(f"'{x}'" for x in v)
            lines.append(f"{k} = [ {items} ]")
        elif isinstance(v, int):
            lines.append(f"{k} = {v}")
        else:
            lines.append(f'{k} = "{v}"')
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="svw", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
