"""The command line's grammar, without an agent: global options anywhere, usage
errors with the verb's own usage, help text for every argument, one verb list."""

from __future__ import annotations

import argparse

import pytest

from sanvisor.cli import main as climain
from sanvisor.cli.parser import VERBS, build_parser
from sanvisor.cli.render import domain_sxp, sxp


def test_globals_are_taken_from_anywhere() -> None:
    g, rest = climain.split_globals(["lab", "status", "--json", "-H", "host1"])
    assert (g.json, g.on_host, rest) == (True, "host1", ["lab", "status"])
    g, rest = climain.split_globals(["--home=/x", "list", "-Hxen1", "web1"])
    assert (g.home, g.on_host, rest) == ("/x", "xen1", ["list", "web1"])
    g, rest = climain.split_globals(["create", "vm.cfg", "--", "--json"])
    assert not g.json and rest == ["create", "vm.cfg", "--", "--json"]
    g, rest = climain.split_globals(["create", "vm.cfg", "extra=--json x"])
    assert not g.json


def test_a_global_without_its_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    with pytest.raises(SystemExit) as exit_:
        climain.main(["list", "-H"])
    assert exit_.value.code == 2
    assert "-H needs a value" in capsys.readouterr().err


def test_an_unknown_option_prints_that_verbs_usage(capsys: pytest.CaptureFixture[str]
                                                   ) -> None:
    for argv, usage in ((["pause", "--bogus", "web1"], "usage: sanvisor pause"),
                        (["lab", "fault", "hba-down", "h1", "0", "-x"],
                         "usage: sanvisor lab fault"),
                        (["scsi", "rescan", "--nope"], "usage: sanvisor scsi rescan")):
        with pytest.raises(SystemExit) as exit_:
            climain.main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(usage), err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert climain.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("sanvisor ")


def _walk(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, argparse.Action]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _walk(sub, f"{path} {name}")
        elif not action.option_strings:
            out.append((path, action))
    return out


def test_every_positional_argument_has_help() -> None:
    parser, _ = build_parser()
    missing = [f"{path}: {a.dest}" for path, a in _walk(parser, "sanvisor") if not a.help]
    assert missing == []


def test_the_verb_list_matches_the_parser() -> None:
    from sanvisor.cli.verbs import HANDLERS

    parser, _ = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    assert set(sub.choices) == set(VERBS) == set(HANDLERS)  # type: ignore[arg-type]
    for verb in VERBS:  # the fast path builds exactly the verb asked for, and it parses
        only, _ = build_parser(only=verb)
        only_sub = next(a for a in only._actions if a.dest == "verb")
        assert set(only_sub.choices) == {verb}  # type: ignore[arg-type]


def test_sxp_quotes_what_needs_it() -> None:
    assert sxp(("args", "root=/dev/sda1 ro")) == "(args 'root=/dev/sda1 ro')"
    assert sxp(("name", "web1")) == "(name web1)"
    assert sxp(("x", "it's")) == "(x 'it\\'s')"


def test_create_dry_run_shape() -> None:
    plan = {"spec": {"name": "web1", "memory": 128, "maxmem": 256, "vcpus": 1,
                     "maxvcpus": 2, "on_poweroff": "destroy", "on_reboot": "restart",
                     "on_crash": "destroy", "root": "/dev/sda1", "builder": "pv"},
            "uuid": "u", "domid": 3, "kernel": "/k", "initrd": None, "cmdline": "ro",
            "disks": [{"backend": "phy", "path": "/dev/mapper/sys", "target": "sda",
                       "mode": "w", "devtype": "disk", "via": "multipath map sys"}],
            "nics": [{"mac": "00:16:3e:00:00:01", "type": "bridge", "bridge": "xenbr0",
                      "bridge_exists": False, "ip": None}],
            "driver": "qemu", "accelerator": "tcg"}
    text = domain_sxp(plan)
    assert text.startswith("(vm\n    (name web1)\n")
    assert "(uname phy:/dev/mapper/sys)" in text and "(root /dev/sda1)" in text
    assert "(mac 00:16:3e:00:00:01)" in text
    assert "(bridge 'xenbr0 (created at start)')" in text
    assert text.endswith("\n)")
