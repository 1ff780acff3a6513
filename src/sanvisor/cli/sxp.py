"""xm's S-expressions: `list -l` as xm printed it, and a reader for them (scripts that
parsed xm's SXP; the tests read back what we write).

A node is ``(key value)`` or ``(key child child ...)``; a value that is empty or
holds white space, parentheses or a quote is written in single quotes with
backslash escapes (render.sxp).
"""

from __future__ import annotations

from sanvisor.cli.render import SxpNode, sxp

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class SxpError(ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    """('(' | ')' | 'atom' | 'str', text)."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "()":
            out.append((c, c))
            i += 1
        elif c == "'":
            buf = []
            i += 1
            while True:
                if i >= n:
                    raise SxpError("unterminated quoted string")
                c = text[i]
                if c == "\\" and i + 1 < n:
                    buf.append(text[i + 1])
                    i += 2
                elif c == "'":
                    i += 1
                    break
                else:
                    buf.append(c)
                    i += 1
            out.append(("str", "".join(buf)))
        else:
            j = i
            while j < n and not text[j].isspace() and text[j] not in "()'":
                j += 1
            out.append(("atom", text[i:j]))
            i = j
    return out


def parse(text: str) -> list[SxpNode]:
    """Every top-level node of ``text``."""
    toks = _tokens(text)
    pos = 0

    def node() -> SxpNode:
        nonlocal pos
        if pos >= len(toks) or toks[pos][0] != "(":
            raise SxpError("expected '('")
        pos += 1
        if pos >= len(toks) or toks[pos][0] != "atom":
            raise SxpError("expected a key after '('")
        key = toks[pos][1]
        pos += 1
        if pos < len(toks) and toks[pos][0] in ("atom", "str"):
            value = toks[pos][1]
            pos += 1
            if pos >= len(toks) or toks[pos][0] != ")":
                raise SxpError(f"({key} ...: expected ')' after the value")
            pos += 1
            return (key, value)
        children: list[SxpNode] = []
        while pos < len(toks) and toks[pos][0] == "(":
            children.append(node())
        if pos >= len(toks) or toks[pos][0] != ")":
            raise SxpError(f"({key} ...: expected ')'")
        pos += 1
        return (key, children)

    nodes = []
    while pos < len(toks):
        nodes.append(node())
    return nodes


def _image(row: dict[str, Any]) -> SxpNode:
    cfg = row.get("config") or {}
    kind = {"pvh": "pvh", "hvm": "hvm"}.get(str(cfg.get("builder") or "pv"), "linux")
    parts: list[SxpNode] = [("kernel", row.get("kernel") or cfg.get("kernel") or "")]
    initrd = row.get("initrd") or cfg.get("ramdisk")
    if initrd:
        parts.append(("ramdisk", initrd))
    if cfg.get("root"):
        parts.append(("root", cfg["root"]))
    parts.append(("args", row.get("cmdline") or cfg.get("extra") or ""))
    return ("image", [(kind, parts)])


def domain_long(row: dict[str, Any]) -> SxpNode:
    """One `list -l` row as xm's ``(domain ...)``."""
    cfg = row.get("config") or {}
    fields: list[SxpNode] = [("host", row["host"])] if row.get("host") else []
    if row.get("domid") is not None:
        fields.append(("domid", row["domid"]))
    for key, value in (("name", row["name"]), ("uuid", row.get("uuid") or ""),
                       ("memory", row.get("mem_mib", 0)),
                       ("maxmem", row.get("maxmem_mib", row.get("mem_mib", 0))),
                       ("vcpus", row.get("vcpus", 0)),
                       ("maxvcpus", row.get("maxvcpus", row.get("vcpus", 0)))):
        fields.append((key, value))
    credit = row.get("credit") or {}
    if "state" in row and row["domid"] != 0:
        fields.append(("cpu_weight", credit.get("weight", 256)))
        fields.append(("cpu_cap", credit.get("cap", 0)))
    for key in ("on_poweroff", "on_reboot", "on_crash"):
        if cfg.get(key):
            fields.append((key, cfg[key]))
    fields.append(("state", row.get("letters", "------")))
    fields.append(("cpu_time", row.get("cpu_seconds", 0.0)))
    if "uptime" in row:
        fields.append(("up_time", row["uptime"]))
    if row.get("pid"):
        fields.append(("pid", row["pid"]))
    if row.get("managed") or row.get("state") == "stopped":
        fields.append(("managed", 1))
        fields.append(("autostart", int(bool(row.get("autostart")))))
    if cfg:
        fields.append(_image(row))
    pins = row.get("vcpu_pins") or {}
    if pins:
        from sanvisor.model.cpulist import format_cpus

        fields.append(("cpus", [(f"vcpu{v}", format_cpus(c)) for v, c in
                                sorted(pins.items(), key=lambda x: int(x[0]))]))
    for d in row.get("disks") or cfg.get("disks") or []:
        vbd: list[SxpNode] = [("uname", f"{d['backend']}:{d['path']}"),
                              ("dev", d["target"] + (":cdrom" if d.get("devtype") == "cdrom"
                                                     else "")),
                              ("mode", d["mode"])]
        fields.append(("device", [("vbd", vbd)]))
    for n in row.get("vifs") or []:
        vif: list[SxpNode] = [("mac", n["mac"]), ("type", n.get("type") or "bridge")]
        if n.get("bridge"):
            vif.append(("bridge", n["bridge"]))
        if n.get("tap"):
            vif.append(("vifname", n["tap"]))
        if n.get("ip"):
            vif.append(("ip", n["ip"]))
        fields.append(("device", [("vif", vif)]))
    return ("domain", fields)


def list_long(rows: list[dict[str, Any]]) -> str:
    return "\n".join(sxp(domain_long(r)) for r in rows)
