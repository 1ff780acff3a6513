"""A map as a kernel block device for host tools (storage/hostdev.py): QSD's FUSE
export of the engine's socket plus a loop device. mkfs.ext4 and mount work on
it, what is written through it is on the LUN (read back through the map), and
everything is gone afterwards (no loop device, no mount, no process)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sanvisor.storage.hostdev import HostDevice
from tests.storage.enginekit import engine_bench

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="loop devices and mounts"),
              pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None
                                 or shutil.which("mkfs.ext4") is None,
                                 reason="needs qemu-storage-daemon and mkfs.ext4")]


def test_a_map_as_a_block_device_takes_a_file_system(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    with engine_bench(monkeypatch, sanitized=False) as (_arr, host):
        name = host.map().name
        sock = host.home / "mapper" / f"{name}.sock"
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        with HostDevice(sock, name, tmp_path / "dev") as dev:
            assert dev.device is not None and dev.device.is_block_device()
            loop = str(dev.device)
            subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True, capture_output=True)
            subprocess.run(["mount", loop, str(mnt)], check=True, capture_output=True)
            try:
                (mnt / "hello").write_bytes(b"through FUSE and the engine\n" * 1000)
            finally:
                subprocess.run(["umount", str(mnt)], check=True, capture_output=True)
            pid = dev.pid
        assert not Path(f"/proc/{pid}").exists() or b"zombie" in Path(
            f"/proc/{pid}/status").read_bytes().lower()
        assert loop not in subprocess.run(["losetup", "-a"], capture_output=True,
                                          text=True).stdout
        g = host.guest()
        assert g.pread(2, 1024 + 56) == b"\x53\xef"  # ext4's magic, on the LUN via the map
        written = host.view()["paths"]
        assert sum(p["written_bytes"] for p in written) > 28000
