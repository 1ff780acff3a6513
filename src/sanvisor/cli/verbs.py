"""Each verb: parse its arguments, call the agent, render the answer."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sanvisor.api.client import AgentClient
from sanvisor.cli import lvm_verbs, render, xm_verbs
from sanvisor.errors import ConfigError, UsageError
from sanvisor.paths import Layout


def _client(layout: Layout) -> AgentClient:
    return AgentClient(layout.socket)


def _out(args: argparse.Namespace, data: Any, text: str | None = None) -> None:
    if args.json:
        render.emit_json(data)
    elif text is not None:
        print(text)


def _mib(text: str) -> int:
    try:
        from sanvisor.model.units import parse_mib

        return parse_mib(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def do_create(args: argparse.Namespace, layout: Layout) -> int:
    """The config is parsed by the agent (the CLI stays light: ~15 ms of imports saved
    on every create); its errors and warnings name this file and line."""
    text, path = xm_verbs.read_config(args.config)
    body = {"config": text, "config_file": str(path.absolute()), "overrides": args.overrides,
            "paused": args.paused, "dry_run": args.dry_run}
    info = _client(layout).call("POST", "/v1/domains", body)
    for w in info.pop("warnings", []):
        print(f"sanvisor: warning: {w.replace(str(path.absolute()), args.config)}",
              file=sys.stderr)
    if args.dry_run:
        _out(args, info, render.domain_sxp(info))
        return 0
    _out(args, info, f"Started domain {info['name']} (id={info['domid']})"
         + (", paused" if args.paused else ""))
    if args.console:
        from sanvisor.cli.console import attach

        return attach(info["console_socket"], info["name"])
    return 0


def _read_only(rest: list[str]) -> Any:
    """list, domid, domname, uptime, info: answered by the fast path's code."""
    def run(args: argparse.Namespace, layout: Layout) -> int:
        from sanvisor.cli import fast

        if getattr(args, "pool", False):
            return _list_pool(args)
        return fast.run(rest_of(args), as_json=args.json, home=str(layout.home))

    def rest_of(args: argparse.Namespace) -> list[str]:
        if rest[0] == "list":
            return ["list", *(["-l"] if args.long else []), *args.doms]
        if rest[0] == "uptime":
            return ["uptime", *args.doms]
        return [rest[0], *(getattr(args, a) for a in rest[1:])]
    return run


def _list_pool(args: argparse.Namespace) -> int:
    from sanvisor.cli.fast import select
    from sanvisor.pool.config import PoolConfig
    from sanvisor.pool.views import pool_domains

    rows = pool_domains(PoolConfig.load())
    if args.doms:
        rows = select(rows, args.doms)
    if args.long:
        from sanvisor.cli.sxp import list_long

        _out(args, rows, list_long(rows))
    else:
        _out(args, rows, render.list_table(rows, host=True))
    return 0


def _simple(verb: str) -> Any:
    def run(args: argparse.Namespace, layout: Layout) -> int:
        data = _client(layout).verb(args.dom, verb)
        _out(args, data)
        return 0
    return run


def do_save(args: argparse.Namespace, layout: Layout) -> int:
    path = str(xm_verbs.local_path(args.file, "save").resolve())
    _out(args, _client(layout).verb(args.dom, "save", {"path": path}))
    return 0


def do_migrate(args: argparse.Namespace, layout: Layout) -> int:
    from sanvisor.cli import migrate

    return migrate.run(args, layout)


def do_restore(args: argparse.Namespace, layout: Layout) -> int:
    info = _client(layout).restore(
        str(xm_verbs.local_path(args.file, "restore").resolve()), paused=args.paused)
    _out(args, info, f"Restored domain {info['name']} (id={info['domid']})"
         + (", paused" if args.paused else ""))
    return 0


def _amount(verb: str) -> Any:
    def run(args: argparse.Namespace, layout: Layout) -> int:
        value = _mib(args.mem) if hasattr(args, "mem") else args.count
        _out(args, _client(layout).verb(args.dom, verb, {"value": value}))
        return 0
    return run


def do_block_attach(args: argparse.Namespace, layout: Layout) -> int:
    spec = f"{args.backend},{args.target},{args.mode}"
    _out(args, _client(layout).verb(args.dom, "block-attach", {"spec": spec}))
    return 0


