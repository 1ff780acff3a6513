"""The migration preflight's disk check and dom0's identity script (run here for real:
the same busybox-compatible sh, stat, head and sha256sum)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sanvisor.agent.migration import check_same_disks
from sanvisor.drivers.xen.migrate import disk_identities
from sanvisor.errors import ConfigError, ConflictError


def _run(argv: list[str], stdin: bytes | None) -> tuple[int, str, str]:
    p = subprocess.run(argv, input=stdin, capture_output=True, check=False)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def test_identities_tell_files_apart(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    a.write_bytes(b"LUN-1" * 1000)
    b.write_bytes(b"LUN-1" * 1000)
    c.write_bytes(b"LUN-2" * 1000)
    ids = disk_identities(_run, [str(a), str(b), str(c), str(tmp_path / "gone")])
    assert ids[str(a)] == ids[str(b)] and ids[str(a)] != ids[str(c)]
    assert ids[str(a)].startswith("5000:")  # type: ignore[union-attr]
    assert ids[str(tmp_path / "gone")] is None


def test_preflight_refuses_a_missing_or_different_disk() -> None:
    check_same_disks({"/dev/x": "1:aa"}, {"/dev/x": "1:aa"})
    with pytest.raises(ConfigError, match="does not exist on the target"):
        check_same_disks({"/dev/x": "1:aa"}, {"/dev/x": None})
    with pytest.raises(ConflictError, match="not the same disk"):
        check_same_disks({"/dev/x": "1:aa"}, {"/dev/x": "1:bb"})
