"""The command line's grammar: every verb, its options and positional arguments.

Only the parser of the verb on the command line is built (argparse takes ~13 ms to
build all of them, paid by every call otherwise); ``--help`` builds them all.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sanvisor.cli import lvm_verbs, xm_verbs

DOM = "domain name, id or uuid"
GLOBALS_EPILOG = ("global options, anywhere on the line: --json (machine-readable "
                  "output), -H HOST (run as lab host HOST), --home DIR (agent state "
                  "directory)")

DOMAIN_VERBS_HELP = """\
domain verbs (xm-compatible):
  create [-c] [-p] [-n] FILE [KEY=VALUE ...]  start a domain from an xm/xl config file
                                          (-n: check everything, print what would run)
  list [-l] [DOM ...]                     list domains (Name ID Mem VCPUs State Time(s));
                                          -l: xm's SXP
  pause DOM / unpause DOM                 freeze / thaw a domain
  save DOM FILE / restore [-p] FILE       save a domain's state to a file and stop it;
                                          bring it back where it was
  console [--history [-n N]] DOM          attach to the serial console (Ctrl-] detaches);
                                          --history: what it printed so far
  top [-b] [-i N] [-d SEC] [-f] [-x]      xentop: CPU/memory/vCPUs/network per domain
  shutdown [-a] [-w] [-t SEC] [DOM]       clean poweroff (the ACPI power button); -a all
  reboot [-a] [-w] [-t SEC] [DOM]         clean reboot (the power button, then powered
                                          on again by the agent, under a new id)
  destroy [-f] DOM                        stop at once (pull the plug)
  mem-set DOM MEM / mem-max DOM MEM       balloon target / ceiling (256, 256m, 1g)
  vcpu-set DOM N                          vCPUs online in the guest, up to maxvcpus
  block-attach DOM BACKEND TARGET [MODE]  hot-add a disk (e.g. phy:/dev/sdb sdc w)
  block-detach DOM TARGET                 hot-remove a disk
  block-list DOM                          the disks of a domain
  network-attach DOM [KEY=VALUE ...]      hot-add a NIC (mac=, bridge=, ip=, model=)
  network-detach DOM DEVID|MAC            hot-remove a NIC
  network-list DOM                        the NICs of a domain
  migrate [-l] DOM HOST                   move a domain to HOST of the pool (-l: live)
  domid NAME / domname ID / uptime [DOM ...] / info
DOM is a domain name, id or uuid (Domain-0 is the host). Every verb takes --json.
"""

VERBS = frozenset((
    "create", "list", "pause", "unpause", "reboot", "destroy", "console", "block-list",
    "network-list", "shutdown", "save", "restore", "mem-set", "mem-max", "vcpu-set",
    "block-attach", "block-detach", "network-attach", "network-detach", "domid", "domname",
    "migrate", "uptime", "info", "top", "agent", "guest-kit", "array", "scsi", "multipath",
    "lab", "demo", "pool",
)) | lvm_verbs.VERBS | xm_verbs.VERBS


class _Skip:
    """Stands in for the parsers of verbs not on this command line."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: self


def _parser_class(innermost: list[argparse.ArgumentParser]) -> type[argparse.ArgumentParser]:
    class VerbParser(argparse.ArgumentParser):
        """Remembers the innermost (sub)parser left with unknown arguments, so that an
        unknown option prints that verb's usage, not the top-level one."""

        def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
            ns, extras = super().parse_known_args(args, namespace)
            for action in self._actions:  # Python 3.11: `VERB -- --` gives a value []
                if (not action.option_strings and action.nargs in (None, "?")
                        and isinstance(getattr(ns, action.dest, None), list)):
                    self.error(f"{action.metavar or action.dest}: missing ('--' is not "
                               "a value)")
            if extras and not innermost:
                innermost.append(self)
            return ns, extras

    return VerbParser


