"""A full pool: no short or failed write is acknowledged; space is reported and
thick LUNs are refused when the pool cannot back them.

The array's home is a tiny tmpfs (root) so that its sparse LUNs really run out
of space while being written: every write that got success must read back,
every other one must have got an NBD error (ENOSPC) at the client.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanvisor.storage import nbdproto as P
from sanvisor.storage.arraypool import LOW_SPACE_BYTES, PoolSpace
from tests.storage.harness import ArrayProc, hba_address, make_array, sv

POOL = 8 << 20  # the tmpfs
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (root)")


@pytest.fixture
def tiny_pool() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="svpool", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={POOL}", "svpool", str(d)],
                   check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def full_array(tiny_pool: Path) -> Iterator[ArrayProc]:
    arr = make_array(tiny_pool / "array", luns=(("sys", "64M"),))
    try:
        yield arr
    finally:
        arr.stop()


@root_only
def test_writes_past_a_full_pool_fail_at_the_client(full_array: ArrayProc) -> None:
    arr = full_array
    c = arr.client(hba_address(1, 0))
    acked: dict[int, bytes] = {}
    errors: list[int] = []
    mib = 1 << 20
    for i in range(16):  # 16 MiB into an 8 MiB pool: the tail cannot fit
        block = os.urandom(mib - 512) + i.to_bytes(512, "big")
        err, _ = c.request(P.CMD_WRITE, i * mib, mib, block)
        if err:
            errors.append(err)
        else:
            acked[i] = block
    assert errors and set(errors) == {P.ENOSPC}, errors
    assert 0 < len(acked) < 16
    for i, block in acked.items():  # nothing reported as success is missing
        assert c.pread(mib, i * mib) == block, f"acknowledged block {i} is not there"
    # the same for the other ways to allocate: FUA writes, zeroes that must be written
    assert c.request(P.CMD_WRITE, 40 * mib, 4096, b"x" * 4096, P.CMD_FLAG_FUA)[0] == \
        P.ENOSPC
    assert c.request(P.CMD_WRITE_ZEROES, 48 * mib, mib, flags=P.CMD_FLAG_NO_HOLE)[0] == \
        P.ENOSPC
    assert c.request(P.CMD_TRIM, 0, mib)[0] == 0  # freeing space still works
    c.close()
    # and through a real client: qemu-io reports the error
    if shutil.which("qemu-io"):  # from 127.0.0.1: an initiator of its own
        arr.cli("initiator", "add", "10:00:00:00:c9:00:00:00", "--address", "127.0.0.1")
        arr.cli("zone", "add", "sys", "10:00:00:00:c9:00:00:00")
        fill = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 20M 8M",
                               f"nbd://127.0.0.1:{arr.port}/{arr.lun('sys').wwid}"],
                              capture_output=True, text=True)
        assert "No space left on device" in fill.stdout + fill.stderr, fill
    # the pool is reported, and low
    rows = arr.js("lun", "list")
    assert rows[0]["allocated"] <= POOL and rows[0]["pool"]["low"] is True
    assert rows[0]["pool"]["free"] < 1 << 20
    table = arr.cli("lun", "list").stdout
    assert "WARNING: the array's pool" in table and "Allocated" in table
    assert "ENOSPC" in arr.log.read_text()


@root_only
def test_thick_luns_need_the_space_now(tiny_pool: Path) -> None:
    home = tiny_pool / "arr"
    big = sv(home, "array", "--array-home", str(home), "lun", "create", "big", "--size",
             "16M", "--thick", check=False)
    assert big.returncode != 0
    assert big.stderr.count("\n") <= 1 and "not enough space" in big.stderr, big.stderr
    assert not list((home / "luns").iterdir())  # nothing left behind
    sv(home, "array", "--array-home", str(home), "lun", "create", "small", "--size", "4M",
       "--thick")
    rows = json.loads(sv(home, "--json", "array", "--array-home", str(home), "lun",
                         "list").stdout)
    assert [r["name"] for r in rows] == ["small"]
    assert rows[0]["thick"] is True and rows[0]["allocated"] == 4 << 20
    grow = sv(home, "array", "--array-home", str(home), "lun", "resize", "small", "--size",
              "64M", check=False)
    assert grow.returncode != 0 and "not enough space" in grow.stderr
    assert json.loads(sv(home, "--json", "array", "--array-home", str(home), "lun",
                         "list").stdout)[0]["size"] == 4 << 20


def test_thick_refused_without_root(tmp_path: Path) -> None:
    """The same refusal on any file system: more than it has free."""
    home = tmp_path / "arr"
    free = shutil.disk_usage(tmp_path).free
    size = f"{(free >> 30) + 64}G"
    out = sv(home, "array", "--array-home", str(home), "lun", "create", "huge", "--size",
             size, "--thick", check=False)
    assert out.returncode != 0 and "not enough space" in out.stderr
    sv(home, "array", "--array-home", str(home), "lun", "create", "sparse", "--size", size)
    rows = json.loads(sv(home, "--json", "array", "--array-home", str(home), "lun",
                         "list").stdout)
    assert rows[0]["allocated"] == 0 and rows[0]["pool"]["free"] > 0


def test_low_space_rule() -> None:
    assert PoolSpace("/p", 100 << 30, 9 << 30).low  # under 10 %
    assert not PoolSpace("/p", 100 << 30, 11 << 30).low
    assert PoolSpace("/p", 4 << 30, LOW_SPACE_BYTES - 1).low  # under 1 GiB
