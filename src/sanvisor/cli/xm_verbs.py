"""The rest of xm: managed domains (new, start, delete), vcpu-list, vcpu-pin,
sched-credit, dmesg, log, dump-core, sysrq, trigger, rename; and the xm forms of
shutdown/reboot (-a, -w), destroy -f, console --history, block-list and
network-list (xm's columns), top (xentop's flags)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sanvisor.api.client import AgentClient, _ref, quote
from sanvisor.cli import render
from sanvisor.errors import ConfigError, ConflictError, UsageError
from sanvisor.paths import Layout

DOM = "domain name, id or uuid"
VERBS = frozenset(("new", "start", "delete", "vcpu-list", "vcpu-pin", "sched-credit",
                   "dmesg", "log", "dump-core", "sysrq", "trigger", "rename"))

XM_VERBS_HELP = """\
managed domains, CPUs, diagnostics (xm-compatible):
  new [--autostart] FILE [KEY=VALUE ...]  register a domain (its config kept; nothing
                                          starts); list shows it with state ------
  start [-p] [-c] DOM [--host HOST]       start a registered domain
  delete DOM                              forget a registered domain (not running)
  vcpu-list [DOM] / vcpu-pin DOM VCPU CPUS  where vCPUs run / pin them (0-3,^2, all)
  sched-credit [-d DOM [-w WEIGHT] [-c CAP]]  CPU weight and cap
  dmesg [-c] / log [-n N]                 the hypervisor's (or agent's) messages /
                                          the agent's log
  dump-core DOM FILE / sysrq DOM KEY / trigger DOM nmi|reset|power / rename DOM NAME
"""


def _client(layout: Layout) -> AgentClient:
    return AgentClient(layout.socket)


def _out(args: argparse.Namespace, data: Any, text: str | None = None) -> None:
    if args.json:
        render.emit_json(data)
    elif text is not None:
        sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")


def add_parsers(verb: Any) -> None:
    nw = verb("new", "register a domain from an xm/xl config file (nothing starts)")
    auto = nw.add_mutually_exclusive_group()
    auto.add_argument("--autostart", dest="autostart", action="store_true", default=None,
                      help="start it whenever the agent starts (as xendomains did; also "
                      "on_xend_start='start' in the config)")
    auto.add_argument("--no-autostart", dest="autostart", action="store_false",
                      help="do not start it with the agent")
    nw.add_argument("config", help="config file (xl.cfg(5) syntax)")
    nw.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys")
    st = verb("start", "start a registered domain (see new)")
    st.add_argument("-p", "--paused", action="store_true", help="leave it paused")
    st.add_argument("-c", "--console", action="store_true", help="attach the console after")
    st.add_argument("--host", help="start it on HOST of the pool (its registration moves "
                    "there with it)")
    st.add_argument("dom", help="a registered domain's name")
    verb("delete", "forget a registered domain that does not run").add_argument(
        "dom", help="a registered domain's name")
    vl = verb("vcpu-list", "the vCPUs of a domain (of all without DOM): where they run")
    vl.add_argument("dom", nargs="?", help=DOM + " (default: every domain)")
    vp = verb("vcpu-pin", "pin a domain's vCPU(s) to host CPUs (kept across save, "
              "restore and migration)", "dom")
    vp.add_argument("vcpu", help="a vCPU number, or all")
    vp.add_argument("cpus", help="host CPUs: 2, 0-3, 0-3,^2, all")
    sc = verb("sched-credit", "show or set domains' CPU weight and cap")
    sc.add_argument("-d", "--domain", dest="dom", help=DOM)
    sc.add_argument("-w", "--weight", type=int, help="weight 1..65535 (default 256)")
    sc.add_argument("-c", "--cap", type=int, help="cap: percent of one CPU (0: none)")
    dm = verb("dmesg", "the hypervisor's messages (QEMU hosts: the agent's event log)")
    dm.add_argument("-c", "--clear", action="store_true", help="clear them after reading")
    lg = verb("log", "the agent's log")
    lg.add_argument("-n", "--lines", type=int, default=0, help="only the last N lines")
    dc = verb("dump-core", "write a domain's memory to FILE as a core file (ELF on QEMU); "
              "it runs on", "dom")
    dc.add_argument("file", help="the core file to write")
    verb("sysrq", "send a magic SysRq key to the guest", "dom").add_argument(
        "key", help="one letter or digit (s sync, u remount r/o, b reboot, h help)")
    verb("trigger", "send an NMI, a hard reset or the power button", "dom").add_argument(
        "what", choices=["nmi", "reset", "power"], help="nmi, reset or power")
    verb("rename", "rename a domain (its uuid, MACs and id are kept)", "dom").add_argument(
        "name", help="the new name")


def local_path(text: str, what: str) -> Path:
    """A file named on the command line, made absolute (the agent has another cwd); a
    NUL byte, which no path holds, is a usage error rather than Python's ValueError."""
    if "\0" in text:
        raise UsageError(f"{what}: {text!r} is not a path (a NUL byte)")
    return Path(text).absolute()


