"""Render a DomainSpec as an xl.cfg(5) file (I/O-free).

Strings are quoted with xl's escapes, so nothing in a spec can inject another
key. Guest-kit domains boot their kernel as a PV guest, as in the seed.
"""

from __future__ import annotations

from sanvisor.drivers.base import NicPlan
from sanvisor.errors import ConfigError
from sanvisor.model.diskspec import rewrite_root
from sanvisor.model.domain import DiskSpec, DomainSpec, target_split


def quote(value: str) -> str:
    out = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{out}"'


def xen_vdev(target: str) -> str:
    """The PV guest's name for a target: xvd names as given (partitions too: blkfront
    makes xvda2 a disk of its own), sd/hd/vd names as the same xvd letter."""
    prefix, letters, part = target_split(target)
    return target if prefix == "xvd" else f"xvd{letters}{part or ''}"


def guest_root(dev: str) -> str | None:
    """``root=/dev/sda1`` -> ``/dev/xvda1``: the name the PV guest gives that disk."""
    name = dev.removeprefix("/dev/")
    try:
        vdev = xen_vdev(name)
    except ValueError:
        return None
    return None if vdev == name else "/dev/" + vdev


def disk_entry(d: DiskSpec) -> str:
    """xl's key=value disk syntax; target= last (it takes the rest of the spec).

    Always blkback (``backendtype=phy``): dom0 has no qdisk (qemu-system-xen), and a
    ``file:`` disk goes through a loop device in the block hotplug script, as xm did.
    So no NBD disk: dom0 would need an NBD client (nbd-client) to make it a block device."""
    if d.backend == "nbd":
        raise ConfigError(f"disk {d.target}: {d.path}: NBD disks are not supported on Xen "
                          "hosts (dom0 has no NBD disk backend); connect it in dom0 with "
                          "nbd-client and give the device as phy:")
    vdev = xen_vdev(d.target)
    parts = [f"vdev={vdev}", f"access={'ro' if d.readonly else 'rw'}", "format=raw",
             "backendtype=phy"]
    if d.devtype == "cdrom":
        parts.append("devtype=cdrom")
    parts.append(f"target={d.path}")
    return ", ".join(parts)


def vif_entry(nic: NicPlan) -> str:
    parts = [f"mac={nic.mac}"]
    if nic.vif.bridge:
        parts.append(f"bridge={nic.vif.bridge}")
    if nic.vif.ip:
        parts.append(f"ip={nic.vif.ip.split('/')[0]}")
    if nic.tap:
        parts.append(f"vifname={nic.tap}")
    return ", ".join(parts)


def render(spec: DomainSpec, *, kernel: str, ramdisk: str | None, cmdline: str,
           nics: list[NicPlan], memory: int = 0) -> str:
    """``memory``: the balloon target to start at, when not the config's (a restore
    of a guest ballooned above it: xl restore would not find room for its pages)."""
    lines = [
        f"name = {quote(spec.name)}",
        f"type = {quote(spec.builder)}",  # pv | pvh | hvm
        f"kernel = {quote(kernel)}",
    ]
    if spec.uuid:
        lines.append(f"uuid = {quote(spec.uuid)}")
    if ramdisk:
        lines.append(f"ramdisk = {quote(ramdisk)}")
    lines += [
        f"extra = {quote(rewrite_root(cmdline, guest_root))}",
        f"memory = {memory or spec.memory}",
        f"maxmem = {spec.maxmem}",
        f"vcpus = {spec.vcpus}",
        f"maxvcpus = {spec.maxvcpus}",
        f"on_poweroff = {quote(spec.on_poweroff.value)}",
        f"on_reboot = {quote(spec.on_reboot.value)}",
        f"on_crash = {quote(spec.on_crash.value)}",
    ]
    if spec.disks:
        lines.append("disk = [ " + ", ".join(quote(disk_entry(d)) for d in spec.disks) + " ]")
    if nics:
        lines.append("vif = [ " + ", ".join(quote(vif_entry(n)) for n in nics) + " ]")
    return "\n".join(lines) + "\n"
