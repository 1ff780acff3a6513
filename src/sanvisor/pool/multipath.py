"""One multipath.conf for the pool: installed on every host, then the names compared.

The seed's trap is a LUN known by different names on two hosts (mpath5 here,
mpath3 there): a guest migrated by path would find another disk. After the push,
every map name must mean one WWID on every host, and every WWID one name.
"""

from __future__ import annotations

from typing import Any

from sanvisor.api.client import AgentClient
from sanvisor.pool.config import PoolConfig


def check_names(names: dict[str, dict[str, str]]) -> list[str]:
    """``names``: host -> map name -> WWID. Each clash, in one line."""
    problems = []
    for name in sorted({n for per in names.values() for n in per}):
        seen = {h: per[name] for h, per in names.items() if name in per}
        if len(set(seen.values())) > 1:
            problems.append(f"{name} is " + ", ".join(f"{w} on {h}" for h, w in seen.items()))
    by_wwid: dict[str, dict[str, str]] = {}
    for h, per in names.items():
        for n, w in per.items():
            by_wwid.setdefault(w, {})[h] = n
    for w, per_host in sorted(by_wwid.items()):
        if len(set(per_host.values())) > 1:
            problems.append(f"WWID {w} is named " + ", ".join(
                f"{n} on {h}" for h, n in per_host.items()))
    return problems


def push_conf(pool: PoolConfig, text: str, source: str) -> dict[str, Any]:
    """Install ``text`` on every host with maps (its agent checks it first: a bad file
    changes no host), then compare the names. Returns hosts' names and problems."""
    names: dict[str, dict[str, str]] = {}
    for host in pool.hosts.values():
        if host.driver != "qemu":
            continue  # a Xen host's dom0 runs its own multipath-tools (issue 11)
        view = AgentClient(host.socket).call("PUT", "/v1/multipath/conf",
                                             {"text": text, "source": source})
        names[host.name] = {m["name"]: m["wwid"] for m in view["maps"]}
    return {"hosts": names, "problems": check_names(names)}