def build_parser(only: str | None = None
                 ) -> tuple[argparse.ArgumentParser, list[argparse.ArgumentParser]]:
    innermost: list[argparse.ArgumentParser] = []
    cls = _parser_class(innermost)
    p = cls(prog="sanvisor", formatter_class=argparse.RawDescriptionHelpFormatter,
            description="The xm experience over QEMU/Xen hosts on shared SAN storage.",
            epilog=DOMAIN_VERBS_HELP + "\n" + xm_verbs.XM_VERBS_HELP + "\n"
            + lvm_verbs.VOLUME_VERBS_HELP + "\n" + GLOBALS_EPILOG)
    p.add_argument("--home", type=Path, help="agent state directory "
                   "(default $SANVISOR_HOME, /var/lib/sanvisor as root)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-H", dest="on_host", metavar="HOST",
                   help="run the command as lab host HOST (e.g. host1)")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="verb", metavar="VERB", parser_class=cls)

    def verb(name: str, help_: str, *doms: str) -> Any:
        if only is not None and name != only:
            return _Skip()
        sp = sub.add_parser(name, help=help_, description=help_, epilog=GLOBALS_EPILOG)
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
        for d in doms:
            sp.add_argument(d, help=DOM)
        return sp

    _domain_verbs(verb)
    xm_verbs.add_parsers(verb)
    _host_verbs(verb, sub, only)
    return p, innermost


