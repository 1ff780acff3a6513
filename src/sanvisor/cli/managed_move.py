"""`start DOM --host HOST`: start a registered domain on another host of the pool.

Registrations live on a host (agent/configstore.py) until the pool's state store
holds them; so the registration moves with the domain: registered on HOST (same
uuid, same config), started there, then forgotten here. A failed start there
unregisters it there again and leaves it registered here, as it was.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from sanvisor.api.client import AgentClient, quote
from sanvisor.errors import ConflictError, NotFoundError, SanvisorError
from sanvisor.paths import Layout


def host_socket(host: str) -> Path:
    """HOST: a host of the pool (pool.json), or an agent's home directory."""
    from sanvisor import where

    home = host if host.startswith("/") else where.pool_host_home(host)
    if home is None:
        raise NotFoundError(f"start: no host {host!r} in the pool at {where.pool_home()}",
                            host=host)
    sock = Layout(Path(home)).socket
    if not sock.exists():
        raise NotFoundError(f"start: no agent for host {host!r} (no {sock})", host=host)
    return sock


def start_on(here: AgentClient, name: str, host: str, *, paused: bool) -> dict[str, Any]:
    sock = host_socket(host)
    path = f"/v1/managed/{quote(name)}"
    if sock.resolve() == Path(here.socket_path).resolve():
        return dict(here.call("POST", f"{path}/start", {"paused": paused}))
    reg = next((r for r in here.call("GET", "/v1/managed") if r["name"] == name), None)
    if reg is None:
        raise NotFoundError(f"domain {name!r} is not registered here (sanvisor new FILE "
                            "registers it)", domain=name)
    running = next((r for r in here.domains() if r["name"] == name and r["domid"]), None)
    if running is not None:
        raise ConflictError(f"domain {name} runs here (id {running['domid']}): start "
                            "--host moves a domain that does not run (see migrate)",
                            domain=name)
    there = AgentClient(sock)
    there.call("POST", "/v1/managed", {"spec": reg["config"], "autostart": reg["autostart"],
                                       "config_file": reg.get("source") or None})
    try:
        info = dict(there.call("POST", f"{path}/start", {"paused": paused}))
    except SanvisorError:
        with contextlib.suppress(SanvisorError):
            there.call("DELETE", path)
        raise
    here.call("DELETE", path)
    return info
