"""Build QEMU's command line from a LaunchPlan. Pure: no I/O.

Disks sit on one virtio-scsi controller (hot-add/remove without the four-IDE
limit the seed hits under full virtualisation); the target gives the SCSI LUN and
is the disk's serial (the guest's VPD page 0x80); guestdisks.py says how the guest
sees them, and ``root=`` is rewritten to match.
"""

from __future__ import annotations

from pathlib import Path

from sanvisor.drivers.base import LaunchPlan, NicPlan
from sanvisor.drivers.qemu.guestdisks import creation_order, guest_root
from sanvisor.drivers.qemu.guestdisks import disk_lun as disk_lun  # re-exported
from sanvisor.model.diskspec import nbd_server, rewrite_root
from sanvisor.model.domain import DiskSpec
from sanvisor.model.units import align_up

MEM_BLOCK_MIB = 128  # Linux x86_64 memory block: hot-added DIMMs come in these
MAX_DIMM_SLOTS = 8


def disk_node(disk: DiskSpec) -> str:
    return f"disk-{disk.target}"


def disk_blockdev(disk: DiskSpec, nbd_socket: str | None = None) -> dict[str, object]:
    """The blockdev-add argument for a disk (also used on the command line).

    A multipath device (/dev/mapper/NAME) is the host multipath daemon's NBD
    export on a unix socket; QEMU reconnects to it for 30 s if it goes away
    (an agent restart), holding the guest's I/O meanwhile instead of failing it.
    An ``nbd:`` disk is QEMU's NBD client over TCP, reconnecting the same way."""
    path = disk.path
    is_dev = path.startswith("/dev/")
    proto: dict[str, object]
    if nbd_socket is not None or disk.backend == "nbd":
        if nbd_socket is not None:
            server: dict[str, object] = {"type": "unix", "path": nbd_socket}
            export = nbd_socket.rsplit("/", 1)[-1].removesuffix(".sock")  # a map, an LV
        else:
            host, port, export = nbd_server(path)
            server = {"type": "inet", "host": host, "port": str(port)}
        proto = {"driver": "nbd", "server": server, "export": export, "reconnect-delay": 30,
                 "node-name": f"proto-{disk.target}", "read-only": disk.readonly,
                 "auto-read-only": False, "discard": "unmap"}
        if not export:
            del proto["export"]  # the server's default export
    else:
        proto = {
            "driver": "host_device" if is_dev else "file",
            "filename": path,
            "node-name": f"proto-{disk.target}",
            "read-only": disk.readonly,
            "auto-read-only": False,
            "discard": "unmap",
        }
    return {
        "driver": "raw",
        "node-name": disk_node(disk),
        "file": proto,
        "read-only": disk.readonly,
        "discard": "unmap",
    }


def disk_device(disk: DiskSpec) -> dict[str, object]:
    """The device_add argument for a disk."""
    dev: dict[str, object] = {
        "driver": "scsi-cd" if disk.devtype == "cdrom" else "scsi-hd",
        "id": f"dev-{disk.target}",
        "bus": "scsi0.0",
        "channel": 0,
        "scsi-id": 0,
        "lun": disk_lun(disk.target),
    }
    if disk.path:
        dev["drive"] = disk_node(disk)
    if disk.devtype != "cdrom":
        dev["serial"] = disk.target
    return dev


def nic_netdev(nic: NicPlan) -> dict[str, object]:
    if nic.tap is None:
        return {"type": "user", "id": f"net{nic.index}", "restrict": False}
    return {"type": "tap", "id": f"net{nic.index}", "ifname": nic.tap,
            "script": "no", "downscript": "no"}


def nic_device(nic: NicPlan) -> dict[str, object]:
    # romfile="": no iPXE option ROM (we boot the kernel directly); saves ~0.25 s of boot
    return {"driver": nic.vif.model, "id": f"nic{nic.index}", "netdev": f"net{nic.index}",
            "mac": nic.mac, "romfile": ""}


def _esc(value: str) -> str:
    """A value inside QEMU's key=value,... option syntax: commas doubled."""
    return value.replace(",", ",,")


