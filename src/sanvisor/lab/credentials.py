"""The lab's pool CA and its hosts' certificates (docs/pool.md): what an administrator
does with `sanvisor pool ca` and `pool cert HOST` for real hosts, done by `lab up`.

    LAB/ca/          the pool's CA (its key 0600 in a 0700 directory)
    LAB/hostN/tls/   host N's credentials: CN and DNS name hostN, IP its pool address
    LAB/admin/tls/   the administrator's client certificate (the CLI's, `-H HOST` for a
                     host whose agent is on another machine)

Where each host's agent listens for the others: the lab's QEMU hosts on their LAN
address (each in its own namespace) at port 8141; hosts in the machine's own namespace
(the loopback lab's, the nested Xen hosts' agents) on 127.0.0.1, each at a free port.
"""

from __future__ import annotations

import socket
from pathlib import Path

from sanvisor.errors import ResourceError
from sanvisor.pool.tls import ADMIN_DIR, AGENT_PORT, CA_CERT, CLIENT_CERT, Credentials


def issue(root: Path, pool: str, hosts: list[tuple[str, str, str]]) -> None:
    """The CA under ``root`` (made once), a certificate for each (name, home, address)
    that has none yet, and the administrator's (made once)."""
    from sanvisor.pool import pki

    ca = pki.ca_dir(root)
    if not (ca / CA_CERT).exists():
        pki.create_ca(root, pool)
    for name, home, address in hosts:
        creds = Credentials.of_home(Path(home))
        if not creds.present():
            pki.issue_host(ca, name, [address], creds.dir)
    if not (root / ADMIN_DIR / CLIENT_CERT).exists():
        pki.issue_admin(ca, "admin", root / ADMIN_DIR)


def free_port(address: str, taken: set[int]) -> int:
    """A port from 8141 up that nothing listens on at ``address`` and not in ``taken``
    (hosts whose agents have not started yet)."""
    for port in range(AGENT_PORT, AGENT_PORT + 200):
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind((address, port))
            except OSError:
                continue
        return port
    raise ResourceError(f"no free port for an agent on {address}",
                        ports=f"{AGENT_PORT}-{AGENT_PORT + 199}")
