"""Which QEMU the guests get: $SANVISOR_QEMU, else build/qemu (scripts/fetch-qemu.sh),
else the system's."""

from __future__ import annotations

from pathlib import Path

import pytest

from sanvisor.drivers.qemu import binary
from sanvisor.errors import ResourceError


def _fake(path: Path, version_line: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    path.chmod(0o755)
    return path


def test_the_variable_wins_and_must_name_an_executable(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    mine = _fake(tmp_path / "q", "QEMU emulator version 9.9.1 (test)")
    monkeypatch.setattr(binary, "SOURCE_BUILD", _fake(tmp_path / "b" / "q", "x"))
    monkeypatch.setenv("SANVISOR_QEMU", str(mine))
    assert binary.qemu_binary() == str(mine)
    assert binary.qemu_version(str(mine)) == "9.9.1"
    monkeypatch.setenv("SANVISOR_QEMU", str(tmp_path / "missing"))
    with pytest.raises(ResourceError, match=r"SANVISOR_QEMU=.*missing: no such executable"):
        binary.qemu_binary()
    (tmp_path / "plain").write_text("not executable")
    monkeypatch.setenv("SANVISOR_QEMU", str(tmp_path / "plain"))
    with pytest.raises(ResourceError):
        binary.qemu_binary()


def test_the_fetched_qemu_then_the_system_one(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANVISOR_QEMU", raising=False)
    fetched = tmp_path / "build" / "qemu" / "bin" / "qemu-system-x86_64"
    monkeypatch.setattr(binary, "SOURCE_BUILD", fetched)
    system = _fake(tmp_path / "path" / "qemu-system-x86_64", "QEMU emulator version 7.2.22")
    monkeypatch.setenv("PATH", str(system.parent))
    assert binary.qemu_binary() == str(system)
    _fake(fetched, "QEMU emulator version 10.0.2 (Debian)")
    assert binary.qemu_binary() == str(fetched)
    assert binary.qemu_version(str(fetched)) == "10.0.2"
    assert binary.qemu_version(str(tmp_path / "nothing")) == ""
    assert binary.qemu_version(str(_fake(tmp_path / "odd", "something else"))) == ""
