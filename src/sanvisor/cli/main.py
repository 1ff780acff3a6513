"""sanvisor's command line: the xm verbs, plus agent and guest-kit management."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from sanvisor.errors import SanvisorError

DOMAIN_VERBS_HELP = """\
domain verbs (xm-compatible):
  create [-c] [-p] FILE [KEY=VALUE ...]   start a domain from an xm/xl config file
  list [-l] [DOM ...]                     list domains (Name ID Mem VCPUs State Time(s))
  pause DOM / unpause DOM                 freeze / thaw a domain
  save DOM FILE / restore [-p] FILE       save a domain's state to a file and stop it;
                                          bring it back where it was
  console DOM                             attach to the serial console (Ctrl-] detaches)
  top [-b] [-n N] [-d SEC]                live CPU/memory/vCPU/block/network per domain
  shutdown [-w] [-t SEC] DOM              clean poweroff (ACPI power button)
  reboot DOM                              clean reboot (Ctrl-Alt-Del to the guest)
  destroy DOM                             stop at once (pull the plug)
  mem-set DOM MEM / mem-max DOM MEM       balloon target / ceiling (256, 256m, 1g)
  vcpu-set DOM N                          hot-plug or unplug vCPUs up to maxvcpus
  block-attach DOM phy:PATH TARGET MODE   hot-add a disk (e.g. phy:/dev/sdb sdc w)
  block-detach DOM TARGET                 hot-remove a disk
  block-list DOM                          the disks of a domain
  network-attach DOM [KEY=VALUE ...]      hot-add a NIC (mac=, bridge=, ip=, model=)
  network-detach DOM DEVID|MAC            hot-remove a NIC
  network-list DOM                        the NICs of a domain
  migrate [-l] DOM HOST                   move a running domain to HOST (Xen: xl migrate)
  domid NAME / domname ID / uptime [DOM] / info
DOM is a domain name, id or uuid. Every verb takes --json.
"""


class _Skip:
    """Stands in for the parsers of verbs not on this command line: building all of
    argparse's ~40 subparsers costs ~13 ms, paid by every CLI call otherwise."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: self


VERBS = frozenset((
    "create", "list", "pause", "unpause", "reboot", "destroy", "console", "block-list",
    "network-list", "shutdown", "save", "restore", "mem-set", "mem-max", "vcpu-set",
    "block-attach", "block-detach", "network-attach", "network-detach", "domid", "domname",
    "migrate",
    "uptime", "info", "top", "agent", "guest-kit", "array", "scsi", "multipath", "lab", "demo",
))


def _verb_in(argv: list[str]) -> str | None:
    """The verb of a command line, when it can be told without argparse."""
    if any(a in ("-h", "--help") for a in argv):
        return None
    it = iter(argv)
    for a in it:
        if a in ("--home", "-H"):
            next(it, None)
        elif not a.startswith("-"):
            return a if a in VERBS else None
    return None


