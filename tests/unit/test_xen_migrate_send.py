"""The Xen sender (drivers/xen/migrate.send) tells a migration that never started (the
guest did not suspend and runs on here: the agent may try once more) from one that
failed with the guest stopped, by xl's words and by what dom0 says of the domain."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from sanvisor.drivers.xen.migrate import send
from sanvisor.errors import HypervisorError, MigrationNotStartedError

XL_ERR = (b"libxl: error: libxl_stream_write.c:350:libxl__xc_domain_save_done: "
          b"Domain 1:saving domain: domain did not respond to suspend request: "
          b"No such process\nMigration failed, resuming at sender.\n")


class Proc:
    def __init__(self, rc: int, err: bytes) -> None:
        self.rc, self.err = rc, bytearray(err)

    def wait(self, timeout: float | None = None) -> int:
        return self.rc

    def close_stdin(self) -> None: ...

    def write(self, data: bytes) -> None: ...

    def kill(self) -> None: ...


def _target(tmp: Path) -> str:
    """A peer socket that takes one connection and holds it."""
    path = str(tmp / "peer.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(1)
    threading.Thread(target=lambda: lst.accept(), daemon=True).start()
    return path


def _send(tmp: Path, state: str, err: bytes = XL_ERR) -> None:
    def run(argv: list[str], stdin: bytes | None) -> tuple[int, str, str]:
        if argv[:2] == ["xl", "list"]:
            return 0, ("Name ID Mem VCPUs State Time(s)\n"
                       f"xdemo 1 128 1 {state} 3.1\n"), ""
        return 0, "", ""

    def spawn(argv: list[str], **kw: Any) -> Proc:
        return Proc(1 if argv[0] == "xl" else 0, err if argv[0] == "xl" else b"")

    send(run, spawn, "xdemo", _target(tmp), 5, live=True)


def test_a_guest_that_never_suspended_and_runs_on_is_a_migration_not_started(
        tmp_path: Path) -> None:
    with pytest.raises(MigrationNotStartedError, match="did not respond to suspend"):
        _send(tmp_path, "-b----")


@pytest.mark.parametrize("state", ["---ss-", "--p-s-", "-----d", "----c-"])
def test_a_stopped_guest_is_a_plain_failure(tmp_path: Path, state: str) -> None:
    with pytest.raises(HypervisorError) as info:
        _send(tmp_path, state)
    assert not isinstance(info.value, MigrationNotStartedError)


def test_any_other_xl_failure_is_a_plain_failure(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError) as info:
        _send(tmp_path, "-b----", b"libxl: error: migration target: restore failed\n")
    assert not isinstance(info.value, MigrationNotStartedError)
