"""A QEMU domain's CPU weight and cap (sched-credit) through Linux's CPU controller.

Each domain with a weight or a cap set gets a group of its own,
``sanvisor/<uuid>``, in the first CPU controller this agent may use:

- cgroup v2 with the ``cpu`` controller (``cpu.weight``, ``cpu.max``): at
  ``/sys/fs/cgroup`` or a hybrid host's ``/sys/fs/cgroup/unified``;
- else cgroup v1's ``cpu`` hierarchy (``cpu.shares``, ``cpu.cfs_quota_us``).

An agent whose /sys lacks them (`ip netns exec` gives it a sysfs of its own) mounts
the hierarchy again under /run/sanvisor. Neither (no controller, or not root):
sched-credit is refused in one line naming what is missing. The group is made when
a weight or cap is first set (or at the start of a domain that has one) and removed
when the domain's QEMU is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from sanvisor.errors import HypervisorError, SanvisorError
from sanvisor.model.sched import PERIOD_US, Credit

SYSFS = Path("/sys/fs/cgroup")
MOUNT_DIR = Path("/run/sanvisor/cgroup-cpu")  # where a hidden hierarchy is mounted again
GROUP = "sanvisor"


@dataclass(frozen=True)
class Controller:
    root: Path  # the hierarchy's mount point
    version: int  # 2 or 1

    def group(self, uuid: str) -> Path:
        return self.root / GROUP / uuid


def _v2_has_cpu(root: Path) -> bool:
    try:
        return "cpu" in (root / "cgroup.controllers").read_text().split()
    except OSError:
        return False


def find(sysfs: Path = SYSFS, *, mount: bool = True) -> Controller | None:
    """The CPU controller this host offers (v2 first), or None. ``mount``: mount a
    hidden hierarchy again if need be (see _mounted)."""
    for root in (sysfs, sysfs / "unified"):
        if _v2_has_cpu(root):
            return Controller(root, 2)
    v1 = sysfs / "cpu"
    if (v1 / "cpu.shares").exists():
        return Controller(v1, 1)
    if sysfs == SYSFS:
        return _mounted(MOUNT_DIR, mount)
    return None


def _mounted(target: Path, mount: bool) -> Controller | None:
    """An agent run by `ip netns exec` (the lab's hosts) has a /sys of its own without
    the cgroup mounts: mount the CPU hierarchy again at ``target`` (root only; in such
    a private mount namespace the mount goes away with it). The same hierarchy: groups
    made here are the host's."""
    if _v2_has_cpu(target):
        return Controller(target, 2)
    if (target / "cpu.shares").exists():
        return Controller(target, 1)
    if not mount or os.geteuid() != 0:
        return None
    from sanvisor.command import run

    with contextlib.suppress(OSError):
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
    for argv in (["mount", "-t", "cgroup2", "none", str(target)],
                 ["mount", "-t", "cgroup", "-o", "cpu", "cgroup", str(target)]):
        try:
            if run(argv, check=False).rc != 0:
                continue
        except SanvisorError:  # no mount program
            return None
        if _v2_has_cpu(target):
            return Controller(target, 2)
        if (target / "cpu.shares").exists():
            return Controller(target, 1)
        run(["umount", str(target)], check=False)  # cgroup v2 without cpu: try v1
    return None


def require(sysfs: Path = SYSFS) -> Controller:
    ctl = find(sysfs)
    if ctl is None:
        raise HypervisorError(
            "sched-credit: this host has no CPU controller the agent can use (cgroup v2 "
            f"without the 'cpu' controller at {sysfs}, and no cgroup v1 'cpu' hierarchy)")
    return ctl


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        why = ("not allowed (the agent is not root, or the controller is not "
               "delegated to it)" if exc.errno in (errno.EACCES, errno.EPERM)
               else exc.strerror)
        raise HypervisorError(f"sched-credit: cannot write {value.strip()!r} to {path}: "
                              f"{why}", path=str(path)) from exc


def _words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []


def _enable_cpu(parent: Path) -> None:
    """cgroup v2: let ``parent``'s children use the cpu controller."""
    ctl = parent / "cgroup.subtree_control"
    if "cpu" not in _words(ctl):
        _write(ctl, "+cpu")


def _make_group(ctl: Controller, uuid: str) -> Path:
    top = ctl.root / GROUP
    if ctl.version == 2:
        _enable_cpu(ctl.root)
    try:
        top.mkdir(exist_ok=True)
        if ctl.version == 2:
            _enable_cpu(top)
        path = ctl.group(uuid)
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise HypervisorError(f"sched-credit: cannot make the group {top}/{uuid}: "
                              f"{exc.strerror}") from exc
    return path


def apply(pid: int, uuid: str, credit: Credit, sysfs: Path = SYSFS) -> Path:
    """Put process ``pid`` (every thread) in the domain's group with ``credit``."""
    ctl = require(sysfs)
    path = _make_group(ctl, uuid)
    if ctl.version == 2:
        _write(path / "cpu.weight", f"{credit.v2_weight()}\n")
        _write(path / "cpu.max", f"{credit.v2_max()}\n")
    else:
        _write(path / "cpu.shares", f"{credit.v1_shares()}\n")
        _write(path / "cpu.cfs_period_us", f"{PERIOD_US}\n")
        _write(path / "cpu.cfs_quota_us", f"{credit.quota_us()}\n")
    if str(pid) not in _words(path / "cgroup.procs"):
        _write(path / "cgroup.procs", f"{pid}\n")
    return path


def read(uuid: str, sysfs: Path = SYSFS) -> dict[str, str] | None:
    """What the controller holds for the domain (for checks and tests); None: no group."""
    ctl = find(sysfs, mount=False)
    if ctl is None or not ctl.group(uuid).is_dir():
        return None
    names = (("cpu.weight", "cpu.max") if ctl.version == 2
             else ("cpu.shares", "cpu.cfs_quota_us"))
    out = {"version": str(ctl.version), "path": str(ctl.group(uuid))}
    for name in (*names, "cgroup.procs"):
        with contextlib.suppress(OSError):
            out[name] = (ctl.group(uuid) / name).read_text().strip()
    return out


def remove(uuid: str, sysfs: Path = SYSFS) -> None:
    """Remove the domain's group once its process is gone (nothing if it has none)."""
    ctl = find(sysfs, mount=False)
    if ctl is not None:
        with contextlib.suppress(OSError):
            os.rmdir(ctl.group(uuid))