def do_block_detach(args: argparse.Namespace, layout: Layout) -> int:
    _out(args, _client(layout).verb(args.dom, "block-detach", {"spec": args.target}))
    return 0


def do_network_attach(args: argparse.Namespace, layout: Layout) -> int:
    spec = ",".join(args.items)
    nic = _client(layout).verb(args.dom, "network-attach", {"spec": spec})
    for w in nic.get("warnings", []):
        print(f"sanvisor: warning: {w}", file=sys.stderr)
    _out(args, nic)
    return 0


def do_network_detach(args: argparse.Namespace, layout: Layout) -> int:
    _out(args, _client(layout).verb(args.dom, "network-detach", {"spec": args.devid}))
    return 0


def do_agent(args: argparse.Namespace, layout: Layout) -> int:
    from sanvisor.agent import daemon

    if args.action in ("start", "run"):
        from sanvisor.drivers.qemu.probe import forced_accel

        forced_accel()  # a bad SANVISOR_ACCEL is refused before anything starts
    if args.action == "run":
        return daemon.run_foreground(layout)
    if args.action == "start":
        pid = daemon.start_background(layout)
        facts = _client(layout).call("GET", "/v1/host/info")
        if facts.get("accelerator_warning"):
            print(f"sanvisor: warning: {facts['accelerator_warning']}", file=sys.stderr)
        _out(args, {"pid": pid, "socket": str(layout.socket),
                    "accelerator": facts.get("accelerator")},
             f"agent running (pid {pid}, accelerator {facts.get('accelerator')})")
        return 0
    if args.action == "stop":
        stopped = daemon.stop(layout)
        _out(args, {"stopped": stopped}, "agent stopped" if stopped else "no agent running")
        return 0
    running = daemon.agent_pid(layout)
    _out(args, {"pid": running, "running": running is not None},
         f"agent running (pid {running})" if running else "no agent running")
    return 0 if running else 3


def do_guest_kit(args: argparse.Namespace, layout: Layout) -> int:
    from sanvisor.guestkit import build_kit

    def say(msg: str) -> None:
        print(f"guest-kit: {msg}", file=sys.stderr)

    kit = build_kit(force=args.force, log=say)
    if args.json:
        print(json.dumps(kit.to_dict()))
    else:
        print(f"kernel: {kit.kernel}\ninitrd: {kit.initrd}")
    return 0


def do_array(args: argparse.Namespace, layout: Layout) -> int:
    from sanvisor.cli import array_verbs

    return array_verbs.run(args, layout.home)


def do_scsi(args: argparse.Namespace, layout: Layout) -> int:
    c = _client(layout)
    if args.scsi_cmd == "list":
        data = c.call("GET", "/v1/scsi")
        _out(args, data["paths"], data["text"])
    elif args.scsi_cmd == "rescan":
        data = c.call("POST", "/v1/scsi/rescan", {"hba": args.hba})
        text = "\n".join([f"added {x}" for x in data["added"]]
                         + [f"removed {x}" for x in data["removed"]]
                         + [f"warning: {x}" for x in data["errors"]])
        _out(args, data, text or None)
    else:
        data = c.call("POST", "/v1/scsi/add", {"host": args.h, "channel": args.c,
                                               "id": args.i, "lun": args.l})
        _out(args, data, f"{data['hctl']} {data['dev']}")
    return 0


