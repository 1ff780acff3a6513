"""lvm2 as the oracle of the volume format, and loop devices for it to read.

lvm2 is confined to the test's own devices: its configuration lives in a directory
of the test (LVM_SYSTEM_DIR), whose filter accepts exactly those loop devices; no
devices file, no locking outside it, no backups, no udev, no device-mapper
(``--driverloaded n``). The machine's /etc/lvm and other block devices are never
looked at.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sanvisor.storage.lvm.blockdev import FileDevice
from sanvisor.storage.lvm.lease import LeaseKeeper, Timing
from sanvisor.storage.lvm.manager import DeviceRef, VolumeManager

needs_lvm2 = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root"),
    pytest.mark.skipif(shutil.which("lvm") is None, reason="needs lvm2 (scripts/setup.sh)"),
    pytest.mark.skipif(shutil.which("losetup") is None, reason="needs losetup"),
]
MIB = 1 << 20


@contextlib.contextmanager
def loop_devices(sizes: list[int], *, files: list[Path] | None = None,
                 readonly: bool = False) -> Iterator[list[str]]:
    """Loop devices over sparse files (or over ``files``, read-only if asked); detached,
    our files removed, whatever happens."""
    tmp = Path(tempfile.mkdtemp(prefix="svlvm"))
    loops: list[str] = []
    try:
        backing = files or []
        if not backing:
            for i, size in enumerate(sizes):
                f = tmp / f"pv{i}.img"
                with open(f, "wb") as fh:
                    fh.truncate(size)
                backing.append(f)
        for f in backing:
            out = subprocess.run(["losetup", *(["-r"] if readonly else []), "-f", "--show",
                                  str(f)], capture_output=True, text=True, check=True,
                                 timeout=30)
            loops.append(out.stdout.strip())
        yield loops
    finally:
        for dev in loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


class Lvm2:
    """The real lvm2, seeing only ``devices``."""

    def __init__(self, devices: list[str], home: Path) -> None:
        self.devices, self.home = list(devices), home
        self.sysdir = home / "lvm2"
        (self.sysdir / "lock").mkdir(parents=True, exist_ok=True)
        accept = ", ".join(f'"a|^{d}$|"' for d in self.devices)
        (self.sysdir / "lvm.conf").write_text(
            "devices {\n"
            f"  filter = [ {accept}, \"r|.*|\" ]\n"
            f"  global_filter = [ {accept}, \"r|.*|\" ]\n"
            "  use_devicesfile = 0\n  obtain_device_list_from_udev = 0\n"
            "  external_device_info_source = \"none\"\n  scan = [ \"/dev\" ]\n}\n"
            f"global {{\n  locking_dir = \"{self.sysdir / 'lock'}\"\n  use_lvmlockd = 0\n"
            "  event_activation = 0\n}\n"
            "backup {\n  backup = 0\n  archive = 0\n}\n"
            "activation {\n  udev_sync = 0\n  udev_rules = 0\n  monitoring = 0\n}\n")
        self.env = dict(os.environ, LVM_SYSTEM_DIR=str(self.sysdir),
                        LVM_SUPPRESS_FD_WARNINGS="1")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = ["lvm", args[0], "--driverloaded", "n", *args[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=120,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: rc={proc.returncode}\n{proc.stderr}"
                                 f"{proc.stdout}")
        return proc

    def report(self, kind: str, fields: str, *extra: str) -> list[dict[str, str]]:
        out = self.run(f"{kind}s", "--reportformat", "json", "--units", "b", "--nosuffix",
                       "-o", fields, *extra).stdout
        data: dict[str, Any] = json.loads(out)
        rows: list[dict[str, str]] = data["report"][0][kind]
        return rows

    def warnings(self, proc: subprocess.CompletedProcess[str]) -> list[str]:
        noise = ("Activation disabled", "NOT backed up", "not zeroed")
        return [ln.strip() for ln in proc.stderr.splitlines()
                if ln.strip() and not any(n in ln for n in noise)]


def manager(devices: list[str], host: str = "hostA", io_timeout: float = 0.05,
            leases: bool = True) -> VolumeManager:
    """sanvisor's volume manager over ``devices`` (in this process)."""
    refs = [DeviceRef(d, d, (lambda d=d: FileDevice(d))) for d in devices]
    keeper = LeaseKeeper(host, Timing(io_timeout)) if leases else None
    return VolumeManager(host, lambda: refs, keeper)


def close(mgr: VolumeManager) -> None:
    if mgr.leases is not None:
        mgr.leases.close()
    for _ref, dev in mgr.opened.values():
        dev.close()
    mgr.opened.clear()


def sv_segments(mgr: VolumeManager, vg: str) -> dict[str, list[str]]:
    """LV name -> its PE ranges, as sanvisor reports them."""
    from sanvisor.storage.lvm import rows

    out: dict[str, list[str]] = {}
    for r in rows.lv_rows(mgr.scan(), mgr.host, ["seg_pe_ranges"], show_all=True):
        if r["vg_name"] == vg:
            out.setdefault(str(r["lv_name"]).strip("[]"), []).extend(
                r["seg_pe_ranges"])  # type: ignore[arg-type]
    return out


def lvm2_segments(lvm: Lvm2, vg: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in lvm.report("lv", "lv_name,vg_name,seg_pe_ranges", "-a"):
        if r["vg_name"] == vg and r["seg_pe_ranges"]:
            out.setdefault(r["lv_name"].strip("[]"), []).extend(r["seg_pe_ranges"].split())
    return out
