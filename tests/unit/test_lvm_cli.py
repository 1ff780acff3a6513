"""The LVM verbs' command lines, as lvm2's users type them, become the agent's
arguments (no agent needed)."""

from __future__ import annotations

from typing import Any

import pytest

from sanvisor.cli import lvm_verbs
from sanvisor.cli import main as climain
from sanvisor.cli.parser import build_parser
from sanvisor.errors import UsageError


def _args(*argv: str) -> dict[str, Any]:
    g, rest = climain.split_globals(list(argv))
    parser, _ = build_parser(only=rest[0])
    ns = parser.parse_args(rest)
    ns.json = g.json
    return lvm_verbs._args(ns)


def test_lvm_command_lines() -> None:
    assert _args("lvcreate", "-n", "lvsysteme", "-L", "10G", "vgvirtualdebian") == {
        "name": "lvsysteme", "size": "10G", "snapshot": False, "activate": "y",
        "zero": "y", "addtag": [], "vg": "vgvirtualdebian", "pvs": [], "devices": []}
    snap = _args("lvcreate", "--snapshot", "-L", "1G", "-n", "lvsnap", "-c", "64k",
                 "vgvirtualdebian/lvsysteme")
    assert (snap["snapshot"], snap["vg"], snap["chunk_size"]) == (
        True, "vgvirtualdebian/lvsysteme", "64k")
    assert _args("lvcreate", "-l", "100%FREE", "-n", "x", "vg", "/dev/mapper/a")["pvs"] == [
        "/dev/mapper/a"]
    assert _args("lvextend", "-L", "+1G", "vg/lv")["size"] == "+1G"
    assert _args("lvreduce", "-y", "-l", "-2", "vg/lv")["force"] is True
    assert _args("lvrename", "vg", "a", "b") | {} == {"vg": "vg", "old": "a", "new": "b",
                                                     "devices": []}
    assert _args("lvrename", "vg/a", "vg/b")["new"] == "vg/b"
    with pytest.raises(UsageError):
        _args("lvrename", "a")
    assert _args("pvcreate", "-ff", "/dev/mapper/mpath0")["force"] == 2
    assert _args("vgcreate", "-s", "8m", "vg", "mpath0", "mpath1")["extent_size"] == "8m"
    assert _args("vgreduce", "--removemissing", "--force", "vg")["removemissing"] is True
    assert _args("lvchange", "-an", "vg/lv")["activate"] == "n"
    assert _args("lvchange", "--handover", "host2", "vg/lv")["handover"] == "host2"
    assert _args("lvs", "-o", "+seg_pe_ranges", "--json", "vg")["options"] == ["+seg_pe_ranges"]
    assert _args("lvconvert", "--merge", "vg/snap")["merge"] is True
    assert _args("vgs", "--devices", "/dev/loop3,/dev/loop4")["devices"] == [
        "/dev/loop3", "/dev/loop4"]


def test_the_volume_verbs_are_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser, _ = build_parser()
    parser.print_help()
    out = capsys.readouterr().out
    assert "volume verbs (LVM2's commands" in out and "lvcreate -n LV -L SIZE" in out
