"""Output shapes: xm's tables, and --json everywhere."""

from __future__ import annotations

import json
import sys

TYPE_CHECKING = False  # typing costs ~4 ms to import: every CLI call would pay it
if TYPE_CHECKING:
    from typing import Any


def emit_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def list_table(rows: list[dict[str, Any]], *, host: bool = False) -> str:
    """xm list's table; ``host``: a Host column first (list --pool)."""
    h = f"{'Host':<10} " if host else ""
    lines = [f"{h}{'Name':<40} {'ID':>3} {'Mem':>5} {'VCPUs':>5} {'State':>10} {'Time(s)':>9}"]
    for r in rows:
        h = f"{r.get('host', '-'):<10} " if host else ""
        domid = "-" if r["domid"] is None else r["domid"]  # registered, not running
        lines.append(f"{h}{r['name']:<40} {domid:>3} {r['mem_mib']:>5} {r['vcpus']:>5} "
                     f"{r['letters']:>10} {r['cpu_seconds']:>9.1f}")
    return "\n".join(lines)


def fmt_uptime(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    clock = f"{h}:{m:02d}:{s:02d}"
    return f"{days} day{'s' if days != 1 else ''}, {clock}" if days else clock


def uptime_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'Name':<40} {'ID':>3} {'Uptime':>20}"]
    for r in rows:
        lines.append(f"{r['name']:<40} {r['domid']:>3} {fmt_uptime(r['uptime']):>20}")
    return "\n".join(lines)


SxpNode = tuple[str, object]
_IMAGE = {"pv": "linux", "pvh": "pvh", "hvm": "hvm"}


def sxp(node: SxpNode, indent: int = 0) -> str:
    """xm's S-expression shape: ``(key value)``, nested lists indented by 4."""
    key, value = node
    pad = " " * indent
    if isinstance(value, list):
        inner = "\n".join(sxp(child, indent + 4) for child in value)
        return f"{pad}({key}\n{inner}\n{pad})"
    text = str(value)
    if not text or any(c.isspace() or c in "()'" for c in text):  # \r, \v too
        text = "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return f"{pad}({key} {text})"


def domain_sxp(d: dict[str, Any]) -> str:
    """`create -n`: the domain that would start, as xm create -n printed it."""
    spec = d["spec"]
    image = [("kernel", d["kernel"])]
    if d.get("initrd"):
        image.append(("ramdisk", d["initrd"]))
    if spec.get("root"):
        image.append(("root", spec["root"]))
    image.append(("args", d["cmdline"]))
    vm: list[SxpNode] = [("name", spec["name"]), ("uuid", d["uuid"]), ("domid", d["domid"]),
                         ("memory", spec["memory"]), ("maxmem", spec["maxmem"]),
                         ("vcpus", spec["vcpus"]), ("maxvcpus", spec["maxvcpus"]),
                         ("on_poweroff", spec["on_poweroff"]),
                         ("on_reboot", spec["on_reboot"]), ("on_crash", spec["on_crash"]),
                         ("image", [(_IMAGE.get(spec.get("builder") or "pv", "linux"), image)])]
    for disk in d["disks"]:
        vbd: list[SxpNode] = [("uname", f"{disk['backend']}:{disk['path']}"),
                              ("dev", disk["target"] + (":cdrom" if disk.get("devtype")
                                                        == "cdrom" else "")),
                              ("mode", disk["mode"]), ("backend", disk["via"])]
        vm.append(("device", [("vbd", vbd)]))
    for nic in d["nics"]:
        vif: list[SxpNode] = [("mac", nic["mac"]), ("type", nic["type"])]
        if nic.get("bridge"):
            vif.append(("bridge", nic["bridge"] + ("" if nic.get("bridge_exists")
                                                   else " (created at start)")))
        if nic.get("ip"):
            vif.append(("ip", nic["ip"]))
        vm.append(("device", [("vif", vif)]))
    vm.append(("driver", f"{d['driver']} ({d['accelerator']})"))
    return sxp(("vm", vm))
