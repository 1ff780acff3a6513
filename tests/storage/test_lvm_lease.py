"""The lease on the shared storage (sanlock's delta lease): one holder at a time; a
holder that stops renewing loses it after a bounded time, and one that cannot renew
stops writing before anyone else may take it."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator

import pytest

from sanvisor.errors import LeaseError, VolumeIOError
from sanvisor.storage.lvm.blockdev import FileDevice
from sanvisor.storage.lvm.lease import LEASE_OFFSET, LeaseKeeper, Record, Timing
from tests.storage.lvm2 import MIB, loop_devices, needs_lvm2

pytestmark = needs_lvm2
T = 0.05


@pytest.fixture
def disk() -> Iterator[str]:
    with loop_devices([8 * MIB]) as devs:
        yield devs[0]


def test_one_holder_at_a_time_and_no_lost_update(disk: str) -> None:
    """Two hosts each add 1 to a counter on the disk 12 times, read-modify-write, under
    the lease: never both inside, no update lost."""
    inside, overlaps, errors = [0], [0], []
    counter_at = 64 * 512

    def host(name: str) -> None:
        keeper = LeaseKeeper(name, Timing(T))
        dev = FileDevice(disk)
        try:
            for _ in range(12):
                with keeper.hold({"pv": dev}) as guard:
                    inside[0] += 1
                    overlaps[0] += inside[0] > 1
                    (n,) = struct.unpack("<Q", dev.read(counter_at, 8))
                    guard()
                    dev.write(counter_at, struct.pack("<Q", n + 1).ljust(512, b"\0"))
                    inside[0] -= 1
        except Exception as exc:
            errors.append(exc)
        finally:
            keeper.close()
            dev.close()

    threads = [threading.Thread(target=host, args=(n,)) for n in ("hostA", "hostB")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and overlaps == [0]
    assert struct.unpack("<Q", FileDevice(disk).read(counter_at, 8))[0] == 24


def test_a_host_that_stops_renewing_loses_the_lease_in_bounded_time(disk: str) -> None:
    a, b = LeaseKeeper("hostA", Timing(T)), LeaseKeeper("hostB", Timing(T))
    da, db = FileDevice(disk), FileDevice(disk)
    try:
        with a.hold({"pv": da}) as guard_a:
            guard_a()
            a.renew_one = lambda key, h: None  # type: ignore[method-assign]  # frozen
            frozen = time.monotonic()
            with b.hold({"pv": db}, wait=30) as guard_b:
                took = time.monotonic() - frozen
                with pytest.raises(LeaseError, match="lost the lease"):
                    guard_a()  # A stopped writing before B could take it
                guard_b()
            # B waited for the record to stay unchanged 8T, then 2T for its own
            assert 8 * T <= took <= 8 * T + Timing(T).delay + 2.0, took
    finally:
        a.close()
        b.close()


class FailingLeaseWrites:
    """A device whose writes to the lease sector fail (its paths are gone)."""

    def __init__(self, dev: FileDevice) -> None:
        self.dev, self.name, self.broken = dev, dev.name, False

    @property
    def size(self) -> int:
        return self.dev.size

    def read(self, offset: int, length: int) -> bytes:
        return self.dev.read(offset, length)

    def write(self, offset: int, data: bytes) -> None:
        if self.broken and offset == LEASE_OFFSET:
            raise VolumeIOError(f"{self.name}: write at {offset}: Input/output error")
        self.dev.write(offset, data)

    def flush(self) -> None:
        self.dev.flush()

    def close(self) -> None:
        self.dev.close()


def test_a_host_that_cannot_renew_stops_writing(disk: str) -> None:
    a, b = LeaseKeeper("hostA", Timing(T)), LeaseKeeper("hostB", Timing(T))
    da, db = FailingLeaseWrites(FileDevice(disk)), FileDevice(disk)
    try:
        with a.hold({"pv": da}) as guard_a:  # type: ignore[dict-item]
            da.broken = True
            start = time.monotonic()
            with pytest.raises(LeaseError, match="lost the lease"):
                while True:  # what a command does before each write
                    guard_a()
                    assert time.monotonic() - start < 6 * T + 2.0, "A kept writing"
            with b.hold({"pv": db}, wait=30):
                rec = Record.unpack(db.read(LEASE_OFFSET, 512))
                assert rec is not None and rec.host == "hostB"
    finally:
        a.close()
        b.close()


def test_a_lease_held_by_a_live_host_is_not_taken(disk: str) -> None:
    a, b = LeaseKeeper("hostA", Timing(T)), LeaseKeeper("hostB", Timing(T))
    da, db = FileDevice(disk), FileDevice(disk)
    try:
        with (a.hold({"pv": da}), pytest.raises(LeaseError, match=r"held by hostA"),
              b.hold({"pv": db}, wait=20 * T)):
            pass
    finally:
        a.close()
        b.close()
