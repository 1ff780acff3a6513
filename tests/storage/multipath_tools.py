"""multipath-tools 0.9.4 as the reference for tests/storage/test_mpconf.py.

glibc's regcomp/regexec (what multipath-tools matches with); `multipath -t` run on
a given multipath.conf in a mount namespace of its own where /etc is an overlay
(the host is untouched), its output parsed; and what multipath-tools makes of that
output for one map (libmultipath/propsel.c) and one path (blacklist.c), written
from its source and manual, independently of sanvisor's code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
needs_glibc = pytest.mark.skipif(not hasattr(_LIBC, "regcomp") or os.uname().sysname != "Linux",
                                 reason="compares with glibc's regcomp/regexec")


def glibc_search(pattern: str, s: str) -> bool | None:
    """regexec(regcomp(pattern, REG_EXTENDED|REG_NOSUB), s); None: it does not compile."""
    buf = ctypes.create_string_buffer(256)  # a regex_t is 64 bytes
    if _LIBC.regcomp(buf, pattern.encode(), 1 | 8):
        return None
    try:
        return bool(_LIBC.regexec(buf, s.encode(), 0, None, 0) == 0)
    finally:
        _LIBC.regfree(buf)


needs_multipath = pytest.mark.skipif(
    shutil.which("multipath") is None or shutil.which("unshare") is None or os.geteuid() != 0,
    reason="compares with multipath-tools' `multipath -t`: needs root, unshare and the "
    "multipath-tools package (scripts/setup.sh installs it)")
_IN_NAMESPACE = r"""
set -e
mount -t tmpfs sanvisor-mpt "$1/ns"
mkdir "$1/ns/upper" "$1/ns/work"
mount -t overlay sanvisor-mpt -o "lowerdir=/etc,upperdir=$1/ns/upper,workdir=$1/ns/work" /etc
cp "$1/multipath.conf" /etc/multipath.conf
exec multipath -t
"""


def multipath_t(text: str) -> tuple[dict[str, Any], str]:
    """What multipath-tools reads in TEXT as /etc/multipath.conf: `multipath -t`, parsed,
    and its messages. It runs in a mount namespace of its own in which /etc is an
    overlay (writes go to a tmpfs that dies with it): the host's /etc is untouched."""
    with tempfile.TemporaryDirectory(prefix="sanvisor-mpt-") as tmp:
        (Path(tmp) / "ns").mkdir()
        (Path(tmp) / "multipath.conf").write_text(text)
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            _IN_NAMESPACE, "sh", tmp], capture_output=True, text=True,
                           timeout=60)
    if r.returncode != 0:
        raise AssertionError(f"multipath -t failed ({r.returncode}): {r.stderr}")
    return _parse_t(r.stdout), r.stderr


def _parse_t(out: str) -> dict[str, Any]:
    """`multipath -t`: one keyword or section a line, values quoted when strings."""
    t: dict[str, Any] = {"defaults": {}, "overrides": {}, "devices": [], "multipaths": [],
                         "blacklist": {}, "blacklist_exceptions": {}}
    path: list[str] = []
    cur: dict[str, Any] = {}
    for line in out.splitlines():
        key, _, value = line.strip().partition(" ")
        if value == "{":
            path.append(key)
            if key in ("device", "multipath"):
                cur = {}
                parent = t[path[0]]
                (parent if isinstance(parent, list) else parent.setdefault("device", [])
                 ).append(cur)
            elif key != "protocol":
                cur = t[key]
        elif key == "}":
            path.pop()
            cur = t[path[0]] if path and path[0] in ("blacklist", "blacklist_exceptions",
                                                     "defaults", "overrides") else {}
        elif path:
            v = value[1:-1].replace('""', '"') if value.startswith('"') else value
            if path[-1] in ("blacklist", "blacklist_exceptions"):
                cur.setdefault(key, []).append(v)
            elif path[-1] != "protocol":
                cur[key] = v
    return t


def tool_view(t: dict[str, Any], wwid: str, vendor: str, product: str,
              revision: str | None) -> dict[str, Any]:
    """The settings of a map as multipath-tools selects them (propsel.c, the manual's
    "multipaths > overrides > devices > defaults"), from what `multipath -t` shows."""
    def hit(d: dict[str, str]) -> bool:
        return all(key not in d or value is None or glibc_search(d[key], value)
                   for key, value in (("vendor", vendor), ("product", product),
                                      ("revision", revision)))
    mpe: dict[str, str] = next((m for m in t["multipaths"] if m["wwid"] == wwid), {})
    levels = [mpe, t["overrides"], *(d for d in reversed(t["devices"]) if hit(d)),
              t["defaults"]]

    def val(key: str) -> Any:
        return next((level[key] for level in levels if key in level), None)
    retry = val("no_path_retry")
    feats = val("features").split()
    if "queue_if_no_path" in feats and retry is None:
        retry = "queue"
    feats = [w for w in feats[1:] if w not in ("queue_if_no_path", "retain_attached_hw_handler")]
    if retry not in (None, "fail"):
        feats.append("queue_if_no_path")
    out = {k: val(k) for k in ("path_grouping_policy", "path_selector", "failback", "rr_weight",
                               "alias_prefix", "path_checker", "prio")}
    return {**out, "no_path_retry": retry or "fail", "features": " ".join([str(len(feats)),
                                                                          *feats]),
            "rr_min_io": int(val("rr_min_io")), "rr_min_io_rq": int(val("rr_min_io_rq")),
            "user_friendly_names": val("user_friendly_names") == "yes",
            "polling_interval": float(t["defaults"]["polling_interval"]),
            "alias": mpe.get("alias")}


def tool_blacklisted(t: dict[str, Any], wwid: str, vendor: str, product: str, devnode: str,
                     protocol: str) -> bool:
    """blacklist.c: devnode, vendor/product, protocol, wwid; an exception wins within
    its criterion; '!' inverts a regex."""
    def hit(rx: str, s: str) -> bool:
        invert = rx.startswith("!")
        return bool(glibc_search(rx[1:] if invert or rx.startswith("\\!") else rx, s)) != invert

    def dev_hit(entries: list[dict[str, str]]) -> bool:
        return any(("vendor" in e or "product" in e) and all(
            k not in e or hit(e[k], v) for k, v in (("vendor", vendor), ("product", product)))
            for e in entries)
    for kind, value in (("devnode", devnode), ("device", None), ("protocol", protocol),
                        ("wwid", wwid)):
        bl, ex = t["blacklist"].get(kind, []), t["blacklist_exceptions"].get(kind, [])
        if kind == "device":
            if not dev_hit(ex) and dev_hit(bl):
                return True
        elif value is not None and not any(hit(r, value) for r in ex) and \
                any(hit(r, value) for r in bl):
            return True
    return False
