"""Property-based fuzzing of the xm config parser (model/config.py, model/diskspec.py).

Whatever the text of a config file, its KEY=VALUE overrides, or a disk or vif spec in
it: the parser gives a DomainSpec that obeys every rule a spec has (the same checks
an API body or a save file goes through), or a ConfigError of one line that names
the file (and the line, when the fault is on one); never another exception. A bare
``parse_disk``/``parse_vif`` gives its spec or a one-line ValueError (the parser adds
the place).

The inputs that broke earlier versions are kept as explicit examples (the regression
corpus, ``CORPUS``). Runs are derandomized (repeatable); set SANVISOR_FUZZ=explore
for a random, longer search.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sanvisor.errors import ConfigError
from sanvisor.model.config import COMMAND_LINE, parse_config, parse_disk, parse_vif
from sanvisor.model.domain import DiskSpec, DomainSpec, VifSpec

EXPLORE = os.environ.get("SANVISOR_FUZZ") == "explore"
FUZZ = settings(max_examples=5000 if EXPLORE else 300, derandomize=not EXPLORE,
                database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FILE = "fuzz.cfg"

# ---- what a config looks like ----------------------------------------------------------
KEYS = ["name", "memory", "maxmem", "vcpus", "maxvcpus", "kernel", "ramdisk", "root",
        "extra", "cmdline", "uuid", "disk", "vif", "on_poweroff", "on_reboot", "on_crash",
        "restart", "builder", "type", "bootloader", "vnc"]
WORDS = ["web1", "destroy", "restart", "preserve", "onreboot", "always", "never", "linux",
         "hvm", "pv", "pvh", "generic", "rename-restart", "soft-reset", "coredump-destroy",
         "6f1d7a0e-8a6b-4c3e-9a59-2c1f3b8e4d10", "root=/dev/xvda1 ro", "/boot/vmlinuz",
         "", " ", "\\", "\\n", "\\x00", "\\777", "\\q", "'", '"', "\n", "\r", "\t", "\x00",
         "\u2028", "\x85", "\xa0", "\xe9", "\uff11", "\u0661\u0662", "\xb2"]
NUMBERS = ["0", "1", "-1", "128", "0x80", "0X1f", "-0x10", "1e3", "1.5", "1e999", "-1e999",
           "1" * 4301, "9" * 400, "0x" + "f" * 400, "1_000", "00", "0x", "1e", "1.2.3",
           "4" + "0" * 20, str(1 << 40), str(1 << 63), "-" + "9" * 30]
PREFIXES = ["", "phy:", "file:", "tap:aio:", "tap:qcow2:", "tap2:tapdisk:aio:", "raw:",
            "nbd:", "nbd://", "NBD:", "qcow2:", "aio:", "x:", "phy:phy:"]
PATHS = ["/dev/sdb", "sdb", "/var/lib/xen/images/a.img", "", "mapper/x", "host 10809",
         "10.0.0.1:10809", "[::1]:10809:exportname=x", "host:99999", "[::1]", "host/exp",
         "host:\u0661\u0662", "host:\xb2", "[fe80::1%eth0]", "h:" + "9" * 4301]
VDEVS = ["xvda", "sda1", "hdc:cdrom", "xvdb:disk", "sdz15", "sdaa", "xvda16", "xvda0",
         "ioemu:hda", "xvda:r", "xvda:w!", "xvd", "", "vdA", "sd" + "a" * 3, "xvda\n"]
MODES = ["w", "r", "rw", "ro", "w!", "", "x", "W"]
DISK_KV = ["target=", "vdev=", "access=", "format=", "devtype=", "backendtype=",
           "cdrom", "discard", "no-discard", "direct-io-safe", "script=", "Foo="]
VIF_KEYS = ["mac", "bridge", "model", "ip", "gateway", "vifname", "type", "nat", "user",
            "script", "rate", "MAC", ""]
VIF_VALUES = ["00:16:3e:00:00:01", "01:00:5e:00:00:01", "00:16:3e:00:00:01\n", "xenbr0",
              "lo", "e1000", "virtio", "10.0.0.2/24", "10.0.0.1", "::1", "1.2.3.4 5.6.7.8",
              "bridge", "nat", "user", "1", "0", "yes", "vif-nat", "", "eth0\n",
              "a" * 16, "x y", "fe80::1%eth0", "10.0.0.300"]


def _rendered(text: str, quote: str) -> str:
    """``text`` as the source of a quoted string (escaped, or raw: maybe malformed)."""
    return quote + text.replace("\\", "\\\\").replace(quote, "\\" + quote).replace(
        "\n", "\\n") + quote


bits = st.sampled_from(WORDS) | st.text(max_size=12)
# a valid word with a control or odd character before, inside or after it
tainted = st.builds(lambda w, c, at: w[:at] + c + w[at:], st.sampled_from(
    ["web1", "xvda", "sda1", "xenbr0", "eth0", "00:16:3e:00:00:01", "10.0.0.2", "w", "1"]),
    st.sampled_from(["\n", "\r", "\t", "\x00", " ", "\x0b", "\u2028", "\x85", ","]),
    st.integers(0, 20))
disk_specs = st.builds(
    lambda pre, path, vdev, mode, extra, sep: sep.join(
        [pre + path, vdev, mode, *extra]),
    st.sampled_from(PREFIXES), st.sampled_from(PATHS) | st.text(max_size=10),
    st.sampled_from(VDEVS) | st.text(max_size=6) | tainted, st.sampled_from(MODES),
    st.lists(st.builds(lambda k, v: k + v if k.endswith("=") else k,
                       st.sampled_from(DISK_KV), st.sampled_from(PATHS + VDEVS + MODES)
                       | bits), max_size=3),
    st.sampled_from([",", ", ", ",,", " , "]))
vif_specs = st.lists(
    st.builds(lambda k, v, eq: f"{k}{eq}{v}", st.sampled_from(VIF_KEYS) | st.text(max_size=5),
              st.sampled_from(VIF_VALUES) | bits | tainted,
              st.sampled_from(["=", " = ", "", "=="])),
    max_size=5).map(",".join)
strings = st.one_of(st.sampled_from(WORDS), st.text(max_size=20), tainted, disk_specs,
                    vif_specs)
string_literals = st.builds(_rendered, strings, st.sampled_from(["'", '"']))
raw_literals = st.builds(lambda q, t, q2: q + t + q2, st.sampled_from(["'", '"']),
                         st.text(max_size=12), st.sampled_from(["'", '"', ""]))
scalars = st.one_of(string_literals, string_literals, raw_literals,
                    st.sampled_from(NUMBERS), st.integers().map(str),
                    st.floats(allow_nan=False).map(repr))
seps = st.sampled_from([",", ", ", ",\n", " ,", ",,", "\n", ""])
lists = st.builds(lambda items, seps_, close: "[" + "".join(
    i + s for i, s in zip(items, seps_, strict=False)) + close,
    st.lists(scalars, max_size=4), st.lists(seps, min_size=4, max_size=4),
    st.sampled_from(["]", "]", "", "]]", "\n]"]))
values = st.one_of(scalars, lists, st.sampled_from(["", "[", "]", "=", "nan", "None",
                                                    "True", "x", "[[1]]", "(1)"]))
statements = st.builds(
    lambda key, eq, value, end: f"{key}{eq}{value}{end}",
    st.sampled_from(KEYS) | st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
    | st.text(max_size=4),
    st.sampled_from([" = ", "=", " ", "==", " =\n"]), values,
    st.sampled_from(["\n", "\n", ";", "; ", " # comment\n", "", "\r\n", "\\\n"]))
configs = st.builds(lambda head, body: head + "".join(body),
                    st.sampled_from(["", "name = 'web1'\n", 'name="a"\nmemory=128\n']),
                    st.lists(statements, max_size=8))
# one statement per key, each with values meant for it (near misses included)
_lit = st.builds(_rendered, st.sampled_from(WORDS) | tainted | st.text(max_size=8),
                 st.sampled_from(["'", '"']))
_str_of = lambda *xs: st.builds(_rendered, st.sampled_from(xs) | tainted,  # noqa: E731
                                st.sampled_from(["'", '"']))
_num = st.sampled_from(NUMBERS) | st.integers(-(1 << 70), 1 << 70).map(str)
_listed = lambda items: st.lists(items, min_size=1, max_size=3).map(  # noqa: E731
    lambda xs: "[ " + ", ".join(xs) + " ]")
PER_KEY = {
    "name": _str_of("web1", "a" * 64, "a" * 65, "-x", "x.y_z-1", "Domain-0"),
    "memory": _num | _str_of("128", "0x80", "128M"), "maxmem": _num, "vcpus": _num,
    "maxvcpus": _num | _str_of("64", "65"),
    "kernel": _lit, "ramdisk": _lit, "root": _lit, "extra": _lit,
    "uuid": _str_of("6f1d7a0e-8a6b-4c3e-9a59-2c1f3b8e4d10", "6F1D7A0E8A6B4C3E9A592C1F3B8E4D10",
                    "{6f1d7a0e-8a6b-4c3e-9a59-2c1f3b8e4d10}", "urn:uuid:x"),
    "disk": _listed(st.builds(_rendered, disk_specs, st.just("'"))),
    "vif": _listed(st.builds(_rendered, vif_specs, st.just("'"))),
    "on_poweroff": _str_of("destroy", "preserve", "restart"),
    "on_reboot": _str_of("restart", "rename-restart"), "on_crash": _str_of("coredump-destroy"),
    "restart": _str_of("onreboot", "always", "never"),
    "builder": _str_of("linux", "hvm", "generic"), "type": _str_of("pv", "pvh", "hvm"),
}
keyed_configs = st.fixed_dictionaries({"name": PER_KEY["name"]}, optional={
    k: v | values for k, v in PER_KEY.items() if k != "name"}).map(
    lambda d: "".join(f"{k} = {v}\n" for k, v in d.items()))
overrides = st.lists(st.one_of(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS),
                                         values | strings), st.text(max_size=16)),
                     max_size=3)


# real configs, mutated: a character inserted, deleted or replaced here and there
ROOT = Path(__file__).resolve().parents[2]
REAL = [f.read_text() for f in (ROOT / "examples" / "web1.cfg", ROOT / "examples" / "seed-vg.cfg",
                                ROOT / "tests" / "unit" / "data" / "seed-vg.cfg")]
_edit = st.tuples(st.sampled_from(["insert", "delete", "replace"]), st.integers(0, 1 << 16),
                  st.sampled_from([*"'\"[],;=#\n\\ 0x-:", "\x00", "\r", "\u2028", "\xe9"])
                  | st.characters())


def _mutate(text: str, edits: list[tuple[str, int, str]]) -> str:
    for op, at, ch in edits:
        i = at % (len(text) + 1)
        if op == "insert":
            text = text[:i] + ch + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + 1:]
        else:
            text = text[:i] + ch + text[i + 1:]
    return text


mutated = st.builds(_mutate, st.sampled_from(REAL), st.lists(_edit, min_size=1, max_size=6))


# ---- what must hold --------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
    # the parser's own words, not Python's
    assert not any(w in msg for w in ("int()", "float()", "Exceeds the limit", "codec")), msg
    return msg


def _check_spec(spec: DomainSpec) -> None:
    """A parsed spec obeys the rules any spec is checked by (API body, save file), and
    its text fields are what they claim: no control characters where none belong."""
    spec.validate()
    again = DomainSpec.from_dict(spec.to_dict())
    again.validate()
    assert again == spec
    json.dumps(spec.to_dict(), allow_nan=False)  # it crosses the API as JSON
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", spec.name), spec.name
    for d in spec.disks:
        _check_disk(d)
        assert "\0" not in d.path and "\n" not in d.path, d.path
    for v in spec.vifs:
        _check_vif(v)


def _check_disk(d: DiskSpec) -> None:
    assert DiskSpec.normalise_target(d.target) == d.target
    assert re.fullmatch(r"(sd|xvd|hd|vd)[a-z]{1,2}([1-9][0-9]?)?", d.target), d.target
    assert d.backend in ("phy", "file", "nbd") and d.mode in ("r", "w")
    assert d.devtype in ("disk", "cdrom")
    assert d.path or d.devtype == "cdrom"
    if d.backend == "nbd":  # canonical: nbd://HOST:PORT[/EXPORT], the port in ASCII
        assert re.fullmatch(r"nbd://(\[[^]]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}(/.*)?", d.path,
                            re.S), d.path


def _check_vif(v: VifSpec) -> None:
    if v.mac is not None:
        assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", v.mac), v.mac
    for name in (v.bridge, v.vifname):
        assert name is None or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}", name), name


def _check(text: str, overrides: list[str] | tuple[str, ...] = ()) -> None:
    try:
        parsed = parse_config(text, filename=FILE, overrides=overrides)
    except ConfigError as exc:
        msg = _one_line(exc)
        if exc.file == COMMAND_LINE:
            assert msg.startswith(f"{COMMAND_LINE}:{exc.line}: ")
            assert exc.line is not None and 1 <= exc.line <= len(overrides)
        else:
            assert exc.file == FILE, msg
            if exc.line is None:
                assert msg.startswith(f"{FILE}: ")
            else:
                assert msg.startswith(f"{FILE}:{exc.line}: ")
                assert 1 <= exc.line <= text.count("\n") + 1, msg
        return
    _check_spec(parsed.spec)
    for w in parsed.warnings:
        assert "\n" not in w and (w.startswith(f"{FILE}:") or w.startswith(COMMAND_LINE))


# ---- the regression corpus: inputs that broke earlier versions -------------------------
CORPUS: list[tuple[str, tuple[str, ...]]] = [
    # an integer longer than Python converts (4300 digits): ValueError escaped
    ("name = 'a'\nmemory = " + "1" * 4301 + "\n", ()),
    ("", ("name=" + "1" * 4301,)),
    # a number that is not finite was kept (an unknown key's value): the spec then
    # could not be sent as JSON
    ("name = 'a'\nvnc = 1e999\n", ()),
    # a domain name with a final newline was valid ($ matches before it)
    ("name = 'web1\\n'\n", ()),
    # a vif key with a newline or CR: a two-line error when given twice
    ("name = 'a'\nvif = [ '0\\r0=00:16:3e:00:00:01,0\\r0=00:16:3e:00:00:01' ]\n", ()),
    # an NBD port of 4301 digits, or a superscript digit: Python's own error message
    ("name = 'a'\ndisk = [ 'nbd:h:" + "9" * 4301 + ",xvda,w' ]\n", ()),
    ("name = 'a'\ndisk = [ 'nbd://h:\u00b2/x,xvda,w' ]\n", ()),
]


@pytest.mark.parametrize(("text", "overrides"), CORPUS)
def test_the_corpus(text: str, overrides: tuple[str, ...]) -> None:
    _check(text, overrides)


def test_an_nbd_port_is_ascii_digits() -> None:
    """Arabic-Indic digits were read as port 12 (str.isdigit, int() take them)."""
    with pytest.raises(ValueError, match="invalid NBD port"):
        parse_disk("nbd://h:\u0661\u0662/x,xvda,w")


def test_a_vif_key_is_a_word() -> None:
    """A vif key with a newline was kept among the unknown keys."""
    with pytest.raises(ValueError, match="invalid vif setting 'a\\\\nb'"):
        parse_vif("a\nb=1")


@FUZZ
@given(st.text())
def test_any_text_gives_a_spec_or_a_config_error(text: str) -> None:
    _check(text)
    _check("name = 'web1'\n" + text)


@FUZZ
@given(configs)
def test_config_like_text_gives_a_spec_or_a_config_error(text: str) -> None:
    _check(text)


@FUZZ
@given(keyed_configs)
def test_each_key_with_values_meant_for_it(text: str) -> None:
    _check(text)


@FUZZ
@given(mutated)
def test_real_configs_mutated(text: str) -> None:
    _check(text)


@FUZZ
@given(configs | keyed_configs, overrides)
def test_overrides_give_a_spec_or_a_config_error(text: str, over: list[str]) -> None:
    _check(text, over)


@FUZZ
@given(st.one_of(disk_specs, st.text()))
def test_a_disk_spec_gives_a_disk_or_a_value_error(spec: str) -> None:
    try:
        disk = parse_disk(spec)
    except ValueError as exc:
        _one_line(exc)
    else:
        _check_disk(disk)
    _check(f"name = 'web1'\ndisk = [ {_rendered(spec, chr(39))} ]\n")


@FUZZ
@given(st.one_of(vif_specs, st.text()))
def test_a_vif_spec_gives_a_vif_or_a_value_error(spec: str) -> None:
    try:
        vif = parse_vif(spec)
    except ValueError as exc:
        _one_line(exc)
    else:
        _check_vif(vif)
    _check(f"name = 'web1'\nvif = [ {_rendered(spec, chr(39))} ]\n")
