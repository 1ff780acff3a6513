"""The pure parts of xm's other verbs: CPU lists, credit weights, SXP written and read
back, xl's tables parsed, Xen device numbers, the cgroup controller on a fake sysfs,
xentop's 80 columns and keys, the agent's event log."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sanvisor.agent import eventlog
from sanvisor.cli import sxp, top
from sanvisor.cli.fast import info_text
from sanvisor.cli.render import SxpNode
from sanvisor.cli.render import sxp as write_sxp
from sanvisor.drivers.base import LaunchPlan
from sanvisor.drivers.qemu import cgroup
from sanvisor.drivers.xen.extras import (
    parse_block_list,
    parse_network_list,
    parse_vcpu_list,
    policy_lines,
)
from sanvisor.errors import HypervisorError
from sanvisor.model.cpulist import affinity_text, format_cpus, parse_cpus
from sanvisor.model.domain import DomainSpec
from sanvisor.model.sched import DEFAULT_WEIGHT, Credit
from sanvisor.model.vdev import vdev_number


# ---- CPU lists ----------------------------------------------------------------------------
def test_cpu_lists_as_xm_writes_them() -> None:
    assert parse_cpus("0-3,^2", 4) == {0, 1, 3}
    assert parse_cpus("1,3", 4) == {1, 3}
    assert parse_cpus("all,^0", 2) == {1}
    assert parse_cpus(" 2 ", 4) == {2}
    for bad, why in (("", "empty"), ("^2", "leaves no CPU"), ("0-3,^0-3", "leaves no CPU"),
                     ("3-1", "backwards"), ("a", "is not a CPU"), ("1,,2", "is not a CPU"),
                     ("4", "does not exist on this host (it has 4: 0-3)"),
                     ("0-99999", "out of range")):
        with pytest.raises(ValueError, match="cpus: ") as err:
            parse_cpus(bad, 4)
        assert why in str(err.value) and "\n" not in str(err.value)
    assert format_cpus([5, 0, 1, 2]) == "0-2,5" and format_cpus([]) == ""
    assert affinity_text(range(4), 4) == "any cpu" and affinity_text([1, 2], 4) == "1-2"


@given(st.sets(st.integers(0, 63), min_size=1))
def test_a_cpu_list_reads_back_as_written(cpus: set[int]) -> None:
    assert parse_cpus(format_cpus(cpus), 64) == cpus


_TERMS = st.lists(st.tuples(st.booleans(), st.integers(0, 15), st.integers(0, 3)),
                  min_size=1, max_size=6)


@given(_TERMS)
def test_terms_apply_left_to_right(terms: list[tuple[bool, int, int]]) -> None:
    """The reference: a set, terms added or taken away in order."""
    text = ",".join(f"{'^' if neg else ''}{lo}" + (f"-{lo + span}" if span else "")
                    for neg, lo, span in terms)
    want: set[int] = set()
    for neg, lo, span in terms:
        r = set(range(lo, lo + span + 1))
        want = want - r if neg else want | r
    if not want:
        with pytest.raises(ValueError, match="leaves no CPU"):
            parse_cpus(text, 20)
    else:
        assert parse_cpus(text, 20) == want


@given(st.text(max_size=12))
def test_any_text_parses_or_is_refused_in_one_line(text: str) -> None:
    try:
        got = parse_cpus(text, 8)
    except ValueError as exc:
        assert str(exc).startswith("cpus: ") and "\n" not in str(exc)
    else:
        assert got and got <= set(range(8))


# ---- credit -------------------------------------------------------------------------------
def test_credit_defaults_match_linuxs() -> None:
    c = Credit()
    assert (c.v2_weight(), c.v1_shares(), c.v2_max(), c.quota_us()) == (
        100, 1024, "max 100000", -1)
    assert Credit(512, 50).v2_max() == "50000 100000"
    with pytest.raises(ValueError, match=r"weight: 0 is outside 1\.\.65535"):
        Credit(0, 0).check(maxvcpus=1)
    with pytest.raises(ValueError, match=r"cap: 201 is outside 0..200"):
        Credit(256, 201).check(maxvcpus=2)
    with pytest.raises(ValueError, match="weight: expected an integer"):
        Credit.from_dict({"weight": "x"})


@given(st.integers(1, 65535), st.integers(1, 65535))
def test_credit_keeps_the_order_of_weights(a: int, b: int) -> None:
    ca, cb = Credit(a, 0), Credit(b, 0)
    assert 1 <= ca.v2_weight() <= 10000 and 2 <= ca.v1_shares() <= 262144
    if a <= b:
        assert ca.v2_weight() <= cb.v2_weight() and ca.v1_shares() <= cb.v1_shares()
    assert Credit(DEFAULT_WEIGHT, 0).is_default


# ---- device numbers -----------------------------------------------------------------------
def test_xen_device_numbers() -> None:
    assert [vdev_number(t) for t in ("xvda", "xvdb", "xvda1", "sda", "sdb", "hda", "hdb",
                                     "hdc")] == [51712, 51728, 51713, 2048, 2064, 768, 832,
                                                 5632]
    assert vdev_number("xvdq") == (1 << 28) | (16 << 8)


# ---- SXP ----------------------------------------------------------------------------------
_KEY = st.from_regex(r"[a-z][a-z_0-9]{0,8}", fullmatch=True)
_LEAF = st.tuples(_KEY, st.text(max_size=12))
_NODE = st.recursive(_LEAF, lambda kids: st.tuples(_KEY, st.lists(kids, max_size=4)),
                     max_leaves=12)


def _norm(node: Any) -> Any:
    key, value = node
    return (key, [_norm(c) for c in value] if isinstance(value, list) else str(value))


@given(_NODE)
@settings(max_examples=300)
def test_sxp_reads_back_as_written(node: SxpNode) -> None:
    """Any text value (quotes, parentheses, \\r, backslashes) survives a round trip."""
    assert sxp.parse(write_sxp(node)) == [_norm(node)]


def test_sxp_quotes_every_kind_of_white_space() -> None:
    assert write_sxp(("a", "x\ry")) == "(a 'x\ry')"  # bare, it read back as two atoms
    assert write_sxp(("a", "x\x0by")).startswith("(a '")


def test_sxp_refuses_what_is_not_sxp() -> None:
    for bad in ("(a", "(a b c)", "a", "('x' y)", "(a 'b"):
        with pytest.raises(sxp.SxpError):
            sxp.parse(bad)


def test_list_long_is_xms_domain_sxp() -> None:
    row = {"name": "web1", "domid": 3, "uuid": "u-1", "mem_mib": 128, "maxmem_mib": 256,
           "vcpus": 1, "maxvcpus": 2, "letters": "-b----", "cpu_seconds": 1.5,
           "uptime": 12.0, "state": "blocked", "credit": {"weight": 512, "cap": 0},
           "kernel": "/k", "initrd": "/i", "cmdline": "root=/dev/sda1 ro",
           "vcpu_pins": {"1": [0, 1], "0": [1]},
           "config": {"builder": "pv", "on_poweroff": "destroy", "root": "/dev/sda1"},
           "disks": [{"backend": "phy", "path": "/dev/mapper/sys", "target": "sda",
                      "mode": "w", "devtype": "disk"}],
           "vifs": [{"mac": "00:16:3e:00:00:01", "type": "bridge", "bridge": "xenbr0",
                     "tap": "vif3.0", "ip": None}]}
    stopped = {"name": "db1", "domid": None, "uuid": "u-2", "mem_mib": 256, "vcpus": 2,
               "letters": "------", "state": "stopped", "autostart": True, "managed": True,
               "cpu_seconds": 0.0, "config": {"name": "db1", "builder": "pv"}}
    text = sxp.list_long([row, stopped])
    first, second = sxp.parse(text)
    d = dict(first[1])  # type: ignore[arg-type]
    assert first[0] == "domain" and d["domid"] == "3" and d["name"] == "web1"
    assert d["state"] == "-b----" and d["cpu_weight"] == "512"
    assert d["image"] == [("linux", [("kernel", "/k"), ("ramdisk", "/i"),
                                     ("root", "/dev/sda1"), ("args", "root=/dev/sda1 ro")])]
    assert d["cpus"] == [("vcpu0", "1"), ("vcpu1", "0-1")]
    devices = [v for k, v in first[1] if k == "device"]  # type: ignore[union-attr]
    assert devices[0] == [("vbd", [("uname", "phy:/dev/mapper/sys"), ("dev", "sda"),
                                   ("mode", "w")])]
    s = dict(second[1])  # type: ignore[arg-type]
    assert "domid" not in s and s["state"] == "------" and s["autostart"] == "1"


def test_info_has_xms_shape_and_order() -> None:
    text = info_text({"driver": "qemu", "free_memory": 10, "host": "h1", "accelerator":
                      "tcg", "nr_cpus": 2, "home": "/x"})
    assert text.splitlines() == [
        "host                   : h1", "nr_cpus                : 2",
        "free_memory            : 10", "accelerator            : tcg",
        "driver                 : qemu", "home                   : /x"]


# ---- xl's tables --------------------------------------------------------------------------
XL_VCPU_LIST = """\
Name                                ID  VCPU   CPU State   Time(s) Affinity (Hard / Soft)
Domain-0                             0     0    1   r--      12.3  all / all
xg1                                  3     0    0   -b-       1.5  0 / all
xg1                                  3     1    -   --p       0.0  all / all
"""


def test_xl_vcpu_list_parsed() -> None:
    rows = parse_vcpu_list(XL_VCPU_LIST, 2)
    assert [(r.vcpu, r.online, r.cpu, r.running, r.affinity) for r in rows] == [
        (0, True, 1, True, [0, 1]), (0, True, 0, False, [0]), (1, False, None, False,
                                                               [0, 1])]


def test_xl_device_lists_parsed() -> None:
    block = ("Vdev  BE  handle state evt-ch ring-ref BE-path\n"
             "51712 0   3      4     11     8        /local/domain/0/backend/vbd/3/51712\n")
    net = ("Idx BE Mac Addr.         handle state evt-ch   tx-/rx-ring-ref BE-path\n"
           "0   0  00:16:3e:00:00:01     0     4     10   768/769         "
           "/local/domain/0/backend/vif/3/0\n")
    assert parse_block_list(block) == [{"vdev": "51712", "be": "0", "handle": "3",
                                        "state": "4", "evtch": "11", "ring_ref": "8",
                                        "be_path": "/local/domain/0/backend/vbd/3/51712"}]
    assert parse_network_list(net)[0]["ring_ref"] == "768/769"
    assert parse_network_list(net)[0]["mac"] == "00:16:3e:00:00:01"


def test_pins_and_credit_in_xl_cfg() -> None:
    plan = LaunchPlan(spec=DomainSpec(name="x", vcpus=1, maxvcpus=3), rundir=Path("/r"),
                      kernel=Path("/k"), initrd=None, cmdline="",
                      vcpu_pins={1: [0, 1], 2: [7]}, credit={"weight": 512, "cap": 50})
    assert policy_lines(plan, 2) == ['cpus = [ "all", "0-1", "all" ]', "cpu_weight = 512",
                                     "cap = 50"]  # CPU 7: not on this host, left out


# ---- cgroups on a fake sysfs ----------------------------------------------------------------
def test_cgroup_v2_weight_and_cap(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    path = cgroup.apply(1234, "uu", Credit(512, 150), sysfs=tmp_path)
    assert path == tmp_path / "sanvisor" / "uu"
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu"
    assert (tmp_path / "sanvisor" / "cgroup.subtree_control").read_text() == "+cpu"
    got = cgroup.read("uu", sysfs=tmp_path)
    assert got is not None and (got["cpu.weight"], got["cpu.max"], got["cgroup.procs"]) == (
        "200", "150000 100000", "1234")


def test_cgroup_v1_and_none(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.shares").write_text("1024\n")
    ctl = cgroup.find(tmp_path)
    assert ctl is not None and ctl.version == 1
    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(HypervisorError, match="no CPU controller the agent can use"):
        cgroup.require(empty)


# ---- xentop ---------------------------------------------------------------------------------
def _frame(n: int, big: bool = False) -> list[dict[str, Any]]:
    host = {"name": "Domain-0", "domid": 0, "uuid": "0", "letters": "r-----",
            "mem_mib": 2048, "vcpus": 2, "host_mem_kib": 4 << 20,
            "stats": {"cpu_seconds": 100.0 + n, "mem_kib": 2 << 20, "vcpus": 2}}
    doms = [host]
    for i, name in enumerate(("web1", "a-very-long-domain-name", "db")):
        doms.append({"name": name, "domid": i + 1, "uuid": f"u{i}", "letters": "-b----",
                     "mem_mib": 128 * (i + 1), "maxmem_mib": 512, "vcpus": 1,
                     "stats": {"cpu_seconds": (i + 1) * n * 1.0 + (9e6 if big else 0),
                               "mem_kib": (128 * (i + 1)) << 10, "vcpus": 1,
                               "net_tx_bytes": 4096 * n, "net_rx_bytes": 1 << 20,
                               "blk_rd_ops": 5, "blk_wr_ops": 6, "blk_rd_bytes": 1024,
                               "blk_wr_bytes": 2048}})
    return doms


def test_top_fits_80_columns_with_domain0_first() -> None:
    view = top.View(vbds=True, networks=True)
    rows = top.sort_rows(top.rows_of({d["uuid"]: d for d in _frame(1)}, _frame(2), 1.0),
                         view)
    lines = top.table(rows, view)
    assert all(len(ln) <= 80 for ln in lines), max(lines, key=len)
    assert lines[0].split() == ["NAME", "STATE", "CPU(sec)", "CPU(%)", "MEM(k)", "MEM(%)",
                                "VCPUS", "NETTX(k)", "NETRX(k)"]
    assert lines[1].split()[0] == "Domain-0" and lines[1].split()[3] == "100.0"
    assert lines[1].split()[7:] == ["-", "-"]  # no counters for the host
    named = [ln.split()[0] for ln in lines[1:] if not ln.startswith(" " * 11)]
    assert named == ["Domain-0", "a-very-lon", "db", "web1"]  # cut at 10, as xentop
    assert sum(1 for ln in lines if "VBDs RD" in ln) == 3  # -x: under each domain
    assert top.summary(rows, _frame(2), view)[1].startswith("3 domains: 0 running, 3 ")


def test_top_keys_sort_and_quit() -> None:
    view = top.View()
    rows = top.rows_of({d["uuid"]: d for d in _frame(1)}, _frame(2), 1.0)

    def order() -> list[str]:
        return [r["name"] for r in top.sort_rows(rows, view)]

    assert order() == ["Domain-0", "a-very-long-domain-name", "db", "web1"]
    top.on_key(view, "M")
    assert order() == ["Domain-0", "db", "a-very-long-domain-name", "web1"]
    top.on_key(view, "M")  # again: the other way round
    assert order() == ["Domain-0", "web1", "a-very-long-domain-name", "db"]
    top.on_key(view, "C")
    assert view.sort == "cpu_pct" and order()[1] == "db"
    top.on_key(view, "S")
    assert view.sort == "mem_kib"
    assert top.on_key(view, "D") is True
    top.set_delay(view, "0.5\n")
    assert view.delay == 0.5
    top.set_delay(view, "soon")
    assert view.delay == 0.5 and "not a number of seconds" in view.message
    top.on_key(view, "q")
    assert view.done


def test_top_json_frame_keeps_its_keys() -> None:
    import json

    rows = top.rows_of({}, _frame(1), 0.0)
    frame = json.loads(top.json_frame(rows))
    web1 = next(r for r in frame["domains"] if r["name"] == "web1")
    for key in ("state", "cpu_seconds", "cpu_percent", "mem_kib", "vcpus", "rd_bytes_per_s",
                "wr_bytes_per_s", "net_rx_bytes_per_s", "net_tx_bytes_per_s", "mem_percent"):
        assert key in web1
    assert web1["mem_kib"] == 128 << 10


# ---- the event log --------------------------------------------------------------------------
def test_event_log_keeps_lines_and_rotates(tmp_path: Path) -> None:
    log = eventlog.EventLog(tmp_path, max_bytes=200)
    for i in range(12):
        log.append(f"web1: event {i}\nwith a second line")
    text = log.read()
    assert "event 11 with a second line" in text and "event 0 " not in text
    assert all(line.startswith("(") for line in text.splitlines())
    assert log.read(clear=True) == text and log.read() == ""


def test_event_handler_copies_the_agents_records(tmp_path: Path) -> None:
    handler = eventlog.install(tmp_path)
    try:
        logging.getLogger("sanvisor.agent").info("web1: paused -> paused")
        logging.getLogger("sanvisor.drivers.qemu").warning("QEMU pid 7 exited")
        logging.getLogger("sanvisor.agent.api").debug("not an event")
    finally:
        eventlog.uninstall(handler)
    lines = eventlog.EventLog(tmp_path).read().splitlines()
    assert [ln.split(") ", 1)[1] for ln in lines] == [
        "web1: paused -> paused", "warning: QEMU pid 7 exited"]
    assert eventlog.tail(tmp_path / "events.log", 1) == lines[-1] + "\n"


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                  st.integers(-5, 7000), st.floats(),
                  st.text(max_size=8), st.lists(st.integers(-3, 70), max_size=4))


@given(st.dictionaries(st.sampled_from(["weight", "cap", "x"]), _JUNK, max_size=3))
def test_credit_from_anything_is_a_credit_or_one_value_error(d: dict[str, Any]) -> None:
    try:
        c = Credit.from_dict(d)
    except ValueError as exc:
        assert "\n" not in str(exc)
    else:
        assert 1 <= c.weight <= 65535 and 0 <= c.cap <= 6400


@given(st.dictionaries(st.one_of(st.text(max_size=3), st.integers(0, 5)), _JUNK,
                       max_size=3),
       st.dictionaries(st.one_of(st.sampled_from(["weight", "cap"]), st.text(max_size=6)),
                       _JUNK, max_size=3))
@settings(max_examples=200)
def test_a_records_pins_and_credit_from_outside_are_checked(pins: Any, credit: Any) -> None:
    """A save file's or an incoming migration's record: refused in one line, or sane."""
    from sanvisor.agent.records import DomainRecord
    from sanvisor.errors import RecordError

    rec = {"uuid": "12345678-1234-1234-1234-123456789abc", "domid": 3, "state": "running",
           "spec": {"name": "web1", "vcpus": 2, "maxvcpus": 4}, "vcpu_pins": {"1": [0]},
           "credit": {"weight": 512, "cap": 0}}
    assert DomainRecord.from_untrusted(rec).credit == {"weight": 512, "cap": 0}  # the base
    rec.update(vcpu_pins=pins, credit=credit)
    try:
        got = DomainRecord.from_untrusted(rec)
    except RecordError as exc:
        assert "\n" not in str(exc)
    else:
        assert all(k.isdigit() and int(k) < 4 and v for k, v in got.vcpu_pins.items())
        if got.credit:  # what the agent does with it (agent/cpus.py)
            Credit(**got.credit).check(maxvcpus=got.spec.maxvcpus)


# ---- the command line, refusals before any agent is asked ---------------------------------
@pytest.mark.parametrize(("argv", "status", "says"), [
    (["shutdown"], 2, "give a domain, or -a"),
    (["reboot", "-a", "web1"], 2, "give a domain, or -a"),
    (["destroy", "-f", "Domain-0"], 1, "Domain-0 is this host"),
    (["vcpu-pin", "web1", "0", "0-"], 2, "vcpu-pin: cpus: '0-' is not a CPU"),
    (["vcpu-pin", "web1", "one", "0"], 2, "vcpu: 'one' is not a vCPU number or all"),
    (["sched-credit", "-w", "300"], 2, "-w and -c need -d DOM"),
    (["sched-credit", "-d", "web1", "-w", "heavy"], 2, "invalid int value"),
    (["top", "-d", "0"], 2, "positive delay"),
    (["trigger", "web1", "init"], 2, "invalid choice"),
    (["log", "-n", "-3"], 2, "lines: -3 is negative"),
])
def test_bad_input_is_refused_in_one_line(argv: list[str], status: int, says: str,
                                          tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from sanvisor.cli import main as climain

    try:
        got = climain.main(["--home", str(tmp_path), *argv])
    except SystemExit as exc:  # argparse's own usage errors
        got = int(exc.code or 0)
    err = capsys.readouterr().err
    assert got == status and says in err, err
    assert len([ln for ln in err.splitlines() if "error: " in ln]) == 1
