"""A QEMU that outlives SIGKILL (a process stuck in the kernel) is said by `destroy`,
not passed over, so that the agent keeps the copy, dying, and retries it (an
incoming migration's abort, a stale copy: agent/life.py's drop_copy). The process is
real (its exit seen through its pidfd, as for a QEMU); only SIGKILL's delivery is
held back while the test says it is stuck."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

import sanvisor.drivers.qemu.instance as instance
from sanvisor.drivers.qemu.instance import QemuInstance
from sanvisor.errors import HypervisorError
from sanvisor.model.lifecycle import DomainEvent
from tests.unit.test_xen_driver import _plan


def test_a_qemu_that_outlives_sigkill_is_said(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instance, "KILL_WAIT_S", 0.2)
    real_kill = os.kill
    stuck = True
    sent: list[int] = []

    def kill(pid: int, sig: int) -> None:
        sent.append(sig)
        if not stuck:
            real_kill(pid, sig)

    proc = subprocess.Popen(["sleep", "120"])
    events: list[DomainEvent] = []

    async def sink(event: DomainEvent) -> None:
        events.append(event)

    async def go() -> None:
        nonlocal stuck
        inst = QemuInstance(_plan(tmp_path, "name='q1'\nmemory=64\n"), proc.pid,
                            QMPClient("q1"), sink)  # its monitor never answers
        inst._start_watch()
        monkeypatch.setattr(instance.os, "kill", kill)
        with pytest.raises(HypervisorError, match=r"q1: its QEMU \(pid \d+\) is still "
                                                  r"there 0s after SIGKILL"):
            await inst.destroy()
        assert sent == [signal.SIGKILL] and proc.poll() is None and not inst.exited
        stuck = False
        await inst.destroy()  # tried again: gone
        assert inst.exited and sent == [signal.SIGKILL] * 2
        await inst.close()

    try:
        asyncio.run(go())
    finally:
        monkeypatch.undo()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