def _opts(d: dict[str, object], first: str | None = None) -> str:
    """Render a flat dict as QEMU's key=value,... (first key's value bare)."""
    parts: list[str] = []
    items = dict(d)
    if first is not None:
        parts.append(str(items.pop(first)))
    for k, v in items.items():
        if isinstance(v, bool):
            v = "on" if v else "off"
        parts.append(f"{k}={str(v).replace(',', ',,')}")
    return ",".join(parts)


def _flatten(d: dict[str, object], prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _blockdev_opts(bd: dict[str, object]) -> str:
    return _opts(_flatten(bd))


def guest_cmdline(plan: LaunchPlan) -> str:
    """The kernel command line, ``root=`` naming a disk as this guest will see it."""
    disks = plan.spec.disks
    udev = plan.initrd is not None
    return rewrite_root(plan.cmdline, lambda dev: guest_root(dev, disks, udev=udev))


def memory_arg(memory: int, maxmem: int) -> str:
    if maxmem <= memory:
        return f"{memory}M"
    top = memory + align_up(maxmem - memory, MEM_BLOCK_MIB)
    return f"{memory}M,slots={MAX_DIMM_SLOTS},maxmem={top}M"


def build_argv(plan: LaunchPlan, *, qemu: str, accel: str) -> list[str]:
    spec = plan.spec
    rd: Path = plan.rundir
    vcpus = plan.vcpus_now or spec.vcpus
    argv = [
        qemu,
        "-name", f"guest={_esc(spec.name)},debug-threads=on",
        "-accel", "tcg,thread=multi" if accel == "tcg" else accel,
        "-M", "pc",
        "-cpu", "host" if accel == "kvm" else "qemu64",
        "-m", memory_arg(spec.memory, spec.maxmem),
        "-smp", f"{vcpus},maxcpus={spec.maxvcpus}",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-qmp", f"unix:{_esc(str(rd / 'qmp.sock'))},server=on,wait=off",
        "-chardev", f"socket,id=con0,path={_esc(str(rd / 'console.sock'))},server=on,"
                    f"wait=off,logfile={_esc(str(rd / 'console.log'))},logappend=on",
        "-serial", "chardev:con0",
        "-kernel", str(plan.kernel),
        "-append", guest_cmdline(plan),
        # fixed queue count: QEMU's default follows the vCPU count at start, which
        # differs after a vCPU hot-plug and breaks restore/migration
        "-device", f"virtio-scsi-pci,id=scsi0,num_queues={min(spec.maxvcpus, 8)}",
        "-device", "virtio-balloon-pci,id=balloon0",
        "-device", "pvpanic",
        "-device", "virtio-serial-pci,id=vser0,max_ports=2",
        "-chardev", f"socket,id=ctl,path={_esc(str(rd / 'ctl.sock'))},server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=ctl,name=org.sanvisor.ctl",
        "-no-shutdown",
        "-action", "panic=pause",  # one GUEST_PANICKED event; on_crash is the agent's job
    ]
    if spec.uuid:
        argv += ["-uuid", spec.uuid]
    if plan.initrd is not None:
        argv += ["-initrd", str(plan.initrd)]
    if spec.on_reboot.value != "restart":
        argv.append("-no-reboot")
    for disk in creation_order(spec.disks):  # the guest scans them in reverse
        if disk.path:
            sock = plan.disk_sources.get(disk.target)
            argv += ["-blockdev", _blockdev_opts(disk_blockdev(disk, sock))]
        argv += ["-device", _opts(disk_device(disk), first="driver")]
    for nic in plan.nics:
        argv += ["-netdev", _opts(nic_netdev(nic), first="type")]
        argv += ["-device", _opts(nic_device(nic), first="driver")]
    for i, mib in enumerate(plan.dimms_mib):
        argv += ["-object", f"memory-backend-ram,id=mem{i},size={int(mib)}M",
                 "-device", f"pc-dimm,id=dimm{i},memdev=mem{i}"]
    if plan.incoming:
        argv += ["-incoming", "defer"]  # the stream's runstate decides: a running guest
        #                                 starts here on arrival, a paused one stays
    if plan.paused:
        argv.append("-S")
    return argv