def read_config(path_text: str) -> tuple[str, Path]:
    """A config file's text (for create and new): its errors name the file."""
    path = local_path(path_text, "config")
    try:
        return path.read_text(encoding="utf-8"), path
    except FileNotFoundError:
        raise ConfigError("no such file", file=path_text) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not a text file ({exc.reason})", file=path_text) from None
    except OSError as exc:
        raise ConfigError(exc.strerror or "cannot read", file=path_text) from None


def do_new(args: argparse.Namespace, layout: Layout) -> int:
    text, path = read_config(args.config)
    data = _client(layout).call("POST", "/v1/managed", {
        "config": text, "config_file": str(path.absolute()), "overrides": args.overrides,
        "autostart": args.autostart})
    for w in data.pop("warnings", []):
        print(f"sanvisor: warning: {w.replace(str(path.absolute()), args.config)}",
              file=sys.stderr)
    _out(args, data)
    return 0


def do_start(args: argparse.Namespace, layout: Layout) -> int:
    client = _client(layout)
    if args.host:
        from sanvisor.cli.managed_move import start_on

        info = start_on(client, args.dom, args.host, paused=args.paused)
    else:
        info = client.call("POST", f"/v1/managed/{quote(args.dom)}/start",
                           {"paused": args.paused})
    _out(args, info, f"Started domain {info['name']} (id={info['domid']})"
         + (", paused" if args.paused else ""))
    if args.console:
        from sanvisor.cli.console import attach

        return attach(info["console_socket"], info["name"])
    return 0


def do_delete(args: argparse.Namespace, layout: Layout) -> int:
    _out(args, _client(layout).call("DELETE", f"/v1/managed/{quote(args.dom)}"))
    return 0


def vcpu_table(rows: list[dict[str, Any]]) -> str:
    """xm vcpu-list's table."""
    lines = [f"{'Name':<32} {'ID':>5} {'VCPU':>5} {'CPU':>5} {'State':>5} {'Time(s)':>9} "
             "CPU Affinity"]
    for r in rows:
        cpu = "-" if r["cpu"] is None else str(r["cpu"])
        lines.append(f"{r['name']:<32} {r['domid']:>5} {r['vcpu']:>5} {cpu:>5} "
                     f"{r['state']:>5} {r['seconds']:>9.1f} {r['affinity_text']}")
    return "\n".join(lines)


def do_vcpu_list(args: argparse.Namespace, layout: Layout) -> int:
    path = f"/v1/vcpu-list/{_ref(args.dom)}" if args.dom else "/v1/vcpu-list"
    rows = _client(layout).call("GET", path)
    _out(args, rows, vcpu_table(rows))
    return 0


def do_vcpu_pin(args: argparse.Namespace, layout: Layout) -> int:
    from sanvisor.model.cpulist import MAX_CPUS, parse_cpus

    if args.vcpu != "all" and not args.vcpu.isdigit():
        raise UsageError(f"vcpu-pin: vcpu: {args.vcpu!r} is not a vCPU number or all")
    try:  # the form here; whether the host has those CPUs, on the agent
        parse_cpus(args.cpus, MAX_CPUS)
    except ValueError as exc:
        raise UsageError(f"vcpu-pin: {exc}") from None
    rows = _client(layout).verb(args.dom, "vcpu-pin", {"vcpu": args.vcpu, "cpus": args.cpus})
    _out(args, rows)
    return 0


def credit_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'Name':<32} {'ID':>5} {'Weight':>6} {'Cap':>4}"]
    lines += [f"{r['name']:<32} {r['domid']:>5} {r['weight']:>6} {r['cap']:>4}" for r in rows]
    return "\n".join(lines)


def do_sched_credit(args: argparse.Namespace, layout: Layout) -> int:
    client = _client(layout)
    setting = args.weight is not None or args.cap is not None
    if args.dom is None:
        if setting:
            raise UsageError("sched-credit: -w and -c need -d DOM")
        rows = client.call("GET", "/v1/sched-credit")
    else:
        rows = client.verb(args.dom, "sched-credit", {"weight": args.weight, "cap": args.cap})
    _out(args, rows, None if setting else credit_table(rows))
    return 0


def do_dmesg(args: argparse.Namespace, layout: Layout) -> int:
    data = _client(layout).call("POST", "/v1/dmesg", {"clear": args.clear})
    _out(args, data, data["text"])
    return 0


def do_log(args: argparse.Namespace, layout: Layout) -> int:
    if args.lines < 0:
        raise UsageError(f"log: lines: {args.lines} is negative")
    data = _client(layout).call("GET", f"/v1/log?lines={args.lines}")
    _out(args, data, data["text"])
    return 0


def do_dump_core(args: argparse.Namespace, layout: Layout) -> int:
    path = str(local_path(args.file, "dump-core"))
    if not args.json:
        print(f"Dumping core of domain: {args.dom} ...", flush=True)
    _out(args, _client(layout).verb(args.dom, "dump-core", {"path": path}))
    return 0


