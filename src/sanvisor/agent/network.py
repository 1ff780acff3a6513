"""Host-side plumbing for vifs: bridges, taps, and the NAT network.

Bridged: the tap joins the named Linux bridge (created if missing, STP off,
forward delay 0). NAT: the tap joins ``svnat0``, a bridge that holds the
gateway address of a private guest network; nftables masquerades it out.
Not root: user-mode networking, no tap at all.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from sanvisor.command import Runner, run
from sanvisor.errors import CommandError, DeviceError

DEFAULT_BRIDGE = "xenbr0"
NAT_BRIDGE = "svnat0"
NAT_GATEWAY = "10.213.0.1/24"
NAT_TABLE = "sanvisor_nat"
TAP_MAC = "fe:ff:ff:ff:ff:ff"  # every tap's host side (Xen's vif MAC; see add_tap)


def is_root() -> bool:
    return os.geteuid() == 0


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


class Network:
    def __init__(self, runner: Runner = run) -> None:
        self._run = runner

    def ensure_bridge(self, name: str) -> None:
        if link_exists(name):
            if not Path("/sys/class/net", name, "bridge").exists():
                raise DeviceError(f"{name} exists and is not a bridge", bridge=name)
            return
        try:
            self._run(["ip", "link", "add", name, "type", "bridge", "stp_state", "0",
                       "forward_delay", "0"])
            self._run(["ip", "link", "set", name, "up"])
        except CommandError as exc:
            if not link_exists(name):
                raise DeviceError(f"cannot create bridge {name}: {exc}", bridge=name) from exc

    def ensure_nat(self) -> None:
        self.ensure_bridge(NAT_BRIDGE)
        addrs = self._run(["ip", "-o", "addr", "show", "dev", NAT_BRIDGE]).out
        if NAT_GATEWAY not in addrs:
            self._run(["ip", "addr", "add", NAT_GATEWAY, "dev", NAT_BRIDGE])
        with contextlib.suppress(OSError):
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        net = "10.213.0.0/24"
        tables = self._run(["nft", "list", "tables"]).out
        if NAT_TABLE not in tables:
            script = (
                f"table ip {NAT_TABLE} {{\n"
                f" chain post {{ type nat hook postrouting priority 100; policy accept;\n"
                f"  ip saddr {net} ip daddr != {net} masquerade\n }}\n}}\n"
            )
            self._nft(script)

    def _nft(self, script: str) -> None:
        self._run(["nft", "-f", "-"], stdin=script)

    def add_tap(self, tap: str, bridge: str) -> None:
        """Create tap ``tap`` on ``bridge``. An interface of that name that exists is
        not ours to take (vifname=lo once made the agent delete lo): refused."""
        if link_exists(tap):
            raise DeviceError(f"vif: an interface named {tap} exists on this host "
                              "(vifname= must name a new interface)", tap=tap)
        try:
            self._run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
            # as Xen's vif scripts do: the highest MAC, so that the bridge (whose MAC is
            # its ports' lowest unless set) never takes the tap's, and the host's own
            # address on the bridge keeps its MAC as guests come and go (a guest leaving
            # by migration left the other hosts' ARP entries pointing at a gone tap)
            self._run(["ip", "link", "set", "dev", tap, "address", TAP_MAC])
            self._run(["ip", "link", "set", tap, "master", bridge])
            self._run(["ip", "link", "set", tap, "up"])
        except CommandError as exc:
            self.del_tap(tap)
            raise DeviceError(f"cannot plug {tap} into {bridge}: {exc}", tap=tap) from exc

    def del_tap(self, tap: str) -> None:
        if link_exists(tap):
            with contextlib.suppress(CommandError):
                self._run(["ip", "link", "del", tap])
