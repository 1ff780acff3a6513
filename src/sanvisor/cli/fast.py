"""The read-only verbs scripts call in loops (`list`, `domid`, `domname`, `uptime`,
`info`), answered without argparse, pathlib or dataclasses: a CLI call pays its
imports every time (issue 14: under 3x the interpreter's own start-up). Any
option these verbs do not know, or a wrong number of arguments, goes to the full
parser, which prints the usage."""

from __future__ import annotations

import sys

from sanvisor import where

TYPE_CHECKING = False  # typing costs ~4 ms to import: every CLI call would pay it
if TYPE_CHECKING:
    from typing import Any

READ_ONLY = frozenset(("list", "domid", "domname", "uptime", "info"))
_ARITY = {"domid": 1, "domname": 1, "info": 0}


def agent_home(home: str | None, on_host: str | None) -> str:
    """The agent home a command line means: -H lab host, --home, or the default."""
    from sanvisor.errors import NotFoundError

    if on_host:
        path = where.pool_host_home(on_host)
        if path is None:
            raise NotFoundError(f"no host {on_host!r} in the pool at {where.pool_home()}",
                                host=on_host)
        return path
    return home or where.default_home()


def accepts(rest: list[str]) -> bool:
    """This command line is one the fast path answers exactly as the full one would."""
    if not rest or rest[0] not in READ_ONLY:
        return False
    verb, params = rest[0], rest[1:]
    if verb == "list":
        params = [p for p in params if p not in ("-l", "--long")]
    if any(p.startswith("-") for p in params):
        return False
    return verb not in _ARITY or len(params) == _ARITY[verb]


def select(rows: list[dict[str, Any]], refs: list[str]) -> list[dict[str, Any]]:
    """The rows named by ``refs`` (name, id or uuid), in list order; each ref must name
    one (xm: "Domain 'x' does not exist")."""
    if not refs:
        return rows
    want = set(refs)
    picked = [r for r in rows if {r["name"], str(r["domid"]), r.get("uuid")} & want]
    known = {str(x) for r in picked for x in (r["name"], r["domid"], r.get("uuid"))}
    missing = next((r for r in refs if r not in known), None)
    if missing is not None:
        from sanvisor.errors import NotFoundError

        raise NotFoundError(f"domain {missing!r} does not exist", domain=missing)
    return picked


def run(rest: list[str], *, as_json: bool, home: str) -> int:
    """Answer ``rest`` (accepted by :func:`accepts`); raises SanvisorError."""
    from sanvisor.api.client import AgentClient
    from sanvisor.cli import render

    client = AgentClient(where.agent_socket(home))  # type: ignore[arg-type]
    verb = rest[0]
    params = [p for p in rest[1:] if p not in ("-l", "--long")]
    data: Any
    if verb == "list":
        data = select(client.domains(), params)
        if len(params) != len(rest) - 1:  # -l: xm's SXP
            from sanvisor.cli.sxp import list_long

            text = list_long(data)
        else:
            text = render.list_table(data)
    elif verb in ("domid", "domname"):
        info = client.info(params[0])
        data = {"name": info["name"], "domid": info["domid"]}
        domid = "-" if info["domid"] is None else str(info["domid"])  # registered, stopped
        text = domid if verb == "domid" else str(info["name"])
    elif verb == "uptime":
        rows = select(client.domains(), params)
        data = [{"name": r["name"], "domid": r["domid"], "uuid": r.get("uuid", ""),
                 "uptime": r.get("uptime", 0.0)} for r in rows if "uptime" in r]
        text = render.uptime_table(data)
    else:
        data = client.call("GET", "/v1/host/info")
        text = info_text(data)
    if as_json:
        render.emit_json(data)
    else:
        sys.stdout.write(text + "\n")
    return 0


#: xm info's fields, in its order; sanvisor's own follow
INFO_ORDER = ("host", "release", "version", "machine", "nr_cpus", "nr_nodes",
              "cores_per_socket", "threads_per_core", "cpu_mhz", "hw_caps", "virt_caps",
              "total_memory", "free_memory", "xen_major", "xen_minor", "xen_extra",
              "xen_version", "xen_caps", "xen_scheduler", "accelerator", "driver")


def info_text(data: dict[str, Any]) -> str:
    """`xm info`'s shape: ``key                    : value``, its fields first."""
    keys = [k for k in INFO_ORDER if k in data] + [k for k in data if k not in INFO_ORDER]
    return "\n".join(f"{k:<23}: {data[k]}" for k in keys)
