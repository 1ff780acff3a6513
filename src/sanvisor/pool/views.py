"""Pool-wide views: every domain of every host, with its host."""

from __future__ import annotations

from typing import Any

from sanvisor.api.client import AgentClient
from sanvisor.errors import SanvisorError
from sanvisor.pool.config import PoolConfig


def pool_domains(pool: PoolConfig) -> list[dict[str, Any]]:
    """Each host's `list` rows (its Domain-0 included), with ``host``; a host whose
    agent does not answer gives one row saying so (state ``unreachable``)."""
    rows: list[dict[str, Any]] = []
    for host in pool.hosts.values():
        try:
            got = AgentClient(host.socket, timeout=10).domains()
        except SanvisorError as exc:
            rows.append({"host": host.name, "name": "-", "domid": -1, "state": "unreachable",
                         "reason": str(exc), "mem_mib": 0, "vcpus": 0, "letters": "------",
                         "cpu_seconds": 0.0})
            continue
        rows += [{**r, "host": host.name} for r in got]
    return rows
