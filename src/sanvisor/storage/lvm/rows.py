"""The values of pvs, vgs and lvs rows (bytes for sizes; the CLI formats them)."""

from __future__ import annotations

from sanvisor.storage.lvm.model import Lv, Segment, Vg
from sanvisor.storage.lvm.ondisk import format_uuid
from sanvisor.storage.lvm.report import SEG_FIELDS
from sanvisor.storage.lvm.scan import Scan, VgState

Row = dict[str, object]
_ALLOC = {"contiguous": "c", "cling": "l", "normal": "n", "anywhere": "a", "inherit": "i",
          "cling_by_tags": "l"}


def pv_rows(found: Scan) -> list[Row]:
    rows: list[Row] = []
    for d in found.disks:
        st = found.vg_of(d)
        lab = d.label
        row: Row = {"pv_name": d.dev.name, "pv_fmt": "lvm2", "pv_uuid": format_uuid(d.uuid),
                    "pe_start": lab.pe_start, "pv_mda_count": len(lab.mdas),
                    "pv_mda_size": min((m.size for m in lab.mdas), default=0),
                    "dev_size": d.dev.size}
        if st is None:
            row |= {"vg_name": "", "pv_attr": "---", "pv_size": lab.dev_size,
                    "pv_free": lab.dev_size, "pv_pe_count": 0, "pv_pe_alloc_count": 0,
                    "pv_tags": [], "pv_used": 0}
        else:
            vg = st.vg
            pv = vg.pv(d.uuid)
            ext = vg.extent_size * 512
            free = vg.free_extents(d.uuid)
            row |= {"vg_name": vg.name, "pv_attr": _pv_attr(pv.status, pv.flags, False),
                    "pv_size": pv.pe_count * ext, "pv_free": free * ext,
                    "pv_pe_count": pv.pe_count, "pv_pe_alloc_count": pv.pe_count - free,
                    "pv_tags": pv.tags, "pv_used": (pv.pe_count - free) * ext}
        rows.append(row)
    for st in found.vgs:
        for uuid in st.missing:
            pv = st.vg.pv(uuid)
            ext = st.vg.extent_size * 512
            rows.append({"pv_name": "[unknown]", "vg_name": st.vg.name, "pv_fmt": "lvm2",
                         "pv_attr": _pv_attr(pv.status, pv.flags, True),
                         "pv_size": pv.pe_count * ext,
                         "pv_free": st.vg.free_extents(uuid) * ext,
                         "pv_uuid": format_uuid(uuid), "pv_pe_count": pv.pe_count})
    return sorted(rows, key=lambda r: str(r["pv_name"]))


def _pv_attr(status: list[str], flags: list[str], missing: bool) -> str:
    return (("a" if "ALLOCATABLE" in status else "-") + ("x" if "EXPORTED" in status else "-")
            + ("m" if missing or "MISSING" in status + flags else "-"))


def vg_rows(found: Scan) -> list[Row]:
    rows: list[Row] = []
    for st in found.vgs:
        vg = st.vg
        ext = vg.extent_size * 512
        attr = (("w" if "WRITE" in vg.status else "r")
                + ("z" if "RESIZEABLE" in vg.status else "-")
                + ("x" if "EXPORTED" in vg.status else "-")
                + ("p" if st.missing else "-") + "n"
                + ("s" if "lock_type" in vg.extra else "-"))
        rows.append({"vg_name": vg.name, "pv_count": len(vg.pvs),
                     "lv_count": sum(1 for lv in vg.lvs if vg.user_visible(lv)),
                     "snap_count": len(vg.snapshots()), "vg_attr": attr,
                     "vg_size": vg.extent_count * ext, "vg_free": vg.free_count * ext,
                     "vg_uuid": format_uuid(vg.uuid), "vg_fmt": "lvm2", "vg_extent_size": ext,
                     "vg_extent_count": vg.extent_count, "vg_free_count": vg.free_count,
                     "vg_seqno": vg.seqno,
                     "vg_mda_count": sum(len(d.label.mdas) for d in st.disks.values()),
                     "vg_tags": vg.tags, "vg_missing_pv_count": len(st.missing)})
    return rows