def _parser(only: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sanvisor", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The xm experience over QEMU/Xen hosts on shared SAN storage.",
        epilog=DOMAIN_VERBS_HELP)
    p.add_argument("--home", type=Path, help="agent state directory "
                   "(default $SANVISOR_HOME, /var/lib/sanvisor as root)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-H", dest="on_host", metavar="HOST",
                   help="run the command as lab host HOST (e.g. host1)")
    sub = p.add_subparsers(dest="verb", metavar="VERB")

    def verb(name: str, help_: str, *doms: str) -> Any:
        if only is not None and name != only:
            return _Skip()
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
        for d in doms:
            sp.add_argument(d, help="domain name, id or uuid" if d == "dom" else None)
        return sp

    c = verb("create", "start a domain from an xm/xl config file")
    c.add_argument("-c", "--console", action="store_true", help="attach the console after")
    c.add_argument("-p", "--paused", action="store_true", help="leave the domain paused")
    c.add_argument("-n", "--dry-run", action="store_true", help="parse and print, start nothing")
    c.add_argument("config", help="config file (xl.cfg(5) syntax)")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys")
    ls = verb("list", "list domains")
    ls.add_argument("-l", "--long", action="store_true", help="full details (JSON)")
    ls.add_argument("doms", nargs="*", metavar="DOM")
    for name, text in [("pause", "freeze a domain"), ("unpause", "thaw a paused domain"),
                       ("reboot", "clean reboot of the guest"),
                       ("destroy", "stop a domain at once"), ("console", "attach to the console"),
                       ("block-list", "list a domain's disks"),
                       ("network-list", "list a domain's NICs")]:
        verb(name, text, "dom")
    sd = verb("shutdown", "clean poweroff of the guest", "dom")
    sd.add_argument("-w", "--wait", action="store_true", help="wait until it is down")
    sd.add_argument("-t", "--timeout", type=float, default=60.0, help="seconds to wait (-w)")
    sv = verb("save", "save a domain's state to FILE and stop it", "dom")
    sv.add_argument("file")
    mg = verb("migrate", "move a running domain to another host (Xen: xl migrate)", "dom")
    mg.add_argument("-l", "--live", action="store_true",
                    help="live (xl migrate); without: stop, copy, restart (xl save/restore)")
    mg.add_argument("host", help="the target host: a lab host name or an agent home")
    rs = verb("restore", "restore a domain from a save file")
    rs.add_argument("-p", "--paused", action="store_true", help="leave it paused")
    rs.add_argument("file")
    for name, text in [("mem-set", "set the memory target (balloon; hot-plug up to maxmem)"),
                       ("mem-max", "set the memory ceiling")]:
        verb(name, text, "dom").add_argument("mem", help="amount: 256, 256m, 1g")
    verb("vcpu-set", "set the number of online vCPUs", "dom").add_argument("count", type=int)
    ba = verb("block-attach", "hot-add a disk", "dom")
    ba.add_argument("backend", help="phy:PATH or file:PATH")
    ba.add_argument("target", help="guest-side name, e.g. sdc")
    ba.add_argument("mode", nargs="?", default="w", help="r or w")
    verb("block-detach", "hot-remove a disk", "dom").add_argument("target")
    na = verb("network-attach", "hot-add a NIC", "dom")
    na.add_argument("items", nargs="*", metavar="KEY=VALUE", help="mac=, bridge=, ip=, model=")
    verb("network-detach", "hot-remove a NIC", "dom").add_argument("devid", help="index or MAC")
    verb("domid", "print a domain's id").add_argument("name")
    verb("domname", "print a domain's name").add_argument("domid")
    verb("uptime", "how long domains have run").add_argument("doms", nargs="*", metavar="DOM")
    verb("info", "facts about this host")
    tp = verb("top", "live per-domain resource use")
    tp.add_argument("-b", "--batch", action="store_true", help="plain text, for scripts")
    tp.add_argument("-n", "--iterations", type=int, default=0, help="frames (0 = forever)")
    tp.add_argument("-d", "--delay", type=float, default=1.0, help="seconds between frames")
    ag = verb("agent", "run or control this host's agent")
    ag.add_argument("action", choices=["run", "start", "stop", "status"])
    from sanvisor.cli import array_verbs

    if only in (None, "array"):
        array_verbs.add_parser(sub)
    sc = verb("scsi", "the SCSI paths this host sees on the SAN")
    ssub = sc.add_subparsers(dest="scsi_cmd", metavar="ACTION", required=True)
    ssub.add_parser("list", help="the /proc/scsi/scsi view")
    rsc = ssub.add_parser("rescan", help="ask the fabric(s) again (issue_lip)")
    rsc.add_argument("hba", nargs="?", type=int, help="only this HBA (scsi host number)")
    sad = ssub.add_parser("add", help="probe one LUN: scsiadd H C I L")
    for k in ("h", "c", "i", "l"):
        sad.add_argument(k, type=int)
    mp = verb("multipath", "multipath maps: -ll, and one multipath.conf for the pool")
    mp.add_argument("-ll", dest="ll", action="store_true", help="show maps and paths (default)")
    mp.add_argument("action", nargs="?", choices=["show", "push"], default="show",
                    help="push FILE: install FILE on every host of the lab and compare names")
    mp.add_argument("file", nargs="?", type=Path)
    lab = verb("lab", "the one-machine SAN lab: array, fabrics, hosts")
    lsub = lab.add_subparsers(dest="lab_cmd", metavar="ACTION", required=True)
    lu = lsub.add_parser("up", help="build the lab: an array and N hosts with two HBAs each")
    lu.add_argument("--hosts", type=int, default=2)
    lu.add_argument("--name", default="sv", help="namespace prefix (default sv)")
    lu.add_argument("--xen-hosts", type=int, default=0,
                    help="also boot N nested Xen 4.17 hosts (xen1..), driven through xl")
    lu.add_argument("--loopback", action="store_true",
                    help="no namespaces: hosts and fabrics on loopback addresses (the "
                    "default when not root)")
    lsub.add_parser("down", help="remove the lab entirely (also after a crash)")
    lsub.add_parser("status", help="hosts, HBAs, WWPNs, addresses")
    lf = lsub.add_parser("fault", help="inject a fault: hba-down/hba-up HOST N")
    lf.add_argument("kind", choices=["hba-down", "hba-up"])
    lf.add_argument("lab_host", metavar="HOST")
    lf.add_argument("hba", type=int)
    dm = verb("demo", "run the seed's xm session on a real guest, then clean up")
    dm.add_argument("--keep", action="store_true", help="keep the demo's files in /tmp")
    dm.add_argument("--no-xen", dest="xen", action="store_false",
                    help="skip act 2 (two nested Xen hosts, ~1.5 min, ~8 GB of RAM)")
    gk = verb("guest-kit", "build the tiny Linux guest used by default")
    gk.add_argument("action", choices=["build"])
    gk.add_argument("--force", action="store_true", help="rebuild even if cached")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser(only=_verb_in(argv))
    args = parser.parse_args(argv)
    if not args.verb:
        parser.print_help()
        return 2
    from sanvisor.paths import Layout, default_home

    home = args.home or default_home()
    if args.on_host:
        from sanvisor.lab.topology import lab_root

        home = lab_root() / args.on_host
        if not (home / "host.json").exists():
            print(f"sanvisor: error: no lab host {args.on_host!r} at {home.parent}",
                  file=sys.stderr)
            return 1
    layout = Layout(home)
    if args.home or args.on_host:
        os.environ["SANVISOR_HOME"] = str(home)
    try:
        from sanvisor.cli import verbs

        return verbs.dispatch(args, layout)
    except SanvisorError as exc:
        print(f"sanvisor: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0

