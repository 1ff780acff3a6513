"""The migration preflight's disk identity (drivers/xen/diskid.py), with the dom0
script run here for real (the same sh, readlink, stat and sha256sum as busybox)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sanvisor.drivers.xen.diskid import check_movable, check_same, identities
from sanvisor.errors import ConfigError, ConflictError


def _run(argv: list[str], stdin: bytes | None) -> tuple[int, str, str]:
    p = subprocess.run(argv, input=stdin, capture_output=True, check=False)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def test_read_only_files_are_known_by_all_their_bytes(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c d"
    a.write_bytes(b"\0" * (1 << 20))
    b.write_bytes(b"\0" * (1 << 20))
    c.write_bytes(b"\0" * (1 << 20 - 1) + b"x")  # same size, differs after 64 KiB
    ids = identities(_run, {str(a): "r", str(b): "r", str(c): "r",
                            str(tmp_path / "gone"): "r"})
    assert ids[str(a)] == ids[str(b)]
    assert ids[str(a)] != ids[str(c)]  # the old size+64 KiB check said "same disk"
    assert str(ids[str(a)]).startswith(f"content:{1 << 20}:")
    assert ids[str(tmp_path / "gone")] is None


def test_a_writable_file_cannot_move(tmp_path: Path) -> None:
    f = tmp_path / "disk.img"
    f.write_bytes(b"x")
    ids = identities(_run, {str(f): "w"})
    assert ids == {str(f): "file"}
    with pytest.raises(ConflictError, match="writable file in dom0, not shared storage"):
        check_movable(ids)


@pytest.mark.skipif(os.geteuid() != 0, reason="a loop device needs root")
def test_a_device_without_a_wwid_has_no_identity(tmp_path: Path) -> None:
    img = tmp_path / "loop.img"
    img.write_bytes(b"\0" * (1 << 20))
    dev = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True,
                         text=True, check=True).stdout.strip()
    try:
        ids = identities(_run, {dev: "w"})
        assert ids == {dev: "none"}
        with pytest.raises(ConflictError, match="no WWID"):
            check_movable(ids)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_identities_are_compared_by_what_names_the_device() -> None:
    lun = "wwid:naa.60060e80d6009592000000000000000a"
    check_same({"/dev/sde": lun}, {"/dev/sde": lun})
    with pytest.raises(ConfigError, match="does not exist on the target"):
        check_same({"/dev/sde": lun}, {"/dev/sde": None})
    other = "wwid:naa.60060e80d6009592000000000000000b"
    with pytest.raises(ConflictError) as err:  # the seed's trap: sde is another LUN there
        check_same({"/dev/sde": lun}, {"/dev/sde": other})
    assert "WWID naa.60060e80d6009592000000000000000a on the source" in str(err.value)
    assert "WWID naa.60060e80d6009592000000000000000b on the target" in str(err.value)
    check_movable({"/dev/mapper/sys": "dm:mpath-360060e80d6009592000000000000000a"})
    with pytest.raises(ConfigError, match="missing on this host"):
        check_movable({"/dev/x": None})