def _keyed(verb: str, attr: str) -> Any:
    def run(args: argparse.Namespace, layout: Layout) -> int:
        _out(args, _client(layout).verb(args.dom, verb, {"key": getattr(args, attr)}))
        return 0
    return run


def do_rename(args: argparse.Namespace, layout: Layout) -> int:
    _out(args, _client(layout).verb(args.dom, "rename", {"name": args.name}))
    return 0


# ---- xm's forms of the core verbs ------------------------------------------------------
def _power(verb: str) -> Any:
    """shutdown/reboot [-a] [-w] [-t SEC] [DOM]: -a is every domain of the host."""
    def run(args: argparse.Namespace, layout: Layout) -> int:
        client = _client(layout)
        if args.all == (args.dom is not None):
            raise UsageError(f"{verb}: give a domain, or -a for all of them")
        body = {"wait": args.wait, "timeout": args.timeout}
        if not args.all:
            _out(args, client.verb(args.dom, verb, body))
            return 0
        rows = client.call("POST", "/v1/all", {"verb": verb, **body})
        failed = [r for r in rows if r.get("error")]
        for r in failed:  # the error names the domain already
            print(f"sanvisor: error: {r['error']}", file=sys.stderr)
        _out(args, rows)
        return 1 if failed else 0
    return run


def do_destroy(args: argparse.Namespace, layout: Layout) -> int:
    if args.dom in ("0", "Domain-0", "00000000-0000-0000-0000-000000000000"):
        raise ConflictError("destroy: Domain-0 is this host; sanvisor never destroys it "
                            "(xl's destroy -f of domain 0 is for a disaggregated toolstack)")
    _out(args, _client(layout).call("DELETE", f"/v1/domains/{_ref(args.dom)}"))
    return 0


def do_console(args: argparse.Namespace, layout: Layout) -> int:
    client = _client(layout)
    if args.history:
        if args.lines < 0:
            raise UsageError(f"console: lines: {args.lines} is negative")
        data = client.call("GET", f"/v1/console-log/{_ref(args.dom)}?lines={args.lines}")
        _out(args, data, data["text"])
        return 0
    from sanvisor.cli.console import attach

    info = client.info(args.dom)
    return attach(info["console_socket"], info["name"])


def block_table(rows: list[dict[str, Any]]) -> str:
    """xm/xl block-list's columns."""
    lines = [f"{'Vdev':<5} {'BE':<3} {'handle':<6} {'state':<5} {'evt-ch':<6} "
             f"{'ring-ref':<8} BE-path"]
    lines += [f"{r['vdev']!s:<5} {r['be']!s:<3} {r['handle']!s:<6} {r['state']!s:<5} "
              f"{r['evtch']!s:<6} {r['ring_ref']!s:<8} {r['be_path']}" for r in rows]
    return "\n".join(lines)


def network_table(rows: list[dict[str, Any]]) -> str:
    """xm/xl network-list's columns."""
    lines = [f"{'Idx':<3} {'BE':<2} {'Mac Addr.':<17} {'handle':<6} {'state':<5} "
             f"{'evt-ch':<6} {'tx-/rx-ring-ref':<15} BE-path"]
    lines += [f"{r['idx']!s:<3} {r['be']!s:<2} {r['mac']:<17} {r['handle']!s:>6} "
              f"{r['state']!s:>5} {r['evtch']!s:>6} {r['ring_ref']!s:<15} {r['be_path']}"
              for r in rows]
    return "\n".join(lines)


def _devices(kind: str) -> Any:
    def run(args: argparse.Namespace, layout: Layout) -> int:
        rows = _client(layout).call("GET", f"/v1/{kind}-list/{_ref(args.dom)}")
        _out(args, rows, block_table(rows) if kind == "block" else network_table(rows))
        return 0
    return run


def do_top(args: argparse.Namespace, layout: Layout) -> int:
    from sanvisor.cli import top

    if args.delay <= 0 or args.iterations < 0:
        raise UsageError("top: -d needs a positive delay and -i a count >= 0")
    view = top.View(full_names=args.full_names, vbds=args.vbds, networks=args.networks,
                    repeat_header=args.repeat_header)
    return top.run(_client(layout).stats, batch=args.batch, iterations=args.iterations,
                   delay=args.delay, as_json=args.json, view=view)


def handlers() -> dict[str, Any]:
    return {"new": do_new, "start": do_start, "delete": do_delete,
            "vcpu-list": do_vcpu_list, "vcpu-pin": do_vcpu_pin,
            "sched-credit": do_sched_credit, "dmesg": do_dmesg, "log": do_log,
            "dump-core": do_dump_core, "sysrq": _keyed("sysrq", "key"),
            "trigger": _keyed("trigger", "what"), "rename": do_rename,
            "shutdown": _power("shutdown"), "reboot": _power("reboot"),
            "destroy": do_destroy, "console": do_console,
            "block-list": _devices("block"), "network-list": _devices("network"),
            "top": do_top}
