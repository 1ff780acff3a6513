"""multipath.conf: parsed and resolved as multipath-tools 0.9.4 does it.

Unit tests; property tests (hypothesis: any text gives a conf or a one-line
ConfigError; regexes behave as glibc's regcomp/regexec, which multipath-tools
uses); and, as root with multipath-tools installed, every resolved setting and
blacklist decision compared with what `multipath -t` prints for the same file
(run in a private mount namespace over an overlay of /etc: the host is untouched).
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from sanvisor.errors import ConfigError
from sanvisor.model.diskspec import sd_name
from sanvisor.storage.mpconf import MultipathConf, parse_mpconf
from sanvisor.storage.posixre import compile_ere
from tests.storage.multipath_tools import (
    glibc_search,
    multipath_t,
    needs_glibc,
    needs_multipath,
    tool_blacklisted,
    tool_view,
)

GOOD = """
# the pool's multipath.conf (the seed's section VI-A fix)
defaults {
    user_friendly_names yes
    polling_interval 0.5
    no_path_retry 4
}
blacklist {
    wwid "3600508b.*"
}
multipaths {
    multipath {
        wwid 360060e80d60095920000000000000001
        alias domU-systeme
        path_grouping_policy failover
    }
}
devices {
    device {
        vendor "HITACHI"
        product "DF600F"
        path_grouping_policy multibus
        path_selector "round-robin 0"
        failback manual
    }
}
"""


def test_settings_precedence_and_aliases() -> None:
    conf = parse_mpconf(GOOD)
    assert conf.user_friendly_names
    assert conf.alias_for("360060e80d60095920000000000000001") == "domU-systeme"
    s = conf.settings_for("360060e80d60095920000000000000001", "HITACHI", "DF600F")
    assert s.path_grouping_policy == "failover"  # multipaths beats devices
    assert s.failback == "manual" and s.polling_interval == 0.5
    assert s.features() == "1 queue_if_no_path"
    other = conf.settings_for("360060e80d60095920000000000000002", "HITACHI", "DF600F")
    assert other.path_grouping_policy == "multibus"
    assert conf.blacklisted("3600508b1001c0000") and not conf.blacklisted("36006")


@pytest.mark.parametrize("text, line, message", [
    ("defaults {\n  polling_interval soon\n}\n", 2, "not a positive number"),
    ("defaults {\n  user_friendly_names yes\n", 1, "is not closed"),
    ("}\n", 1, "without an open section"),
    ("defaults {\n  path_grouping_policy sometimes\n}\n", 2, "not failover or multibus"),
    ("multipaths {\n multipath {\n  alias x\n }\n}\n", 2, "without a wwid"),
    ("defaults {\n  no_path_retry \"later\n}\n", 2, "No closing quotation"),
    ("frobnicate {\n}\n", 1, "unexpected section"),
    ("multipaths {\n multipath {\n  wwid 3a\n  alias db\n }\n multipath {\n  wwid 3b\n"
     "  alias db\n }\n}\n", 6, "alias db is given to two WWIDs: 3a (line 2) and 3b"),
])
def test_errors_name_file_and_line(text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_mpconf(text, "pool.conf")
    assert str(exc.value).startswith(f"pool.conf:{line}: ")
    assert message in str(exc.value)


def test_unknown_keywords_warn() -> None:
    conf = parse_mpconf("defaults {\n  fancy_option 3\n}\n", "m.conf")
    assert conf.warnings == ["m.conf:2: unknown keyword 'fancy_option' in defaults (ignored)"]


def test_scsi_names() -> None:
    assert [sd_name(n) for n in (0, 1, 25, 26, 27)] == ["sda", "sdb", "sdz", "sdaa", "sdab"]


# ---- resolution, as propsel.c does it ----------------------------------------------------
WWID1, WWID2 = "360060e80d60095920000000000000001", "360060e80d60095920000000000000002"
DATA = Path(__file__).parent / "data" / "multipath"
SEED = (Path(__file__).parents[2] / "examples" / "multipath.conf").read_text()
POOL = (DATA / "pool.conf").read_text()
OVERRIDES = (DATA / "overrides.conf").read_text()
QUIRKS = (DATA / "quirks.conf").read_text()
DF = 'devices {\n  device {\n    vendor "HITACHI"\n    product "^DF"\n    rr_min_io 100\n  }\n}\n'
CONFIGS = {"seed": SEED, "good": GOOD, "pool": POOL, "overrides": OVERRIDES,
           "quirks": QUIRKS, "df": DF, "empty": ""}
DEVICES = [("HITACHI", "DF600F", None), ("HITACHI", "DF600F", "0000"),
           ("HITACHI", "DF500F", None), ("HITACHI", "OPEN-V", None), ("SANVISOR", "LAB", None)]
WWIDS = [WWID1, WWID2, "360060e80d60095920000000000000003"]


def view(conf: MultipathConf, wwid: str, vendor: str, product: str,
         revision: str | None = None) -> dict[str, Any]:
    s = conf.settings_for(wwid, vendor, product, revision)
    return {"path_grouping_policy": s.path_grouping_policy, "path_selector": s.path_selector,
            "failback": s.failback, "no_path_retry": s.no_path_retry, "features": s.features(),
            "rr_weight": s.rr_weight, "rr_min_io": s.rr_min_io, "rr_min_io_rq": s.rr_min_io_rq,
            "user_friendly_names": s.user_friendly_names, "alias_prefix": s.alias_prefix,
            "path_checker": s.path_checker, "prio": s.prio,
            "polling_interval": s.polling_interval, "alias": conf.alias_for(wwid)}


def test_the_built_in_table_decides_for_the_lab_array_without_a_file() -> None:
    s = view(parse_mpconf(""), WWID1, "HITACHI", "DF600F")
    assert (s["path_grouping_policy"], s["no_path_retry"], s["failback"], s["prio"]) == \
        ("multibus", "queue", "immediate", "hds")  # ^DF600F, then ^DF
    assert (s["path_selector"], s["features"], s["polling_interval"]) == \
        ("service-time 0", "1 queue_if_no_path", 5.0)
    assert view(MultipathConf(), WWID1, "HITACHI", "DF600F") == s
    other = view(parse_mpconf(""), WWID1, "SANVISOR", "LAB")
    assert (other["path_grouping_policy"], other["no_path_retry"], other["failback"]) == \
        ("failover", "fail", "manual")


def test_precedence() -> None:
    conf = parse_mpconf(POOL, "pool.conf")
    data = conf.settings_for(WWID2, "HITACHI", "DF600F", "0000")
    assert (data.path_grouping_policy, data.no_path_retry, data.failback) == \
        ("failover", "2", "manual")  # its multipath section
    assert data.origins["no_path_retry"] == "multipaths section"
    sys_ = conf.settings_for(WWID1, "HITACHI", "DF600F", "0000")
    # the user's device entry (revision 0000), then the built-in ^DF600F and ^DF: the
    # built-in table beats the defaults section (no_path_retry, failback)
    assert (sys_.path_selector, sys_.rr_min_io, sys_.path_grouping_policy) == \
        ("round-robin 0", 100, "multibus")
    assert sys_.origins["path_selector"] == "device 'HITACHI' 'DF600F' (line 34)"
    assert (sys_.no_path_retry, sys_.failback) == ("queue", "immediate")
    assert sys_.origins["no_path_retry"] == "device 'HITACHI' '^DF' (built-in)"
    rev1 = conf.settings_for(WWID1, "HITACHI", "DF600F", "0001")
    assert rev1.path_selector == "service-time 0"  # revision 0000 only
    conf = parse_mpconf(OVERRIDES)
    s = conf.settings_for(WWID2, "HITACHI", "DF600F")
    assert (s.no_path_retry, s.features(), s.user_friendly_names) == ("fail", "0", True)
    # the user's "^DF" took the built-in one's place, after ^DF600F: it wins now
    assert (s.path_grouping_policy, s.prio) == ("multibus", "hds")
    assert [d.product for d in conf.hw_matches("HITACHI", "DF600F")] == ["^DF", "^DF600F"]
    db = conf.settings_for(WWID1, "HITACHI", "DF600F")
    assert (db.no_path_retry, db.features(), db.alias_prefix) == \
        ("queue", "1 queue_if_no_path", "san")
    # a file entry with the built-in "^DF" strings replaces it and then beats ^DF600F
    df = parse_mpconf(DF).settings_for(WWID1, "HITACHI", "DF600F")
    assert (df.path_grouping_policy, df.rr_min_io, df.no_path_retry) == \
        ("group_by_prio", 100, "queue")
    legacy = conf.settings_for(WWID2, "SANVISOR", "LAB")
    assert (legacy.no_path_retry, legacy.base_features) == ("fail", "0")  # overrides win


def test_legacy_features_count_as_no_path_retry_queue() -> None:
    conf = parse_mpconf('defaults {\n features "1 queue_if_no_path"\n}\n')
    s = conf.settings_for(WWID1, "SANVISOR", "LAB")
    assert (s.no_path_retry, s.base_features, s.features()) == ("queue", "0", "1 queue_if_no_path")
    conf = parse_mpconf('defaults {\n features "2 pg_init_retries 50"\n}\n')
    assert conf.settings_for(WWID1, "HITACHI", "DF600F").features() == \
        "3 pg_init_retries 50 queue_if_no_path"


def test_blacklist_criteria_and_exceptions() -> None:
    conf = parse_mpconf(POOL)
    assert conf.blacklisted("3600508b1001c0000000000000000001")
    assert not conf.blacklisted("3600508b1001c000000000000000beef")  # the exception
    assert conf.blacklisted(WWID1, "COMPAQ", "MSA1000 VOLUME")
    assert conf.blacklisted(WWID1, devnode="hda") and conf.blacklisted(WWID1, devnode="vdb")
    assert not conf.blacklisted(WWID1, "HITACHI", "DF600F", "sdaa", "scsi:fcp")
    # an exception only saves a path from its own criterion
    conf = parse_mpconf('blacklist {\n devnode "^sd[bc]$"\n wwid "^36006"\n}\n'
                        f'blacklist_exceptions {{\n devnode "!^sdc"\n wwid "{WWID2}"\n}}\n')
    assert conf.blacklist_reason(WWID1, devnode="sdb") == "wwid blacklisted by '^36006' (line 3)"
    assert conf.blacklist_reason(WWID2, devnode="sdb") is None
    assert conf.blacklist_reason(WWID2, devnode="sdc") == \
        "device node blacklisted by '^sd[bc]$' (line 2)"


def test_no_regex_can_hang_the_agent() -> None:
    # Python's backtracking re takes minutes on these; glibc and the automaton do not
    conf = parse_mpconf('blacklist {\n wwid "(.*)*x"\n devnode "(s|sd|sdb)*q"\n}\n')
    t0 = time.monotonic()
    assert not conf.blacklisted(WWID1 * 3, "HITACHI", "DF600F", "sdb" * 12)
    assert time.monotonic() - t0 < 1


def test_merges_and_warnings_as_multipath_tools_reads_them() -> None:
    conf = parse_mpconf(QUIRKS, "q.conf")
    s = view(conf, WWID1, "HITACHI", "DF600F")
    assert (s["alias"], s["path_grouping_policy"], s["no_path_retry"]) == ("db", "multibus", "1")
    assert (s["failback"], s["rr_weight"], s["rr_min_io"], s["rr_min_io_rq"]) == \
        ("followover", "priorities", 1000, 1)
    assert (s["user_friendly_names"], s["polling_interval"]) == (True, 7.0)
    lines = sorted({int(w.split(":")[1]) for w in conf.warnings})
    assert lines == [4, 5, 6, 7, 9, 11, 16, 17, 19, 21, 30], conf.warnings


def test_tokens_as_multipath_tools_splits_them() -> None:
    conf = parse_mpconf('defaults {  # comment\n'
                        '\tpath_selector "queue-length 0" ! comment\n'
                        '\tprio "a""b"\n'
                        '\tuser_friendly_names\xa0yes\r trailing\n}\n', "t.conf")
    assert conf.defaults["path_selector"] == "queue-length 0"
    assert conf.defaults["prio"] == 'a"b' and conf.defaults["user_friendly_names"] == "yes"
    with pytest.raises(ConfigError, match="features"):  # "" is the value: no count
        parse_mpconf('defaults {\n features ""\x00"1 queue_if_no_path"\n}\n')


@pytest.mark.parametrize("text, line, message", [
    ("defaults {\n  path_selector round-robin 0\n}\n", 2, "count the words"),
    ('defaults {\n  features "1 queue_if_no_path foo"\n}\n', 2, "count the words"),
    ('blacklist {\n  wwid "3600(.*"\n}\n', 2, "not a regular expression"),
    ('blacklist {\n device {\n  vendor "HITACHI["\n }\n}\n', 3, "not a regular expression"),
    ('devices {\n device {\n  vendor "HITACHI("\n  product DF\n }\n}\n', 3, "regular exp"),
    ("devices {\n device {\n  vendor HITACHI\n }\n}\n", 2, "without product"),
    ("defaults {\n  polling_interval 0\n}\n", 2, "not a positive number"),
    ("defaults {\n  polling_interval 1e3\n}\n", 2, "not a positive number"),
    ("defaults {\n  polling_interval 4294967296\n}\n", 2, "more seconds"),
    ("defaults {\n  find_multipaths maybe\n}\n", 2, "strict, greedy"),
    ('defaults {\n  alias_prefix "a/b"\n}\n', 2, "slash"),
    ("multipaths {\n multipath {\n  wwid 3a\n  alias a\n }\n multipath {\n  wwid 3a\n"
     "  alias b\n }\n}\n", 6, "wwid 3a has two aliases: a (line 2) and b"),
    ("defaults { polling_interval 1 }\n", 1, "'{' at the end"),
    ("defaults {\n" + "#" * 1100 + "\n}\n", 2, "longer than"),
])
def test_refusals(text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_mpconf(text, "r.conf")
    assert str(exc.value).startswith(f"r.conf:{line}: ") and message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_fractional_polling_interval_is_the_lab_s_extension() -> None:
    conf = parse_mpconf("defaults {\n  polling_interval 0.25\n}\n", "f.conf")
    assert conf.settings_for(WWID1, "HITACHI", "DF600F").polling_interval == 0.25
    assert conf.warnings[0].startswith("f.conf:2: polling_interval 0.25: multipath-tools")


@needs_glibc
@settings(max_examples=2000, deadline=None, database=None)
@given(st.text(alphabet="ab1()|*+?{},[]^$-.:\\<>wB", max_size=10),
       st.lists(st.text(alphabet="ab1-]{}\\:. ", max_size=6), min_size=1, max_size=4))
@example("[[:digit:]]+$", ["ab12", "12a"])
@example("a**", ["a"])
@example("(a)|\\1", [""])
@example("a{1", ["a{1"])
@example("[\\.]", ["\\", "."])
def test_regexes_are_glibc_s(pattern: str, subjects: list[str]) -> None:
    try:
        ours = compile_ere(pattern)
    except ValueError:
        assert glibc_search(pattern, "") is None, f"glibc compiles {pattern!r}"
        return
    assert glibc_search(pattern, "") is not None, f"glibc refuses {pattern!r}"
    for s in subjects:
        assert bool(ours.search(s)) == glibc_search(pattern, s), (pattern, s)


# ---- robustness: any input gives a conf or one line naming file:line --------------------
def _parse_or_error(text: str) -> MultipathConf | None:
    try:
        conf = parse_mpconf(text, "fuzz.conf")
    except ConfigError as exc:
        m = re.match(r"fuzz\.conf:(\d+): \S", str(exc))
        assert m and "\n" not in str(exc), str(exc)
        assert 1 <= int(m[1]) <= text.count("\n") + 1
        return None
    for wwid, vendor, product, rev in [(WWID1, "HITACHI", "DF600F", "0000"),
                                       ("", "", "", None), ("x", "\x00é", "{", "")]:
        s = conf.settings_for(wwid, vendor, product, rev)
        assert math.isfinite(s.polling_interval) and s.polling_interval > 0
        s.features()
        conf.blacklist_reason(wwid, vendor, product, "sdb", "scsi:fcp")
        conf.alias_for(wwid)
    return conf


_SECTIONS = ["defaults", "blacklist", "blacklist_exceptions", "devices", "device", "multipaths",
             "multipath", "overrides", "protocol", "frobnicate"]
_KEYS = ["polling_interval", "no_path_retry", "failback", "path_grouping_policy", "features",
         "path_selector", "rr_min_io", "rr_weight", "user_friendly_names", "wwid", "alias",
         "vendor", "product", "revision", "devnode", "property", "product_blacklist",
         "alias_prefix", "checker", "find_multipaths", "prio", "fancy"]
_VALUES = ["1", "0", "-1", "0.5", "nan", "inf", "1e999", "queue", "fail", "immediate", "manual",
           "multibus", "failover", "group_by_prio", '"round-robin 0"', '"1 queue_if_no_path"',
           '"0"', '""', '"', "HITACHI", '"^DF"', "(", "[[:digit:]", "a{2,1}", "!^sd", "yes",
           "db", "36006", "x y", "{", "}", "#", "\\", "é"]
_LINE = st.one_of(
    st.tuples(st.sampled_from(_SECTIONS), st.just("{")).map(" ".join),
    st.just("}"), st.just(""),
    st.tuples(st.sampled_from(_KEYS), st.sampled_from(_VALUES)).map(" ".join),
    st.text(max_size=20))


@settings(max_examples=1500, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_LINE, max_size=30).map("\n".join))
@example(GOOD)
@example(QUIRKS)
@example("defaults {\n polling_interval 1e308\n}\n")
@example("blacklist {\n wwid (\n}\n")
@example('blacklist {\n device {\n  vendor "["\n }\n}\n')
def test_config_like_text_never_raises_anything_else(text: str) -> None:
    _parse_or_error(text)


@settings(max_examples=1000, deadline=None, database=None)
@given(st.text())
@example("\x00{\n")
@example('"')
@example("defaults {\n\r}\n")
def test_any_text_never_raises_anything_else(text: str) -> None:
    _parse_or_error(text)


@settings(max_examples=300, deadline=None, database=None)
@given(st.sampled_from(["blacklist/wwid", "blacklist/devnode", "blacklist_exceptions/wwid",
                        "blacklist/property", "blacklist/device/vendor",
                        "blacklist_exceptions/device/product", "devices/device/product"]),
       st.text(alphabet="ab1()|*+?{},[]^$-.:\\", min_size=1, max_size=8),
       st.integers(0, 3))
@example("blacklist/wwid", "3600(.*", 0)
def test_a_regex_that_does_not_compile_is_one_line_naming_file_and_line(
        where: str, pattern: str, pad: int) -> None:
    try:
        compile_ere(pattern)
    except ValueError:
        pass
    else:
        assume(False)
    *sections, key = where.split("/")
    extra = ['product "DF"' if key == "vendor" else 'vendor "HITACHI"'] \
        if sections[-1] == "device" and sections[0] == "devices" else []
    quoted = '"' + pattern.replace('"', '""') + '"'
    lines = ["# comment"] * pad + [f"{s} {{" for s in sections] + [f"{key} {quoted}"] + extra \
        + ["}"] * len(sections)
    with pytest.raises(ConfigError) as exc:
        parse_mpconf("\n".join(lines) + "\n", "bad.conf")
    assert str(exc.value).startswith(f"bad.conf:{pad + len(sections) + 1}: {key}: ")
    assert "not a regular expression" in str(exc.value) and "\n" not in str(exc.value)


_NON_FINITE = st.one_of(
    st.sampled_from(["nan", "NaN", "-nan", "inf", "-inf", "+inf", "Infinity", "INF", "1e999",
                     "-1e999", "1e309", "nan(0x1)", "0x1p5000", "1_000", "∞"]),
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda f: not math.isfinite(f))
    .map(repr))


@settings(max_examples=200, deadline=None, database=None)
@given(_NON_FINITE, st.sampled_from(["polling_interval", "no_path_retry", "failback",
                                     "rr_min_io", "rr_min_io_rq"]), st.integers(0, 3))
def test_non_finite_numbers_are_refused_in_one_line(value: str, key: str, pad: int) -> None:
    text = "\n" * pad + f'defaults {{\n    {key} "{value}"\n}}\n'
    with pytest.raises(ConfigError) as exc:
        parse_mpconf(text, "n.conf")
    assert str(exc.value).startswith(f"n.conf:{pad + 2}: {key}: ") and "\n" not in str(exc.value)


# ---- against multipath-tools itself: `multipath -t` ---------------------------------------
@pytest.fixture(scope="module")
def builtin_t() -> dict[str, Any]:
    return multipath_t("")[0]


@needs_multipath
@needs_glibc
def test_builtin_defaults_and_hitachi_entries_are_multipath_tools_own(
        builtin_t: dict[str, Any]) -> None:
    conf = parse_mpconf("")
    hitachi = [d for d in builtin_t["devices"] if glibc_search(d["vendor"], "HITACHI")]
    assert [(d.vendor, d.product, d.settings) for d in conf.hwtable] == \
        [(d.pop("vendor"), d.pop("product"), d) for d in hitachi]
    from sanvisor.storage.hwtable import BUILTIN_DEFAULTS
    assert {k: builtin_t["defaults"][k] for k in BUILTIN_DEFAULTS} == BUILTIN_DEFAULTS
    assert builtin_t["blacklist"]["devnode"] == [r.text for r in conf.blacklist.devnode]
    assert builtin_t["blacklist_exceptions"]["property"] == \
        [r.text for r in conf.exceptions.property]


@needs_multipath
@needs_glibc
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_settings_and_blacklist_are_what_multipath_t_shows(name: str) -> None:
    text = CONFIGS[name]
    conf = parse_mpconf(text, name)
    t, messages = multipath_t(text)
    # what multipath-tools complains about, sanvisor reports too (with the line)
    tool_lines = {int(n) for n in re.findall(r"line (\d+)", messages)}
    assert tool_lines <= {int(w.split(":")[1]) for w in conf.warnings}, (messages, conf.warnings)
    # the one extension: a fractional polling_interval (warned; the tool's reading of
    # it, "never", is in test_a_fractional_polling_interval_means_never...)
    fractional = "invalid value for polling_interval" in messages
    for wwid in WWIDS:
        for vendor, product, revision in DEVICES:
            ours, theirs = (view(conf, wwid, vendor, product, revision),
                            tool_view(t, wwid, vendor, product, revision))
            if fractional:
                del ours["polling_interval"], theirs["polling_interval"]
            assert ours == theirs, (wwid, vendor, product, revision)
            for devnode in ("sdb", "sdaa", "hda", "dm-0"):
                for protocol in ("scsi:fcp", "scsi:iscsi"):
                    assert conf.blacklisted(wwid, vendor, product, devnode, protocol) == \
                        tool_blacklisted(t, wwid, vendor, product, devnode, protocol)
    for wwid, vendor, product in [("3600508b1001c0000000000000000001", "HITACHI", "DF600F"),
                                  ("3600508b1001c000000000000000beef", "HITACHI", "DF600F"),
                                  (WWID1, "COMPAQ", "MSA1000 VOLUME")]:
        assert conf.blacklisted(wwid, vendor, product, "sdb", "scsi:fcp") == \
            tool_blacklisted(t, wwid, vendor, product, "sdb", "scsi:fcp")


@needs_multipath
@pytest.mark.parametrize("text, line", [
    ("defaults {\n  polling_interval soon\n}\n", 2),
    ("defaults {\n  polling_interval nan\n}\n", 2),
    ("defaults {\n  polling_interval 1e3\n}\n", 2),
    ("defaults {\n  path_grouping_policy sometimes\n}\n", 2),
    ("defaults {\n  no_path_retry inf\n}\n", 2),
    ("defaults {\n  failback soon\n}\n", 2),
    ("defaults {\n  rr_weight heavy\n}\n", 2),
    ("defaults {\n  rr_min_io nan\n}\n", 2),
    ("defaults {\n  user_friendly_names maybe\n}\n", 2),
    ("defaults {\n  path_selector round-robin 0\n}\n", 2),
    ('defaults {\n  features "1 queue_if_no_path foo"\n}\n', 2),
    ('defaults {\n  no_path_retry "queue\n}\n', 2),
    ("defaults {\n  find_multipaths maybe\n}\n", 2),
    ('defaults {\n  alias_prefix "a/b"\n}\n', 2),
    ('blacklist {\n  wwid "3600(.*"\n}\n', 2),
    ('blacklist {\n  device {\n    vendor "HITACHI["\n  }\n}\n', 3),
])
def test_what_sanvisor_refuses_multipath_tools_rejects(text: str, line: int) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_mpconf(text, "r.conf")
    assert str(exc.value).startswith(f"r.conf:{line}: ")
    try:
        _, messages = multipath_t(text)
    except AssertionError as failed:  # it would not load the file at all
        messages = str(failed)
    assert re.search(rf"line {line}\b", messages), messages


@needs_multipath
def test_a_fractional_polling_interval_means_never_to_multipath_tools() -> None:
    t, messages = multipath_t("defaults {\n  polling_interval 0.5\n}\n")
    assert 'invalid value for polling_interval: "0.5"' in messages
    assert t["defaults"]["polling_interval"] == "4294967294"  # 0.9.4: UINT_MAX - 1 seconds
