"""A real Xen 4.17 host nested under QEMU (TCG), with a command channel into dom0."""

from __future__ import annotations

import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sanvisor.errors import TimeoutError_
from sanvisor.waiting import wait_until
from sanvisor.xenhost import scripts
from sanvisor.xenhost.build import DOMU_KERNEL, DOMU_RAMDISK, XenKit
from sanvisor.xenhost.channel import (
    Channel,
    ChannelError,
    Proc,
    Sink,
    key_path,
    put_file,
    write_key,
)
from sanvisor.xenhost.packages import XenHostError

QEMU = "qemu-system-x86_64"
#: TCG's translation cache: QEMU's default is 1 GiB, resident once filled; 128 MiB is as
#: fast here (Xen, dom0 and a few domUs; docs/xen.md has the measurements)
TB_MIB = 128
#: The nested host's RAM, and dom0's share (it holds its ~120 MiB initramfs in tmpfs,
#: and save images and cores pass through its tmpfs). Only what is used is resident
#: on the outer host: Xen does not scrub its free memory at boot (bootscrub=0).
MEMORY_MIB = 2048
DOM0_MIB = 768


def xen_cmdline(dom0_mib: int) -> str:
    """Xen's own options (its console on COM1, the console log). ``bootscrub=0``: a
    fresh QEMU's RAM is zero already, and scrubbing it would touch (hence make
    resident on the outer host) every page of the nested host, used or not."""
    return (f"console=com1 com1=115200,8n1 dom0_mem={dom0_mib}M,max:{dom0_mib}M"
            " dom0_max_vcpus=2 noreboot bootscrub=0")


@dataclass(frozen=True)
class XenLan:
    """A nested host's NIC on a LAN: a tap in ``bridge`` of namespace ``netns`` (QEMU
    runs in that namespace), dom0's ``address`` (IP/PREFIX) on its xenbr0, which
    bridges the NIC (the guests' vifs are on that LAN too)."""

    netns: str
    bridge: str
    tap: str
    mac: str
    address: str


def dom0_cmdline(name: str, lan: XenLan | None = None) -> str:
    line = f"console=hvc0 earlyprintk=xen rdinit=/init sv.hostname={name}"
    return f"{line} sv.lan={lan.address}" if lan else line


def pv_config(name: str, memory_mib: int = 128, vcpus: int = 1) -> str:
    """An xl.cfg for a diskless, NIC-less PV domU running the guest kit (console hvc0;
    its /init prints ``SANVISOR-READY <name>`` there)."""
    return (f'name = "{name}"\ntype = "pv"\nkernel = "{DOMU_KERNEL}"\n'
            f'ramdisk = "{DOMU_RAMDISK}"\nmemory = {memory_mib}\nvcpus = {vcpus}\n'
            f'extra = "console=hvc0 sv.hostname={name}"\non_poweroff = "destroy"\n')


def qemu_argv(kit: XenKit, workdir: Path, name: str, memory_mib: int,
              dom0_mib: int, tb_mib: int = TB_MIB, lan: XenLan | None = None) -> list[str]:
    for part in (str(kit.dom0_kernel), str(kit.dom0_initrd), dom0_cmdline(name, lan)):
        if "," in part:
            raise XenHostError(f"QEMU -initrd cannot carry a comma: {part!r}")
    return [
        # +npt: Xen then has hardware-assisted paging (HAP), hence log-dirty for PVH
        # guests and their live migration (this Xen is built without shadow paging)
        QEMU, "-name", name, "-accel", f"tcg,thread=multi,tb-size={tb_mib}",
        "-cpu", "qemu64,+svm,+npt",
        "-m", str(memory_mib), "-smp", "2", "-nographic", "-no-reboot", "-monitor", "none",
        "-kernel", str(kit.xen), "-append", xen_cmdline(dom0_mib),
        "-initrd", f"{kit.dom0_kernel} {dom0_cmdline(name, lan)},{kit.dom0_initrd}",
        "-chardev", f"file,id=con0,path={workdir / 'console.log'}",
        "-serial", "chardev:con0",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=ctl,path={workdir / 'ctl.sock'},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=ctl,name={scripts.CTL_PORT_NAME}",
        *(["-netdev", f"tap,id=lan0,ifname={lan.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=lan0,mac={lan.mac},romfile="]
          if lan else ["-net", "none"]),
    ]


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise XenHostError(f"ip {' '.join(args)}: {res.stderr.strip()}")


