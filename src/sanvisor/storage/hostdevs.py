"""Block devices for host tools: every map and every LV served here is a kernel block
device (storage/hostdev.py: qemu-storage-daemon's FUSE export of its NBD socket,
made /dev/loopN by losetup), named as on a host with device-mapper:

    DEVDIR/mapper/NAME          a map (multipath -ll's name)
    DEVDIR/mapper/VG-LV         an active LV, and DEVDIR/VG/LV

DEVDIR is HOME/dev (the lab's hosts: LAB/hostN/dev), or ``$SANVISOR_DEVDIR`` (``/dev``
on a host of its own). The names are symlinks to the loop device, as udev makes them
to dm-N. Guests do not use these (QEMU talks NBD to the engine directly).

The devices outlive the agent, as the engine and the guests do (a mounted file
system stays mounted while the agent restarts): they are kept in
HOME/hostdev/devices.json and adopted by the next agent. A device is removed when
its map or LV goes, unless something holds it (a mount, a process): then it stays,
and the holders are named (`holders`), which is also what the volume commands ask
before they deactivate or remove an LV.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

from sanvisor.command import run
from sanvisor.errors import ResourceError
from sanvisor.storage.hostdev import HostDevice

log = logging.getLogger("sanvisor.volumes")
STOP_GRACE = 5.0  # seconds a qemu-storage-daemon has to end


def enabled() -> bool:
    """SANVISOR_HOSTDEV=0|1; unset: on where it can work (root, FUSE, QSD, losetup)."""
    value = os.environ.get("SANVISOR_HOSTDEV", "").strip()
    if value in ("0", "1"):
        return value == "1"
    return (os.geteuid() == 0 and os.path.exists("/dev/fuse")
            and shutil.which("qemu-storage-daemon") is not None
            and shutil.which("losetup") is not None)


@dataclass
class Entry:
    name: str  # the engine device's name (a map's, an LV's dm name)
    sock: str
    pid: int  # the qemu-storage-daemon
    loop: str  # /dev/loopN
    file: str  # the FUSE file under it
    links: list[str]  # DEVDIR/mapper/NAME, DEVDIR/VG/LV


def _alive(e: Entry) -> bool:
    try:
        cmdline = Path(f"/proc/{e.pid}/cmdline").read_bytes()
        backing = Path(f"/sys/block/{Path(e.loop).name}/loop/backing_file").read_text()
    except OSError:
        return False
    return e.file.encode() in cmdline and backing.strip() == e.file


def dev_number(path: str) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def mounts_of(devno: str) -> list[str]:
    """Where the block device ``MAJ:MIN`` is mounted, in any mount namespace."""
    seen, out = set(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ns = os.readlink(proc / "ns" / "mnt")
            if ns in seen:
                continue
            seen.add(ns)
            lines = (proc / "mountinfo").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 4 and f[2] == devno and f[4] not in out:
                out.append(f[4])
    return out


def openers_of(path: str) -> list[str]:
    """Processes that have ``path`` open: "pid N (comm)"."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == path:
                        comm = (proc / "comm").read_text().strip()
                        out.append(f"pid {proc.name} ({comm})")
                        break
    return out