def do_multipath(args: argparse.Namespace, layout: Layout) -> int:
    if args.flush or args.flush_all:
        name = args.flush.removeprefix("/dev/mapper/") if args.flush else None
        data = _client(layout).call("POST", "/v1/multipath/flush", {"name": name})
        lines = [f"{n}: removed" for n in data["removed"]]
        lines += [f"{n}: map in use by {', '.join(who)}" for n, who in data["in_use"].items()]
        _out(args, data, "\n".join(lines + [f"warning: {w}" for w in data["warnings"]])
             or None)
        return 1 if data["in_use"] else 0
    if args.action == "show":
        data = _client(layout).call("GET", "/v1/multipath")
        _out(args, data, data["ll"] or "no multipath devices (scsi rescan?)")
        return 0
    if args.file is None:
        raise UsageError("multipath push FILE")
    try:
        text = args.file.read_text()
    except OSError as exc:
        raise ConfigError(exc.strerror or "cannot read", file=str(args.file)) from None
    from sanvisor.pool.config import PoolConfig
    from sanvisor.pool.multipath import push_conf
    from sanvisor.storage.mpconf import parse_mpconf

    parse_mpconf(text, str(args.file))  # refuse a bad file before touching any host
    report = push_conf(PoolConfig.load(), text, str(args.file))
    text_out = "\n".join([f"pushed to {', '.join(report['hosts']) or 'no host'}"]
                          + [f"MISMATCH: {p}" for p in report["problems"]])
    _out(args, report, text_out)
    return 1 if report["problems"] else 0


def do_lab(args: argparse.Namespace, layout: Layout) -> int:
    from sanvisor.lab import topology

    root = topology.lab_root()
    if args.lab_cmd == "up":
        state = topology.up(args.hosts, name=args.name, root=root, loopback=args.loopback,
                            xen_hosts=args.xen_hosts)
        hosts = ", ".join(h.name for h in state.hosts)
        _out(args, {"root": str(root), "hosts": hosts}, f"lab {state.name} up at {root}: "
             f"array + {hosts}")
        return 0
    if args.lab_cmd == "down":
        gone = topology.down(root)
        _out(args, {"removed": gone}, "lab removed" if gone else "no lab")
        return 0
    if args.lab_cmd == "fault":
        topology.fault(root, args.lab_host, args.hba, up_=args.kind == "hba-up")
        link = "up" if args.kind == "hba-up" else "down"
        _out(args, {"host": args.lab_host, "hba": args.hba, "link": link},
             f"{args.lab_host}: HBA {args.hba} link {link}")
        return 0
    rows = topology.status(root)
    lines = [f"{'Host':<8} {'Driver':<6} {'Agent':<8} HBA {'WWPN':<24} {'Address':<14} "
             f"{'Link':<5} Target"]
    for h in rows:
        agent = str(h["agent"] or "down")
        hbas: list[dict[str, Any]] = h["hbas"]
        if not hbas:
            lines.append(f"{h['host']:<8} {h['driver']:<6} {agent:<8} {'-':>3}")
        for b in hbas:
            lines.append(f"{h['host']:<8} {h['driver']:<6} {agent:<8} {b['hba']:>3} "
                         f"{b['wwpn']:<24} {b['address']:<14} {b['link']:<5} {b['target']}")
    _out(args, rows, "\n".join(lines))
    return 0


def do_pool(args: argparse.Namespace, layout: Layout) -> int:
    from sanvisor.cli import pool_verbs

    return pool_verbs.run(args)


def do_demo(args: argparse.Namespace, layout: Layout) -> int:
    from sanvisor.lab import demo

    return demo.main(keep=args.keep, xen=args.xen, san=args.san)


HANDLERS: dict[str, Any] = {
    "demo": do_demo, "array": do_array, "lab": do_lab, "scsi": do_scsi,
    "multipath": do_multipath, "pool": do_pool,
    "create": do_create, "list": _read_only(["list"]), "pause": _simple("pause"),
    "unpause": _simple("unpause"), "save": do_save, "restore": do_restore,
    "migrate": do_migrate,
    "mem-set": _amount("mem-set"), "mem-max": _amount("mem-max"),
    "vcpu-set": _amount("vcpu-set"), "block-attach": do_block_attach,
    "block-detach": do_block_detach,
    "network-attach": do_network_attach, "network-detach": do_network_detach,
    "domid": _read_only(["domid", "name"]),
    "domname": _read_only(["domname", "domid"]), "uptime": _read_only(["uptime"]),
    "info": _read_only(["info"]), "agent": do_agent,
    "guest-kit": do_guest_kit,
}
HANDLERS.update(lvm_verbs.handlers())
HANDLERS.update(xm_verbs.handlers())  # new, start, vcpu-pin...; xm's shutdown -a, top


def dispatch(args: argparse.Namespace, layout: Layout) -> int:
    result: int = HANDLERS[args.verb](args, layout)
    return result
