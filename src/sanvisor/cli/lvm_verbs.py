"""The LVM verbs, with lvm2's names, options and output: pvcreate, vgcreate, lvcreate,
lvs... (docs/volumes.md). Each runs on the agent of the host named by -H (every host
of the pool sees the same VGs); the agent answers lvm2's messages, its warnings
(printed on stderr, never dropped) and, for pvs/vgs/lvs, rows rendered here.
"""

from __future__ import annotations

import argparse
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from sanvisor.paths import Layout

VERBS = frozenset(("pvcreate", "pvremove", "vgcreate", "vgextend", "vgreduce", "vgremove",
                   "vgrename", "vgck", "lvcreate", "lvextend", "lvreduce", "lvresize",
                   "lvrename", "lvremove", "lvconvert", "lvchange", "pvs", "vgs", "lvs",
                   "backup"))
VOLUME_VERBS_HELP = """\
volume verbs (LVM2's commands, on LUNs shared by the pool; run as any host with -H):
  pvcreate DEV... / pvremove DEV...       make (unmake) a PV: a multipath map or a device
  vgcreate VG DEV... / vgextend / vgreduce / vgremove / vgrename / vgck
  lvcreate -n LV -L SIZE|-l N[%FREE] VG   a logical volume (-s ... VG/LV: a snapshot)
  lvextend|lvreduce|lvresize -L [+|-]SIZE VG/LV, lvrename, lvremove, lvconvert --merge
  lvchange -ay|-an [--handover HOST] VG/LV  open for writing on this host (one at a time)
  pvs / vgs / lvs [-o FIELDS] [--reportformat json] [--units U]
  backup DOM TARGET --to FILE             copy a running guest's LV from a snapshot
"""
_DEV = "a device: a multipath map (/dev/mapper/NAME or NAME) or a block device/file path"
_LV = "a logical volume: VG/LV, /dev/VG/LV or /dev/mapper/VG-LV"


def add_parsers(verb: Any) -> None:
    def lvm(name: str, text: str) -> Any:
        p = verb(name, text)
        p.add_argument("--devices", type=lambda s: [x for x in s.split(",") if x],
                       default=[], help="also use these devices (comma-separated paths)")
        return p

    for name, text in (("pvcreate", "initialise devices as physical volumes"),
                       ("pvremove", "wipe the PV label of devices")):
        p = lvm(name, text)
        p.add_argument("-f", "--force", action="count", default=0,
                       help="overwrite what the device holds (-ff: even a VG's PV)")
        p.add_argument("-y", "--yes", action="store_true", help="answer yes (the default)")
        if name == "pvcreate":
            _copies(p)
        p.add_argument("pvs", nargs="+", metavar="DEV", help=_DEV)
    for name, text in (("vgcreate", "create a volume group on PVs (devices become PVs)"),
                       ("vgextend", "add PVs to a volume group")):
        p = lvm(name, text)
        if name == "vgcreate":
            p.add_argument("-s", "--physicalextentsize", dest="extent_size", default="4m",
                           help="extent size (default 4m)")
        p.add_argument("-f", "--force", action="count", default=0,
                       help="make PVs of devices that hold something")
        p.add_argument("-y", "--yes", action="store_true", help="answer yes (the default)")
        _copies(p)
        p.add_argument("vg", metavar="VG", help="the volume group's name")
        p.add_argument("pvs", nargs="+", metavar="DEV", help=_DEV)
    p = lvm("vgreduce", "remove PVs from a volume group")
    p.add_argument("--removemissing", action="store_true",
                   help="remove the PVs no device holds (and, with -f, their LVs)")
    p.add_argument("-f", "--force", action="store_true", help="with --removemissing: also "
                   "remove the LVs that had extents on them")
    p.add_argument("vg", metavar="VG", help="the volume group")
    p.add_argument("pvs", nargs="*", metavar="DEV", help="the PVs to remove")
    p = lvm("vgremove", "remove volume groups")
    p.add_argument("-f", "--force", action="store_true", help="remove their LVs too")
    p.add_argument("-y", "--yes", action="store_true", help="answer yes (the default)")
    p.add_argument("vgs", nargs="+", metavar="VG", help="a volume group")
    p = lvm("vgrename", "rename a volume group")
    p.add_argument("old", metavar="VG", help="its name or uuid")
    p.add_argument("new", metavar="NEWVG", help="the new name")
    p = lvm("vgck", "check volume groups' metadata (and repair with --updatemetadata)")
    p.add_argument("--updatemetadata", action="store_true",
                   help="rewrite the metadata where a copy is old or damaged")
    p.add_argument("vgs", nargs="*", metavar="VG", help="a volume group (default: all)")
    _lv_verbs(lvm)
    from sanvisor.cli import backup_verb

    backup_verb.add_parser(verb)
    for name, kind in (("pvs", "PV"), ("vgs", "VG"), ("lvs", "LV")):
        p = lvm(name, f"report {kind}s as lvm2 does")
        p.add_argument("-o", "--options", action="append", default=[],
                       help="fields, comma-separated (+f adds to the default columns)")
        p.add_argument("-a", "--all", action="store_true", help="internal LVs too")
        p.add_argument("--reportformat", choices=["basic", "json"], default="basic",
                       help="basic (a table) or json (lvm2's)")
        p.add_argument("--units", default="r", help="r h b s k m g t (K M G T: SI)")
        p.add_argument("--noheadings", action="store_true", help="no header line")
        p.add_argument("--nosuffix", action="store_true", help="sizes without their unit")
        p.add_argument("--separator", help="between columns instead of alignment")
        p.add_argument("select", nargs="*", metavar=kind,
                       help=f"only these (default: all); {'VG or VG/LV' if kind == 'LV' else kind}")