def lv_rows(found: Scan, host: str, fields: list[str], show_all: bool = False,
            only_vg: str | None = None) -> list[Row]:
    from sanvisor.storage.lvm.snapops import usage

    per_seg = any(f in SEG_FIELDS for f in fields)
    rows: list[Row] = []
    for st in found.vgs:
        vg = st.vg
        if only_vg is not None and vg.name != only_vg:
            continue
        for lv in vg.lvs:
            if lv.snapshot_seg is not None:
                continue
            visible = vg.user_visible(lv)
            if not visible and not show_all:
                continue
            row = _lv_row(st, lv, host, visible)
            cow = vg.cow_of(lv)
            if cow is not None:
                devs = {u: d.dev for u, d in st.disks.items()}
                pct, valid = ((None, True) if st.missing or not any(
                    f in fields for f in ("data_percent", "snap_percent", "lv_attr"))
                    else usage(vg, lv, devs))
                row["data_percent"] = row["snap_percent"] = pct
                if not valid:
                    row["lv_attr"] = str(row["lv_attr"])[:4] + "I" + str(row["lv_attr"])[5:]
            if not per_seg:
                rows.append(row)
                continue
            for seg in lv.segments:
                rows.append(row | _seg_row(st, seg, cow.chunk_size if cow else 0))
    return rows


def _lv_row(st: VgState, lv: Lv, host: str, visible: bool) -> Row:
    vg = st.vg
    cow = vg.cow_of(lv)
    snaps = vg.snapshots_of(lv.name)
    if cow is not None:
        kind = "S" if cow.merging else "s"
    elif snaps:
        kind = "O" if any(s.merging for s in snaps) else "o"
    else:
        kind = "-"
    policy = lv.extra.get("allocation_policy", "inherit")
    hosts = lv.active_hosts()
    attr = (kind + ("w" if "WRITE" in lv.status else "r") + _ALLOC.get(str(policy), "i")
            + ("m" if "FIXED_MINOR" in lv.status else "-") + ("a" if host in hosts else "-")
            + "-" + ("s" if cow is not None or snaps else "-") + "--"
            + ("k" if "ACTIVATION_SKIP" in lv.flags else "-"))
    dm = f"{vg.name.replace('-', '--')}-{lv.name.replace('-', '--')}"
    return {"lv_name": lv.name if visible else f"[{lv.name}]", "vg_name": vg.name,
            "lv_attr": attr, "lv_size": lv.extents * vg.extent_size * 512,
            "pool_lv": "", "origin": cow.origin if cow is not None else "",
            "data_percent": None, "metadata_percent": None, "move_pv": "", "mirror_log": "",
            "copy_percent": None, "convert_lv": "", "lv_uuid": format_uuid(lv.uuid),
            "lv_path": f"/dev/{vg.name}/{lv.name}" if visible else "",
            "lv_dm_path": f"/dev/mapper/{dm}", "lv_full_name": f"{vg.name}/{lv.name}",
            "lv_tags": lv.tags, "seg_count": len(lv.segments), "snap_percent": None,
            "lv_active": "active" if host in hosts else "",
            "lv_active_hosts": ",".join(hosts)}


def _seg_row(st: VgState, seg: Segment, chunk: int) -> Row:
    vg = st.vg
    ext = vg.extent_size * 512
    per = seg.extent_count // max(1, len(seg.stripes))
    ranges = [f"{st.device_name(pv) if pv not in st.missing else '[unknown]'}:{pe}-"
              f"{pe + per - 1}" for pv, pe in seg.stripes]
    devs = [f"{st.device_name(pv) if pv not in st.missing else '[unknown]'}({pe})"
            for pv, pe in seg.stripes]
    kind = ("linear" if seg.linear else seg.type) if seg.type == "striped" else seg.type
    return {"segtype": kind, "stripes": len(seg.stripes) or 1, "chunk_size": chunk * 512,
            "seg_start": seg.start_extent * ext, "seg_start_pe": seg.start_extent,
            "seg_size": seg.extent_count * ext, "seg_size_pe": seg.extent_count,
            "seg_pe_ranges": ranges, "devices": devs}


def vg_names(found: Scan) -> list[str]:
    return [st.vg.name for st in found.vgs]


def by_vg(found: Scan, name: str) -> Vg:
    return found.vg(name).vg