class XenHost:
    """One nested Xen host. ``start`` boots it, ``run`` runs commands in dom0."""

    def __init__(self, kit: XenKit, workdir: Path, *, name: str = "xen1",
                 memory_mib: int = MEMORY_MIB, dom0_mib: int = DOM0_MIB, tb_mib: int = TB_MIB,
                 lan: XenLan | None = None) -> None:
        self.kit = kit
        self.tb_mib = tb_mib
        self.lan = lan
        self.workdir = Path(workdir)
        self.name = name
        self.memory_mib = memory_mib
        self.dom0_mib = dom0_mib
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: Channel | None = None

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    def console_tail(self, chars: int = 2000) -> str:
        try:
            return self.console_log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _check_alive(self) -> None:
        if self.proc is None:
            raise XenHostError(f"{self.name} is not started")
        if self.proc.poll() is not None:
            raise XenHostError(f"QEMU of {self.name} exited with {self.proc.returncode}",
                               console=self.console_tail())

    def detach(self) -> int:
        """Let go of the channel and leave QEMU running (for the host's agent); its pid."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        assert self.proc is not None
        pid = self.proc.pid
        (self.workdir / "qemu.pid").write_text(f"{pid}\n")
        self.proc = None
        return pid

    def start(self, timeout: float = 120, attempts: int = 2) -> None:
        """Boot QEMU and wait until dom0's command server answers on the channel.
        A boot that does not get there is killed and done again (``attempts``)."""
        if self.proc is not None:
            raise XenHostError(f"{self.name} already started")
        per_try = max(timeout / attempts, 45.0)
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(per_try)
                return
            except XenHostError:
                if attempt == attempts:
                    raise
                # stop() ran already; boot again with a fresh QEMU and channel

    def _start_once(self, timeout: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        sock = self.workdir / "ctl.sock"
        sock.unlink(missing_ok=True)
        try:  # the channel's key, next to its socket (the host's agent reads it there)
            write_key(key_path(sock), self.kit.key.read_bytes())
        except (OSError, ValueError) as exc:
            raise XenHostError(f"{self.name}: the kit's channel key: {exc}",
                               path=str(self.kit.key)) from None
        argv = qemu_argv(self.kit, self.workdir, self.name, self.memory_mib, self.dom0_mib,
                         self.tb_mib, self.lan)
        if self.lan is not None:  # QEMU in the LAN's namespace, on a tap in its bridge
            lan = self.lan
            subprocess.run(["ip", "-n", lan.netns, "link", "del", lan.tap],
                           capture_output=True, check=False)
            _ip("-n", lan.netns, "tuntap", "add", "dev", lan.tap, "mode", "tap")
            _ip("-n", lan.netns, "link", "set", lan.tap, "master", lan.bridge, "up")
            argv = ["ip", "netns", "exec", lan.netns, *argv]
        (self.workdir / "qemu.cmd").write_text(shlex.join(argv) + "\n")
        t0 = time.monotonic()
        deadline = t0 + timeout
        with (self.workdir / "qemu.out").open("wb") as out:
            # umask 077: its control socket (root in dom0 for whoever connects) is 0600
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         umask=0o077)
        try:
            self.channel = self._connect(sock, deadline)
        except BaseException:
            self.stop()
            raise

    def _connect(self, sock: Path, deadline: float) -> Channel:
        def answered() -> Channel | None:
            self._check_alive()
            left = deadline - time.monotonic()
            try:
                return Channel(str(sock), hello_timeout=max(0.5, min(2.0, left)))
            except (OSError, ChannelError):
                return None

        try:
            return wait_until(f"{self.name}'s dom0", answered,
                              max(0.0, deadline - time.monotonic()))
        except TimeoutError_:
            raise XenHostError(f"{self.name}: dom0 not ready in time",
                               console=self.console_tail()) from None

    def run(self, argv: list[str], timeout: float = 120,
            stdin: bytes | None = None) -> tuple[int, str, str]:
        """Run ``argv`` in dom0; return (rc, stdout, stderr). rc 137 means dom0 killed
        the command at ``timeout``."""
        self._check_alive()
        assert self.channel is not None
        try:
            return self.channel.run(argv, timeout, stdin)
        except ChannelError:
            self._check_alive()
            raise

    def spawn(self, argv: list[str], *, timeout: float = 0, pty: bool = False,
              on_out: Sink | None = None, on_err: Sink | None = None) -> Proc:
        """Start a streaming process in dom0 (see :meth:`Channel.spawn`)."""
        self._check_alive()
        assert self.channel is not None
        return self.channel.spawn(argv, timeout=timeout, pty=pty, on_out=on_out,
                                  on_err=on_err)

    def put_file(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` in dom0 (parent directories created)."""
        put_file(self.run, path, data)

    def stop(self) -> None:
        """Kill QEMU and remove the socket; safe to call twice."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None
        (self.workdir / "ctl.sock").unlink(missing_ok=True)
        key_path(self.workdir / "ctl.sock").unlink(missing_ok=True)
        if self.lan is not None:
            subprocess.run(["ip", "-n", self.lan.netns, "link", "del", self.lan.tap],
                           capture_output=True, check=False)

    def __enter__(self) -> XenHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