def _copies(p: Any) -> None:
    p.add_argument("--pvmetadatacopies", dest="metadatacopies", type=int, default=2,
                   choices=[0, 1, 2], help="metadata areas per new PV (default 2: the second "
                   "at the end of the LUN)")


def _size_args(p: Any, sign: bool) -> None:
    pm = "[+|-]" if sign else ""
    p.add_argument("-L", "--size", help=f"{pm}SIZE: 64m, 1.5g (MiB by default)")
    p.add_argument("-l", "--extents", help=f"{pm}N extents, or N%%FREE, N%%VG, N%%PVS"
                   + (", N%ORIGIN" if not sign else ""))


def _lv_verbs(lvm: Any) -> None:
    p = lvm("lvcreate", "create a logical volume (-s: a snapshot of VG/LV)")
    p.add_argument("-n", "--name", help="its name (default lvolN)")
    _size_args(p, False)
    p.add_argument("-s", "--snapshot", action="store_true", help="a snapshot of VG/LV")
    p.add_argument("-c", "--chunksize", dest="chunk_size", help="snapshot chunk (4k-512k)")
    p.add_argument("-a", "--activate", choices=["y", "n", "ey"], default="y",
                   help="open it for writing on this host (default y)")
    p.add_argument("-Z", "--zero", choices=["y", "n"], default="y",
                   help="zero its first 4 KiB (default y)")
    p.add_argument("-y", "--yes", action="store_true", help="answer yes (the default)")
    p.add_argument("--addtag", action="append", default=[], help="a tag")
    p.add_argument("vg", metavar="VG|VG/LV", help="the VG (with -s: the origin VG/LV)")
    p.add_argument("pvs", nargs="*", metavar="PV", help="allocate only on these PVs")
    for name, text in (("lvextend", "grow a logical volume"),
                       ("lvreduce", "shrink a logical volume (its end is lost)"),
                       ("lvresize", "grow or shrink a logical volume")):
        p = lvm(name, text)
        _size_args(p, True)
        p.add_argument("-f", "--force", action="store_true", help="confirm a shrink")
        p.add_argument("-y", "--yes", action="store_true", help="confirm (as -f)")
        p.add_argument("lv", metavar="LV", help=_LV)
        p.add_argument("pvs", nargs="*", metavar="PV", help="allocate only on these PVs")
    p = lvm("lvrename", "rename a logical volume")
    p.add_argument("names", nargs="+", metavar="NAME",
                   help="VG OLD NEW, or VG/OLD NEW, or VG/OLD VG/NEW")
    p = lvm("lvremove", "remove logical volumes")
    p.add_argument("-f", "--force", action="store_true",
                   help="even if active here, and an origin with its snapshots")
    p.add_argument("-y", "--yes", action="store_true", help="answer yes (as -f)")
    p.add_argument("lvs", nargs="+", metavar="LV", help=_LV + ", or a VG (all its LVs)")
    p = lvm("lvconvert", "merge a snapshot back into its origin (roll back)")
    p.add_argument("--merge", action="store_true", required=True, help="merge SNAP")
    p.add_argument("lv", metavar="SNAP", help="the snapshot: VG/SNAP")
    p = lvm("lvchange", "activate or deactivate LVs on this host; tags; hand over")
    p.add_argument("-a", "--activate", choices=["y", "n", "ey", "sy"],
                   help="y/ey: open for writing here (one host at a time); n: let go")
    p.add_argument("--addtag", action="append", default=[], help="add a tag")
    p.add_argument("--deltag", action="append", default=[], help="remove a tag")
    p.add_argument("--handover", metavar="HOST", help="let HOST activate it too (a "
                   "migration); ends when this host deactivates it")
    p.add_argument("--force", action="store_true",
                   help="with -ay: take it from a host that is down")
    p.add_argument("lvs", nargs="+", metavar="LV", help=_LV)