def _domain_verbs(verb: Any) -> None:
    c = verb("create", "start a domain from an xm/xl config file")
    c.add_argument("-c", "--console", action="store_true", help="attach the console after")
    c.add_argument("-p", "--paused", action="store_true", help="leave the domain paused")
    c.add_argument("-n", "--dry-run", action="store_true",
                   help="run every check create runs and print the domain that would "
                   "start (xm's SXP; --json: the resolved record); start nothing")
    c.add_argument("config", help="config file (xl.cfg(5) syntax)")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override config keys")
    ls = verb("list", "list domains")
    ls.add_argument("-l", "--long", action="store_true",
                    help="full details, in xm's SXP (--json: the records)")
    ls.add_argument("--pool", action="store_true",
                    help="every host of the pool, with a Host column")
    ls.add_argument("doms", nargs="*", metavar="DOM", help=DOM)
    for name, text in [("pause", "freeze a domain's vCPUs"),
                       ("unpause", "thaw a paused domain"),
                       ("block-list", "a domain's disks, in xm's columns (--json: all)"),
                       ("network-list", "a domain's NICs, in xm's columns (--json: all, "
                        "bridges included)")]:
        verb(name, text, "dom")
    ds = verb("destroy", "stop a domain at once (pull the plug)", "dom")
    ds.add_argument("-f", "--force", action="store_true",
                    help="accepted as xl's; destroy is always immediate, and Domain-0 "
                    "(the host) is never destroyed")
    co = verb("console", "attach to the serial console (Ctrl-] detaches)", "dom")
    co.add_argument("--history", action="store_true",
                    help="print what the console showed so far (its log) and exit")
    co.add_argument("-n", "--lines", type=int, default=0,
                    help="with --history: only the last N lines")
    for name, text, wait in (
            ("shutdown", "clean poweroff of the guest (the ACPI power button)",
             "until it is down"),
            ("reboot", "clean reboot: the ACPI power button, then the agent powers the "
             "guest on again (a new domain id)", "until it is back")):
        sd = verb(name, text)
        sd.add_argument("-a", "--all", action="store_true",
                        help=f"every domain of this host ({name} them all at once)")
        sd.add_argument("-w", "--wait", action="store_true", help=f"wait {wait}")
        sd.add_argument("-t", "--timeout", type=float, default=60.0,
                        help="seconds to wait with -w (default 60)")
        sd.add_argument("dom", nargs="?", help=DOM + " (or -a)")
    sv = verb("save", "save a domain's state to FILE and stop it", "dom")
    sv.add_argument("file", help="the save file to write (must not be a directory)")
    mg = verb("migrate", "move a domain to another host of the pool", "dom")
    mg.add_argument("-l", "--live", action="store_true",
                    help="live: the guest runs while its memory is copied (QEMU pre-copy, "
                    "then post-copy; xl migrate); without: paused, moved, resumed")
    mg.add_argument("host", help="the target: a host of the pool, or an agent's home")
    mg.add_argument("--bandwidth", type=int, metavar="MIB", default=None,
                    help="cap the stream at MIB MiB/s (default: uncapped)")
    mg.add_argument("--max-downtime", type=int, metavar="MS", default=None,
                    help="the first allowed pause in ms (then raised step by step)")
    mg.add_argument("--no-postcopy", action="store_true",
                    help="never switch to post-copy (give up instead, at --timeout)")
    mg.add_argument("--timeout", type=float, metavar="SEC", default=None,
                    help="give up after SEC seconds: the guest runs on here (default 120)")
    rs = verb("restore", "restore a domain from a save file")
    rs.add_argument("-p", "--paused", action="store_true", help="leave it paused")
    rs.add_argument("file", help="a save file written by 'save'")
    for name, text in [("mem-set", "set the memory target (balloon; hot-plug up to maxmem)"),
                       ("mem-max", "set the memory ceiling")]:
        verb(name, text, "dom").add_argument("mem", help="amount: 256, 256m, 1g (MiB "
                                             "by default)")
    verb("vcpu-set", "set the number of online vCPUs", "dom").add_argument(
        "count", type=int, help="vCPUs online, 1..maxvcpus")
    ba = verb("block-attach", "hot-add a disk", "dom")
    ba.add_argument("backend", help="phy:PATH, file:PATH or nbd:HOST PORT")
    ba.add_argument("target", help="guest-side name, e.g. sdc or xvdb")
    ba.add_argument("mode", nargs="?", default="w", help="r or w (default w)")
    verb("block-detach", "hot-remove a disk", "dom").add_argument(
        "target", help="guest-side name, e.g. sdc")
    na = verb("network-attach", "hot-add a NIC", "dom")
    na.add_argument("items", nargs="*", metavar="KEY=VALUE",
                    help="mac=, bridge=, ip=, gateway=, model=, type= (as in vif=)")
    verb("network-detach", "hot-remove a NIC", "dom").add_argument(
        "devid", help="the NIC's index (network-list's Idx) or its MAC")
    verb("domid", "print a domain's id").add_argument("name", help="domain name or uuid")
    verb("domname", "print a domain's name").add_argument("domid", help="domain id")
    verb("uptime", "how long domains have run").add_argument(
        "doms", nargs="*", metavar="DOM", help=DOM + " (default: all)")
    verb("info", "facts about this host: memory, CPUs, driver, accelerator")
    tp = verb("top", "live per-domain resource use, as xentop (keys: q quit, D delay, "
              "S sort column, N C M T V sort by name, CPU%%, memory, CPU time, vCPUs)")
    tp.add_argument("-b", "--batch", action="store_true", help="plain text, for scripts")
    tp.add_argument("-i", "--iterations", "-n", type=int, default=0,
                    help="frames, then exit (0 = forever; -n N is the same)")
    tp.add_argument("-d", "--delay", type=float, default=1.0, help="seconds between frames")
    tp.add_argument("-f", "--full-name", dest="full_names", action="store_true",
                    help="whole domain names (default: cut at 10 characters)")
    tp.add_argument("-x", "--vbds", action="store_true",
                    help="a line of disk counters under each domain")
    tp.add_argument("--networks", action="store_true",
                    help="a line of network counters under each domain (xentop's -n)")
    tp.add_argument("-r", "--repeat-header", action="store_true",
                    help="repeat the column header every 10 domains")


