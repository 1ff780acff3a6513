"""A map as a kernel block device on the host, for host tools (mkfs, mount, lvm2).

There is no nbd kernel module, no ublk and no device-mapper on these machines,
but FUSE and loop devices work: qemu-storage-daemon opens the map's NBD socket
(the engine's, or any NBD unix socket; it reconnects if the engine restarts) and
exports it as a regular file through FUSE; ``losetup`` makes that file a block
device (/dev/loopN). Its cost is measured by bench/storage.py (docs/dataplane.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

from sanvisor.command import run
from sanvisor.errors import ResourceError

START_TIMEOUT = 10.0


def _mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == target for line in fh)


class HostDevice:
    """/dev/loopN over FUSE over NBD: ``with HostDevice(sock, name, workdir) as dev``."""

    def __init__(self, sock: Path, export: str, workdir: Path) -> None:
        self.sock, self.export, self.workdir = sock, export, workdir
        self.file = workdir / f"{export}.img"
        self.proc: subprocess.Popen[bytes] | None = None
        self.device: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def __enter__(self) -> HostDevice:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.file.touch(mode=0o600)
        blockdev = {"driver": "nbd", "node-name": "n", "export": self.export,
                    "server": {"type": "unix", "path": str(self.sock)},
                    "reconnect-delay": 30}
        log = open(self.workdir / f"{self.export}.log", "ab")  # noqa: SIM115 - the child's
        try:
            self.proc = subprocess.Popen(
                ["qemu-storage-daemon", "--blockdev", json.dumps(blockdev), "--export",
                 f"type=fuse,id=e,node-name=n,mountpoint={self.file},writable=on"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        except FileNotFoundError:
            raise ResourceError("qemu-storage-daemon is not installed") from None
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not _mounted(self.file):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.workdir / f"{self.export}.log").read_text(errors="replace")
                raise ResourceError(f"the FUSE export of {self.export} did not start: "
                                    f"{tail.strip()[-300:]}")
            time.sleep(0.01)
        out = run(["losetup", "--find", "--show", str(self.file)], what="losetup").out
        self.device = Path(out.strip())

    def close(self) -> None:
        if self.device is not None:
            run(["losetup", "--detach", str(self.device)], check=False)
            self.device = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.file.exists() and _mounted(self.file):
            run(["umount", "-l", str(self.file)], check=False)
        with contextlib.suppress(OSError):
            os.unlink(self.file)
