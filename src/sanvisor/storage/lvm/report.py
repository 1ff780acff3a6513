"""pvs, vgs and lvs as lvm2 prints them: the fields (names, headings, alignment),
the default columns, sizes as lvm2's dm_size_to_string writes them, tables and the
JSON report. Pure: the CLI renders the rows the agent computes (values in bytes).
"""

from __future__ import annotations

import json
import math

# field -> (heading, type, minimum width); types: STR (left), NUM, SIZ, PCT (right)
FIELDS: dict[str, dict[str, tuple[str, str, int]]] = {
    "pv": {
        "pv_name": ("PV", "STR", 10), "vg_name": ("VG", "STR", 0),
        "pv_fmt": ("Fmt", "STR", 0), "pv_attr": ("Attr", "STR", 0),
        "pv_size": ("PSize", "SIZ", 0), "pv_free": ("PFree", "SIZ", 0),
        "pv_uuid": ("PV UUID", "STR", 38), "pe_start": ("1st PE", "SIZ", 7),
        "pv_pe_count": ("PE", "NUM", 3), "pv_pe_alloc_count": ("Alloc", "NUM", 0),
        "pv_mda_count": ("#PMda", "NUM", 0), "pv_mda_size": ("PMdaSize", "SIZ", 9),
        "pv_tags": ("PV Tags", "STR_LIST", 0), "dev_size": ("DevSize", "SIZ", 0),
        "pv_used": ("Used", "SIZ", 0), "pv_lease": ("Lease", "STR", 0),
    },
    "vg": {
        "vg_name": ("VG", "STR", 0), "pv_count": ("#PV", "NUM", 0),
        "lv_count": ("#LV", "NUM", 0), "snap_count": ("#SN", "NUM", 0),
        "vg_attr": ("Attr", "STR", 5), "vg_size": ("VSize", "SIZ", 0),
        "vg_free": ("VFree", "SIZ", 0), "vg_uuid": ("VG UUID", "STR", 38),
        "vg_fmt": ("Fmt", "STR", 0), "vg_extent_size": ("Ext", "SIZ", 0),
        "vg_extent_count": ("#Ext", "NUM", 0), "vg_free_count": ("Free", "NUM", 0),
        "vg_seqno": ("Seq", "NUM", 0), "vg_mda_count": ("#VMda", "NUM", 0),
        "vg_tags": ("VG Tags", "STR_LIST", 0), "vg_missing_pv_count": ("#PV Missing", "NUM", 0),
    },
    "lv": {
        "lv_name": ("LV", "STR", 4), "vg_name": ("VG", "STR", 0),
        "lv_attr": ("Attr", "STR", 0), "lv_size": ("LSize", "SIZ", 0),
        "pool_lv": ("Pool", "STR", 0), "origin": ("Origin", "STR", 0),
        "data_percent": ("Data%", "PCT", 6), "metadata_percent": ("Meta%", "PCT", 6),
        "move_pv": ("Move", "STR", 0), "mirror_log": ("Log", "STR", 0),
        "copy_percent": ("Cpy%Sync", "PCT", 0), "convert_lv": ("Convert", "STR", 0),
        "lv_uuid": ("LV UUID", "STR", 38), "lv_path": ("Path", "STR", 0),
        "lv_dm_path": ("DMPath", "STR", 0), "lv_full_name": ("LV", "STR", 4),
        "lv_tags": ("LV Tags", "STR_LIST", 0), "seg_count": ("#Seg", "NUM", 0),
        "snap_percent": ("Snap%", "PCT", 6), "lv_active": ("Active", "STR", 0),
        "lv_active_hosts": ("Hosts", "STR", 0), "segtype": ("Type", "STR", 0),
        "stripes": ("#Str", "NUM", 0), "chunk_size": ("Chunk", "SIZ", 0),
        "seg_start": ("Start", "SIZ", 0), "seg_start_pe": ("Start", "NUM", 0),
        "seg_size": ("SSize", "SIZ", 0), "seg_size_pe": ("SSize", "NUM", 0),
        "seg_pe_ranges": ("PE Ranges", "STR_LIST", 0), "devices": ("Devices", "STR_LIST", 0),
    },
}
DEFAULTS = {
    "pv": ["pv_name", "vg_name", "pv_fmt", "pv_attr", "pv_size", "pv_free"],
    "vg": ["vg_name", "pv_count", "lv_count", "snap_count", "vg_attr", "vg_size", "vg_free"],
    "lv": ["lv_name", "vg_name", "lv_attr", "lv_size", "pool_lv", "origin", "data_percent",
           "metadata_percent", "move_pv", "mirror_log", "copy_percent", "convert_lv"],
}
SEG_FIELDS = frozenset(("segtype", "stripes", "chunk_size", "seg_start", "seg_start_pe",
                        "seg_size", "seg_size_pe", "seg_pe_ranges", "devices"))
_PREFIX = {"pv": ("pv_", "vg_", ""), "vg": ("vg_", ""), "lv": ("lv_", "seg_", "vg_", "")}


