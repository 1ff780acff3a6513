"""The lab's LAN: the network the pool's hosts and their guests share (the seed's
bridged networking, xenbr0 on each host, with the hosts on one Ethernet).

    {lab}-lan   a namespace with the LAN switch: bridge `lan`, 10.213.100.1/24 (where
                a test's client stands: it sees guests as the LAN does)
    host n      xenbr0 (the guests' default bridge), 10.213.100.<10+n>/24, and its
                uplink: a veth `uplink` in xenbr0, its peer `h<n>` in the switch

A guest keeps its MAC and IP when it moves between hosts; QEMU's self-announce
after a migration teaches the switch where it is now.
"""

from __future__ import annotations

from collections.abc import Callable

LAN_PREFIX = "10.213.100"
LAN_BRIDGE = "lan"
HOST_BRIDGE = "xenbr0"


def lan_address(n: int) -> str:
    return f"{LAN_PREFIX}.{10 + n}"


def build_lan(ip: Callable[..., None], lan_ns: str, hosts: list[tuple[int, str]]) -> None:
    """``hosts``: (n, netns) of each host. ``ip`` runs `ip ARGS` (raising on failure)."""
    ip("netns", "add", lan_ns)
    ip("-n", lan_ns, "link", "set", "lo", "up")
    ip("-n", lan_ns, "link", "add", LAN_BRIDGE, "type", "bridge", "stp_state", "0",
       "forward_delay", "0")
    ip("-n", lan_ns, "addr", "add", f"{LAN_PREFIX}.1/24", "dev", LAN_BRIDGE)
    ip("-n", lan_ns, "link", "set", LAN_BRIDGE, "up")
    for n, netns in hosts:
        add_host(ip, lan_ns, n, netns)


def add_host(ip: Callable[..., None], lan_ns: str, n: int, netns: str) -> None:
    ip("-n", netns, "link", "add", HOST_BRIDGE, "type", "bridge", "stp_state", "0",
       "forward_delay", "0")
    ip("link", "add", "uplink", "netns", netns, "type", "veth", "peer", "name", f"h{n}",
       "netns", lan_ns)
    ip("-n", lan_ns, "link", "set", f"h{n}", "master", LAN_BRIDGE, "up")
    ip("-n", netns, "link", "set", "uplink", "master", HOST_BRIDGE, "up")
    ip("-n", netns, "addr", "add", f"{lan_address(n)}/24", "dev", HOST_BRIDGE)
    ip("-n", netns, "link", "set", HOST_BRIDGE, "up")