def _terminate(pid: int) -> None:
    """SIGTERM, then SIGKILL after STOP_GRACE; waits for the end through a pidfd."""
    fd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGTERM)
        if not select.select([fd], [], [], STOP_GRACE)[0]:
            os.kill(pid, signal.SIGKILL)
            select.select([fd], [], [], STOP_GRACE)
    finally:
        os.close(fd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # our child (this agent started it): reaped


class HostDevices:
    def __init__(self, home: Path, devdir: Path | None = None) -> None:
        env = os.environ.get("SANVISOR_DEVDIR", "").strip()
        self.root = devdir or (Path(env) if env else home / "dev")
        self.work = home / "hostdev"
        self.state = self.work / "devices.json"
        self.entries: dict[str, Entry] = {}
        self._load()

    # ---- state ---------------------------------------------------------------------------
    def _load(self) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError, TypeError, KeyError):
            for raw in json.loads(self.state.read_text()):
                e = Entry(**raw)
                if _alive(e):
                    self.entries[e.name] = e
                    log.info("block device %s (%s) adopted", e.loop, e.name)
                else:
                    self._stop(e)  # what a crash left: cleaned, never somebody else's

    def _save(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(e) for e in self.entries.values()]))
        tmp.replace(self.state)

    # ---- what exists -----------------------------------------------------------------------
    def follow(self, wanted: dict[str, tuple[Path, list[str]]]) -> list[str]:
        """Make the devices ``wanted`` (name -> its socket, its link paths relative to
        DEVDIR) exist, and the others go unless held; the warnings."""
        warnings: list[str] = []
        for name in [n for n in self.entries if n not in wanted]:
            held = self.holders(name)
            if held:
                warnings.append(f"{name} is gone but its block device {self.entries[name].loop}"
                                f" is in use by {', '.join(held)}: kept until released")
                continue
            self._stop(self.entries.pop(name))
        for name, (sock, links) in wanted.items():
            e = self.entries.get(name)
            if e is not None and e.sock != str(sock):
                self._stop(self.entries.pop(name))
                e = None
            if e is None:
                try:
                    e = self._start(name, sock)
                except ResourceError as exc:
                    warnings.append(f"no block device for {name}: {exc}")
                    continue
                self.entries[name] = e
            self._link(e, [str(self.root / rel) for rel in links])
        self._save()
        return warnings

    def _start(self, name: str, sock: Path) -> Entry:
        hd = HostDevice(sock, name, self.work)
        try:
            hd.start()
        except BaseException:
            hd.close()
            raise
        assert hd.proc is not None and hd.device is not None
        log.info("block device %s for %s", hd.device, name)
        return Entry(name, str(sock), hd.proc.pid, str(hd.device), str(hd.file), [])

    def _link(self, e: Entry, links: list[str]) -> None:
        for old in [x for x in e.links if x not in links]:
            self._unlink(old, e.loop)
        for path in links:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                if p.is_symlink() and os.readlink(p) == e.loop:
                    continue
                p.unlink()
            p.symlink_to(e.loop)
        e.links = links

    def _unlink(self, path: str, loop: str) -> None:
        p = Path(path)
        with contextlib.suppress(OSError):
            if p.is_symlink() and os.readlink(p) == loop:
                p.unlink()
                if p.parent != self.root / "mapper" and not any(p.parent.iterdir()):
                    p.parent.rmdir()  # DEVDIR/VG with its last LV

    def _stop(self, e: Entry) -> None:
        for link in e.links:
            self._unlink(link, e.loop)
        backing = Path(f"/sys/block/{Path(e.loop).name}/loop/backing_file")
        with contextlib.suppress(OSError):
            if backing.read_text().strip() == e.file:
                run(["losetup", "--detach", e.loop], check=False)
        with contextlib.suppress(OSError):
            if e.file.encode() in Path(f"/proc/{e.pid}/cmdline").read_bytes():
                _terminate(e.pid)
        with contextlib.suppress(OSError):
            if any(line.split()[4] == e.file for line in
                   Path("/proc/self/mountinfo").read_text().splitlines()):
                run(["umount", "-l", e.file], check=False)
            os.unlink(e.file)

    def close_all(self) -> None:
        """Every device removed (a lab taken down), held or not."""
        for e in list(self.entries.values()):
            self._stop(e)
        self.entries.clear()
        self._save()

    # ---- who holds one -------------------------------------------------------------------
    def holders(self, name: str) -> list[str]:
        e = self.entries.get(name)
        if e is None:
            return []
        try:
            devno = dev_number(e.loop)
        except OSError:
            return []
        out = [f"a mount on {m}" for m in mounts_of(devno)]
        out += openers_of(e.loop)
        if not out:
            try:
                os.close(os.open(e.loop, os.O_RDONLY | os.O_EXCL))
            except OSError:
                out.append(f"an exclusive opener of {e.loop}")
        return out

    def clients(self, name: str) -> int:
        """The engine clients that are this device's own (its qemu-storage-daemon)."""
        return 1 if name in self.entries else 0

    def device(self, name: str) -> str | None:
        e = self.entries.get(name)
        return e.loop if e is not None else None