def resolve(kind: str, spec: list[str]) -> list[str]:
    """The columns of ``-o`` options (each a comma list; ``+f`` appends to the default,
    ``-f`` removes); lvm2's short names (``name``, ``size``, ``attr``) work too."""
    cols: list[str] = []
    for opt in spec or [""]:
        items = [x.strip() for x in opt.split(",") if x.strip()]
        relative = not items or items[0].startswith(("+", "-"))
        cols = (cols or list(DEFAULTS[kind])) if relative else []
        for item in items:
            sign, name = (item[0], item[1:]) if item[0] in "+-" else ("", item)
            field = _field(kind, name)
            if sign == "-":
                cols = [c for c in cols if c != field]
            else:
                cols.append(field)
    return cols or list(DEFAULTS[kind])


def _field(kind: str, name: str) -> str:
    from sanvisor.errors import UsageError

    known = FIELDS[kind]
    for p in _PREFIX[kind]:
        if p + name in known:
            return p + name
    raise UsageError(f'Unrecognised field: {name} (known: {", ".join(sorted(known))})')


def human(nbytes: int, unit: str = "r", suffix: bool = True) -> str:
    """A size as lvm2 prints it (dm_size_to_string): 'r' (the default) and 'h' human,
    two decimals, '<' when rounded up (r); b s k m g t p e (k... powers of 1024),
    K M G T P E (powers of 1000)."""
    letters = "eptgmk"
    if unit in ("r", "h", "R", "H"):
        if nbytes == 0:
            return "0 " if suffix else "0"
        base = 1000 if unit in "RH" else 1024
        byte = base ** 6
        s = 0
        while s < 6 and nbytes < byte:
            byte //= base
            s += 1
        prefix = ""
        if unit in "rR" and s < 6:
            d = 100.0 * nbytes / byte
            if math.floor(d) != round(d):
                prefix = "<"
        if s == 6:
            return f"{prefix}{nbytes}{('b' if base == 1024 else 'B') if suffix else ''}"
        sfx = letters[s].upper() if unit in "RH" else letters[s]
        return f"{prefix}{nbytes / byte:.2f}{sfx if suffix else ''}"
    if unit.lower() in "bs":
        n = nbytes // (512 if unit.lower() == "s" else 1)
        return f"{n}{unit.upper() if suffix else ''}"
    if unit.lower() not in letters:
        from sanvisor.errors import UsageError

        raise UsageError(f"Invalid units {unit!r}: r h b s k m g t p e (K M G ... = SI)")
    base = 1000 if unit.isupper() else 1024
    factor = base ** (6 - letters.index(unit.lower()))
    if nbytes == 0:
        return f"0{unit if suffix else ''}"
    return f"{nbytes / factor:.2f}{unit if suffix else ''}"


def human_long(nbytes: int) -> str:
    """As lvm2's messages write a size: '8.00 MiB', '<1.02 GiB'."""
    short = human(nbytes)
    if short.strip() == "0":
        return "0 "
    unit = short[-1]
    return f"{short[:-1]} {unit.upper()}iB" if unit in "kmgtpe" else f"{short[:-1]} B"


def cell(kind: str, field: str, value: object, unit: str, suffix: bool) -> str:
    ftype = FIELDS[kind][field][1]
    if value is None:
        return ""
    if ftype == "SIZ" and isinstance(value, int):
        return human(value, unit, suffix)
    if ftype == "PCT" and isinstance(value, float):
        return f"{value:.2f}"
    if ftype == "STR_LIST" and isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def table(kind: str, fields: list[str], rows: list[dict[str, object]], *, unit: str = "r",
          suffix: bool = True, headings: bool = True, separator: str | None = None) -> str:
    """The text lvm2 prints: two spaces, then aligned columns (numbers right)."""
    cells = [[cell(kind, f, r.get(f), unit, suffix) for f in fields] for r in rows]
    heads = [FIELDS[kind][f][0] for f in fields]
    if separator is not None:
        lines = ([separator.join(heads)] if headings else []) + [separator.join(c)
                                                                  for c in cells]
        return "\n".join("  " + ln for ln in lines)
    widths = [max([len(heads[i]) if headings else 0, FIELDS[kind][f][2]]
                  + [len(c[i]) for c in cells]) for i, f in enumerate(fields)]
    right = [FIELDS[kind][f][1] in ("NUM", "SIZ", "PCT") for f in fields]

    def line(items: list[str], align: list[bool]) -> str:
        return "  " + " ".join(x.rjust(w) if r else x.ljust(w)
                               for x, w, r in zip(items, widths, align, strict=True))

    return "\n".join(([line(heads, [False] * len(fields))] if headings else [])
                     + [line(c, right) for c in cells])


def json_report(kind: str, fields: list[str], rows: list[dict[str, object]], *,
                unit: str = "r", suffix: bool = True) -> str:
    """lvm2's ``--reportformat json``: every value a string."""
    items = [{f: cell(kind, f, r.get(f), unit, suffix) for f in fields} for r in rows]
    body = ",\n".join("                  " + json.dumps(i, separators=(", ", ":"))
                      for i in items)
    return ("  {\n      \"report\": [\n          {\n              \"" + kind + "\": [\n"
            + (body + "\n" if body else "") + "              ]\n          }\n      ]\n  }")