def _host_verbs(verb: Any, sub: Any, only: str | None) -> None:
    ag = verb("agent", "run or control this host's agent")
    ag.add_argument("action", choices=["run", "start", "stop", "status"],
                    help="run (foreground), start (background), stop, status")
    ag.epilog = ("read by the agent at start: SANVISOR_ENGINE=PATH (the data-path engine; "
                 "default build/engine/sanvisor-engine, made by scripts/setup.sh: the agent "
                 "does not start without it), SANVISOR_ENGINE_WATCHDOG=SECONDS (an engine "
                 "that does not answer a ping within this is killed and restarted; default "
                 "2, 0: off), SANVISOR_MIGRATE_TIMEOUT=SECONDS (a migration's transfer is "
                 "given up after this; default 600), SANVISOR_MIGRATE_EXPIRY=SECONDS (an "
                 "incoming migration neither finished nor aborted this long after it was "
                 "prepared is removed; default the timeout + 60; docs/migration.md), "
                 "SANVISOR_QEMU=PATH (the guests' QEMU; default build/qemu's, fetched by "
                 "scripts/setup.sh where the system's is 7.2, else the system's). "
                 + GLOBALS_EPILOG)
    from sanvisor.cli import array_verbs

    if only in (None, "array"):
        array_verbs.add_parser(sub)
    lvm_verbs.add_parsers(verb)
    sc = verb("scsi", "the SCSI paths this host sees on the SAN")
    ssub = sc.add_subparsers(dest="scsi_cmd", metavar="ACTION", required=True)
    ssub.add_parser("list", help="the /proc/scsi/scsi view")
    rsc = ssub.add_parser("rescan", help="ask the fabric(s) again (issue_lip)")
    rsc.add_argument("hba", nargs="?", type=int, help="only this HBA (scsi host number)")
    sad = ssub.add_parser("add", help="probe one LUN: scsiadd H C I L")
    for k, what in (("h", "host (HBA)"), ("c", "channel"), ("i", "target id"),
                    ("l", "LUN")):
        sad.add_argument(k, type=int, help=what)
    mp = verb("multipath", "multipath maps: -ll, -f MAP (remove one), and one multipath.conf "
              "for the pool")
    mp.add_argument("-ll", dest="ll", action="store_true", help="show maps and paths (default)")
    mp.add_argument("-f", dest="flush", metavar="MAP", help="remove the map MAP (refused while "
                    "a guest, a mount or an active LV holds it); back at the next scsi "
                    "rescan or multipath push")
    mp.add_argument("-F", dest="flush_all", action="store_true",
                    help="remove every map nothing holds; name the others")
    mp.add_argument("action", nargs="?", choices=["show", "push"], default="show",
                    help="show (default), or push FILE: install FILE on every host of the "
                    "lab and compare names")
    mp.add_argument("file", nargs="?", type=Path, help="the multipath.conf to push")
    from sanvisor.cli import pool_verbs

    pool_verbs.add_parser(verb)
    lab = verb("lab", "the one-machine SAN lab: array, fabrics, hosts")
    lsub = lab.add_subparsers(dest="lab_cmd", metavar="ACTION", required=True)
    lu = lsub.add_parser("up", help="build the lab: an array and N hosts with two HBAs each")
    lu.add_argument("--hosts", type=int, default=2, help="QEMU hosts (default 2)")
    lu.add_argument("--name", default="sv", help="namespace prefix (default sv)")
    lu.add_argument("--xen-hosts", type=int, default=0,
                    help="also boot N nested Xen 4.17 hosts (xen1..), driven through xl")
    lu.add_argument("--loopback", action="store_true",
                    help="no namespaces: hosts and fabrics on loopback addresses (the "
                    "default when not root)")
    lsub.add_parser("down", help="remove the lab entirely (also after a crash)")
    lsub.add_parser("status", help="hosts, their agents, HBAs, WWPNs, addresses, links")
    lf = lsub.add_parser("fault", help="inject a fault: hba-down/hba-up HOST N")
    lf.add_argument("kind", choices=["hba-down", "hba-up"], help="the fault")
    lf.add_argument("lab_host", metavar="HOST", help="a lab host, e.g. host1")
    lf.add_argument("hba", type=int, help="the HBA's number (0 or 1)")
    dm = verb("demo", "run the seed's xm session on real guests, then clean up")
    dm.add_argument("--keep", action="store_true", help="keep the demo's files in /tmp")
    dm.add_argument("--no-san", dest="san", action="store_false",
                    help="skip act 2 (the SAN lab: multipath, a live migration)")
    dm.add_argument("--no-xen", dest="xen", action="store_false",
                    help="skip act 3 (two nested Xen hosts, ~1.5 min, ~8 GB of RAM)")
    gk = verb("guest-kit", "build the tiny Linux guest used by default")
    gk.add_argument("action", choices=["build"], help="build (or find) the kit")
    gk.add_argument("--force", action="store_true", help="rebuild even if cached")