def _args(ns: argparse.Namespace) -> dict[str, Any]:
    skip = {"verb", "json", "on_host", "home", "version", "yes", "reportformat", "units",
            "noheadings", "nosuffix", "separator"}
    out = {k: v for k, v in vars(ns).items() if k not in skip and v is not None}
    if ns.verb == "lvrename":
        names = ns.names
        if len(names) == 3:
            out |= {"vg": names[0], "old": names[1], "new": names[2]}
        elif len(names) == 2:
            out |= {"old": names[0], "new": names[1]}
        else:
            from sanvisor.errors import UsageError

            raise UsageError("lvrename VG OLD NEW, or lvrename VG/OLD NEW")
        out.pop("names")
    if ns.verb in ("lvextend", "lvreduce", "lvresize") and ns.yes:
        out["force"] = True
    if ns.verb == "lvremove" and ns.yes:
        out["force"] = True
    if ns.verb in ("pvs", "vgs", "lvs"):
        out["options"] = ns.options
    return out


def run(ns: argparse.Namespace, layout: Layout) -> int:
    from sanvisor.api.client import AgentClient
    from sanvisor.cli import render

    answer = AgentClient(layout.socket, timeout=600).call(
        "POST", f"/v1/lvm/{ns.verb}", {"args": _args(ns)})
    for w in answer.get("warnings", []):
        print(f"  WARNING: {w}", file=sys.stderr)
    if ns.verb in ("pvs", "vgs", "lvs"):
        from sanvisor.storage.lvm import report

        kind, fields, rows = answer["kind"], answer["fields"], answer["rows"]
        if ns.json or ns.reportformat == "json":
            print(report.json_report(kind, fields, rows, unit=ns.units,
                                     suffix=not ns.nosuffix))
        elif rows:
            print(report.table(kind, fields, rows, unit=ns.units, suffix=not ns.nosuffix,
                               headings=not ns.noheadings, separator=ns.separator))
        return 0
    if ns.json:
        render.emit_json(answer)
        return 0
    for m in answer.get("messages", []):
        print(f"  {m}")
    if ns.verb == "vgck" and answer.get("messages"):
        return 1
    return 0


def handlers() -> dict[str, Any]:
    from sanvisor.cli import backup_verb

    return dict.fromkeys(VERBS, run) | {"backup": backup_verb.run}
