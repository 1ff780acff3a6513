"""How the Xen driver reaches dom0, chosen from the host's host.json.

The plain case is a real Xen host: the agent runs in dom0 and runs xl itself
(:class:`sanvisor.drivers.xen.local.LocalDom0`). Another transport is one
setting away: ``"ctl"`` names the unix socket of a dom0 command channel
(:mod:`sanvisor.xenhost.channel`, what a nested host of the lab has), and the
same driver runs xl through it.

``"guest_kit"`` (optional, ``{"kernel": PATH, "initrd": PATH}``, paths in dom0)
is the kernel and initramfs a domain boots when its config names none; without
it the agent builds the default guest kit, as on a QEMU host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sanvisor.drivers.xen.driver import XenDriver
from sanvisor.errors import ConfigError


def xen_driver(host: dict[str, Any], where: str = "host.json") -> tuple[XenDriver, str]:
    """The driver over the transport ``host`` asks for, and a line that says which."""
    ctl = host.get("ctl")
    if not ctl:
        from sanvisor.drivers.xen.local import LocalDom0

        dom0 = LocalDom0()
        return (XenDriver(dom0.run, dom0.put_file, spawn=dom0.spawn),
                "in this dom0 (xl run locally)")
    if not isinstance(ctl, str):
        raise ConfigError(f"{where}: ctl: not a socket path: {ctl!r}", field="ctl")
    from sanvisor.xenhost.link import Dom0Link

    link = Dom0Link(ctl)
    return (XenDriver(lambda argv, stdin: link.run(argv, stdin), link.put_file,
                      spawn=link.spawn), f"dom0 through {ctl}")


def guest_kit(host: dict[str, Any], where: str = "host.json") -> tuple[Path, Path] | None:
    """host.json's ``guest_kit`` (kernel, initrd: dom0 paths), or None."""
    kit = host.get("guest_kit")
    if kit is None:
        return None
    if not isinstance(kit, dict) or not all(isinstance(kit.get(k), str) and kit[k]
                                            for k in ("kernel", "initrd")):
        raise ConfigError(f"{where}: guest_kit: want {{\"kernel\": PATH, \"initrd\": PATH}},"
                          f" got {kit!r}", field="guest_kit")
    return Path(kit["kernel"]), Path(kit["initrd"])
