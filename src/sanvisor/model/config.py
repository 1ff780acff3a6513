"""The xm/xl domain config parser (xl.cfg(5) syntax), I/O-free.

``KEY = VALUE`` statements, VALUE a quoted string, a number or a ``[list]`` of those:
tokenised and parsed by a small grammar, never evaluated as Python (as xm did).
"""

from __future__ import annotations

import ipaddress
import math
import posixpath
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from sanvisor.errors import ConfigError
from sanvisor.model.diskspec import parse_disk as parse_disk  # re-exported
from sanvisor.model.domain import GUEST_KIT_MIN_MIB, Action, DomainSpec, VifSpec

Scalar = str | int | float
Value = Scalar | list[Scalar]
T = TypeVar("T")

COMMAND_LINE = "command line"
_TOKEN = re.compile(r"""(?P<nl>\n)|(?P<ws>[^\S\n]+)|(?P<comment>\#[^\n]*)|(?P<punct>[=\[\],;])
    |(?P<str>'(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")|(?P<quote>['"])
    |(?P<id>[A-Za-z_][A-Za-z0-9_]*)|(?P<num>-?[0-9][0-9A-Za-z_.+-]*)""", re.VERBOSE)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT = re.compile(r"(-?)(?:0[xX]([0-9a-fA-F]+)|([0-9]+))")
_FLOAT = re.compile(r"-?[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?")
_MAX_DIGITS = 30  # no setting takes a longer number (the spec caps them below 2**40)
_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|[0-7]{1,3}|.)")
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
            "\\": "\\", "'": "'", '"': '"'}


@dataclass
class ParsedConfig:
    spec: DomainSpec
    warnings: list[str]  # "vm.cfg:12: unknown key 'foo' (kept)"
    raw: dict[str, object]  # key -> value after overrides


class _Tok(NamedTuple):
    kind: str  # id str num = [ ] , ; nl eof
    value: Scalar
    line: int


class _Entry(NamedTuple):
    value: Value
    file: str
    line: int
    item_lines: list[int]


def _int_text(text: str) -> int | None:
    """The integer ``text`` spells (decimal, or hex with 0x), else None; so does one
    with more digits than any setting can take (Python refuses to convert some)."""
    m = _INT.fullmatch(text.strip())
    if not m or len((m.group(2) or m.group(3)).lstrip("0")) > _MAX_DIGITS:
        return None
    n = int(m.group(2), 16) if m.group(2) else int(m.group(3), 10)
    return -n if m.group(1) else n


def _brief(value: object) -> str:
    """``repr(value)``, cut short: an error message names a value, it does not echo it."""
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "...'"


def _number(tok: str, file: str, line: int) -> int | float:
    num: int | float | None = _int_text(tok)
    if num is None and _FLOAT.fullmatch(tok):
        num = float(tok)
    if num is None and not _INT.fullmatch(tok):
        raise ConfigError(f"invalid number {_brief(tok)}", file=file, line=line)
    if num is None or not math.isfinite(num):
        raise ConfigError(f"number out of range: {_brief(tok)}", file=file, line=line)
    return num


def _lex(text: str, file: str, line: int) -> Iterator[_Tok]:
    def unescape(m: re.Match[str]) -> str:
        e = m.group(1)
        if e in _ESCAPES or len(e) > 1 or e in "01234567":
            return _ESCAPES.get(e) or chr(int(e[1:], 16) if e[0] == "x" else int(e, 8))
        raise ConfigError(f"invalid escape '\\{e}' in string", file=file, line=line)

    pos = 0
    while m := _TOKEN.match(text, pos):
        kind, tok, pos = m.lastgroup or "", m.group(), m.end()
        if kind == "quote":
            raise ConfigError(f"string not closed (missing {tok})", file=file, line=line)
        if kind == "str":
            yield _Tok("str", _ESCAPE.sub(unescape, tok[1:-1]), line)
        elif kind == "num":
            yield _Tok("num", _number(tok, file, line), line)
        elif kind in ("nl", "punct", "id"):
            yield _Tok(kind if kind != "punct" else tok, tok, line)
            line += kind == "nl"
    if pos < len(text):
        raise ConfigError(f"unexpected character {text[pos]!r}", file=file, line=line)
    yield _Tok("eof", "", line)


def _show(tok: _Tok) -> str:
    named = {"eof": "end of file", "nl": "end of line", "str": f"string {tok.value!r}"}
    return named.get(tok.kind, repr(tok.value))


class _Parser:
    def __init__(self, text: str, file: str, line: int = 1) -> None:
        self.file = file
        self._toks = _lex(text, file, line)
        self._tok = next(self._toks)

    def _next(self, skip_nl: bool = False) -> _Tok:
        tok = self._tok
        self._tok = next(self._toks, tok)  # eof repeats
        return self._next(skip_nl) if skip_nl and tok.kind == "nl" else tok

    def _err(self, msg: str, line: int) -> ConfigError:
        return ConfigError(msg, file=self.file, line=line)

    def statements(self) -> dict[str, _Entry]:
        out: dict[str, _Entry] = {}
        while (tok := self._next()).kind != "eof":
            if tok.kind in ("nl", ";"):
                continue
            if tok.kind != "id":
                raise self._err(f"expected a key, got {_show(tok)}", tok.line)
            key = str(tok.value)
            if (eq := self._next()).kind != "=":
                raise self._err(f"expected '=' after {key!r}, got {_show(eq)}", eq.line)
            if key in out:
                raise self._err(f"{key}: given twice (first on line {out[key].line})", tok.line)
            value, lines = self.value()
            out[key] = _Entry(value, self.file, tok.line, lines)
            if (end := self._tok).kind not in ("nl", ";", "eof"):
                raise self._err(f"expected end of line after {key} = ..., got {_show(end)}",
                                end.line)
        return out

    def value(self) -> tuple[Value, list[int]]:
        tok = self._next()
        if tok.kind in ("str", "num"):
            return tok.value, [tok.line]
        if tok.kind != "[":
            raise self._err("expected a value (a quoted string, a number or a [list]), "
                            f"got {_show(tok)}", tok.line)
        items: list[Scalar] = []
        lines: list[int] = []
        while (item := self._next(skip_nl=True)).kind != "]":
            if item.kind not in ("str", "num"):
                raise self._list_err(tok.line, item, "a string or a number")
            items.append(item.value)
            lines.append(item.line)
            if (sep := self._next(skip_nl=True)).kind == "]":
                break
            if sep.kind != ",":
                raise self._list_err(tok.line, sep, "',' or ']'")
        return items, lines

    def _list_err(self, opened: int, tok: _Tok, expected: str) -> ConfigError:
        if tok.kind == "eof":
            return self._err("list is not closed (missing ']')", opened)
        if tok.kind == "[":
            return self._err("lists cannot be nested", tok.line)
        return self._err(f"expected {expected} in the list opened on line {opened}, "
                         f"got {_show(tok)}", tok.line)

    def at_end(self) -> bool:
        return self._next(skip_nl=True).kind == "eof"


def _parse_override(text: str, index: int) -> tuple[str, _Entry]:
    key, sep, rest = text.partition("=")
    if not sep or not _IDENT.fullmatch(key := key.strip()):
        raise ConfigError(f"expected KEY=VALUE, got {text!r}", file=COMMAND_LINE, line=index)
    try:
        parser = _Parser(rest, COMMAND_LINE, index)
        value, lines = parser.value()
        if not parser.at_end():
            value, lines = rest, [index]
    except ConfigError:
        value, lines = rest, [index]  # not a value: take it as a bare string
    return key, _Entry(value, COMMAND_LINE, index, [index] * len(lines))


def _fail(key: str, e: _Entry, msg: str, line: int | None = None) -> ConfigError:
    return ConfigError(f"{key}: {msg}", file=e.file, line=line or e.line)


def _want(key: str, e: _Entry, what: str) -> ConfigError:
    got = "a list" if isinstance(e.value, list) else _brief(e.value)
    return _fail(key, e, f"expected {what}, got {got}")


def _int(key: str, e: _Entry) -> int:
    n = _int_text(e.value) if isinstance(e.value, str) else e.value
    if n is None or isinstance(n, (float, list)):
        raise _want(key, e, "an integer")
    return n


def _str(key: str, e: _Entry) -> str:
    if not isinstance(e.value, str):
        raise _want(key, e, "a quoted string")
    return e.value


def _choice(key: str, e: _Entry, table: dict[str, T]) -> T:
    if (v := _str(key, e)) not in table:
        raise _fail(key, e, f"invalid value {v!r} (allowed: {', '.join(table)})")
    return table[v]


def _items(key: str, e: _Entry, parse: Callable[[str], T]) -> list[T]:
    if isinstance(e.value, (int, float)):
        raise _want(key, e, "a list of strings")
    out = []
    values = [e.value] if isinstance(e.value, str) else e.value
    for item, line in zip(values, e.item_lines, strict=True):
        if not isinstance(item, str):
            raise _fail(key, e, f"expected a quoted string, got {item!r}", line)
        try:
            out.append(parse(item))
        except ValueError as exc:
            raise _fail(key, e, str(exc), line) from exc
    return out


_ACTIONS = {a.value: a for a in Action}
_BUILDERS = {"linux": "pv", "generic": "pv", "hvm": "hvm"}
_TYPES = {"pv": "pv", "pvh": "pvh", "hvm": "hvm"}
_INT_KEYS = ("memory", "maxmem", "vcpus", "maxvcpus")
_STR_KEYS = ("name", "kernel", "ramdisk", "root", "extra", "cmdline")
_FALLBACK_KEY = {"vcpus": "maxvcpus", "maxmem": "memory"}
_ON_KEYS = ("on_poweroff", "on_reboot", "on_crash")
#: xm's deprecated ``restart`` key -> (on_poweroff, on_reboot, on_crash), as xend 3.0
#: read it (XendDomainInfo: "let on_xyz override it if they are present").
_RESTART: dict[str, tuple[Action, ...]] = {
    "onreboot": (Action.DESTROY, Action.RESTART, Action.DESTROY),
    "always": (Action.RESTART,) * 3,
    "never": (Action.DESTROY,) * 3,
}


def _restart(e: _Entry, kw: dict[str, Any], entries: dict[str, _Entry]) -> list[str]:
    """Apply ``restart = 'onreboot'|'always'|'never'`` under the on_* keys given; warn
    where an explicit on_* key says otherwise (it wins)."""
    warnings = []
    actions = _choice("restart", e, _RESTART)
    for key, action in zip(_ON_KEYS, actions, strict=True):
        if key not in kw:
            kw[key] = action
        elif kw[key] is not action:
            at = entries[key]
            warnings.append(f"{e.file}:{e.line}: restart: {e.value!r} would make {key} "
                            f"{action.value}; {key} = {kw[key].value!r} ({at.file}:{at.line}) "
                            "wins")
    return warnings


def _warn_memory(spec: DomainSpec, entries: dict[str, _Entry]) -> list[str]:
    e = entries.get("memory")
    if spec.kernel is None and e is not None and spec.memory < GUEST_KIT_MIN_MIB:
        return [f"{e.file}:{e.line}: memory: {spec.memory} MiB is less than the guest kit "
                f"needs to boot ({GUEST_KIT_MIN_MIB} MiB)"]
    return []


def parse_config(
    text: str, *, filename: str = "<config>", overrides: Sequence[str] = ()
) -> ParsedConfig:
    """Parse an xm/xl domain config, apply ``KEY=VALUE`` overrides, build the DomainSpec."""
    entries = _Parser(text, filename).statements()
    entries.update(_parse_override(o, i) for i, o in enumerate(overrides, 1))
    kw: dict[str, Any] = {}
    unknown: dict[str, Any] = {}
    warnings: list[str] = []
    for key, e in entries.items():
        if key in _INT_KEYS:
            kw[key] = _int(key, e)
        elif key in _STR_KEYS:
            if (field := "extra" if key == "cmdline" else key) in kw:
                raise _fail(key, e, "'extra' and 'cmdline' are the same setting; give only one")
            kw[field] = _str(key, e)
        elif key == "uuid":
            try:
                kw["uuid"] = str(uuid.UUID(_str(key, e)))
            except ValueError:
                raise _fail(key, e, f"invalid UUID {e.value!r}") from None
        elif key in ("disk", "vif"):
            kw[key + "s"] = _items(key, e, parse_disk if key == "disk" else parse_vif)
        elif key in _ON_KEYS:
            kw[key] = _choice(key, e, _ACTIONS)
        elif key == "restart":
            continue  # once the on_* keys are known
        elif key in ("builder", "type"):
            builder = _choice(key, e, _BUILDERS if key == "builder" else _TYPES)
            if kw.setdefault("builder", builder) != builder:
                other = "type" if key == "builder" else "builder"
                raise _fail(key, e, f"{e.value!r} contradicts the domain type set by {other}")
        else:
            unknown[key] = e.value
            warnings.append(f"{e.file}:{e.line}: unknown key {key!r} (kept)")
    if "name" not in kw:
        raise ConfigError("name: missing (every domain needs a name)", file=filename)
    if "restart" in entries:
        warnings += _restart(entries["restart"], kw, entries)
    spec = DomainSpec(**kw, unknown=unknown)
    try:
        spec.validate()  # source is still None: the message carries no location
    except ConfigError as exc:
        field = exc.message.split(":", 1)[0]
        at = entries.get(field) or entries.get(_FALLBACK_KEY.get(field, ""))
        raise ConfigError(exc.message, file=at.file if at else filename,
                          line=at.line if at else None) from exc
    spec.source = filename
    warnings += _warn_memory(spec, entries)
    return ParsedConfig(spec, warnings, {k: e.value for k, e in entries.items()})


_MODELS = {"virtio": "virtio-net-pci", "virtio-net": "virtio-net-pci",
           "virtio-net-pci": "virtio-net-pci", "e1000": "e1000", "e1000e": "e1000e",
           "rtl8139": "rtl8139", "ne2k_pci": "ne2k_pci", "pcnet": "pcnet"}
_VIF_TYPES = {"vif": "", "ioemu": "", "bridge": "bridge", "nat": "nat", "user": "user"}
_VIF_KEY = re.compile(r"[a-z][a-z0-9_-]*")  # xl-network-configuration(5)'s keys' form
_FLAGS = {"1": True, "yes": True, "true": True, "0": False, "no": False, "false": False}


def parse_vif(spec: str) -> VifSpec:
    """``mac=00:16:3e:00:00:01, bridge=xenbr0, model=e1000`` (xl-network-configuration)."""
    vif, seen, types = VifSpec(), set[str](), set[str]()
    for item in filter(None, (raw.strip() for raw in spec.split(","))):
        key, sep, val = (s.strip() for s in item.partition("="))
        if not sep or not (key := key.lower()):
            raise ValueError(f"expected key=value, got {item!r} in vif {spec!r}")
        if not _VIF_KEY.fullmatch(key):
            raise ValueError(f"invalid vif setting {key!r} in vif {spec!r}")
        if key in seen:
            raise ValueError(f"{key}= given twice in vif {spec!r}")
        seen.add(key)
        if key == "mac":
            vif.mac = VifSpec.check_mac(val)
        elif key == "model":
            if val.lower() not in _MODELS:
                raise ValueError(f"unknown NIC model {val!r} (known: {', '.join(_MODELS)})")
            vif.model = _MODELS[val.lower()]
        elif key in ("bridge", "vifname"):
            if not val:
                raise ValueError(f"empty {key}= in vif {spec!r}")
            setattr(vif, key, VifSpec.check_ifname(key, val))
        elif key in ("ip", "gateway"):
            for part in val.split() or [""]:
                try:
                    (ipaddress.ip_interface if key == "ip" else ipaddress.ip_address)(part)
                except ValueError:
                    raise ValueError(f"invalid {key} address {part!r} in vif {spec!r}") from None
            setattr(vif, key, val)
        elif key == "type":
            if val not in _VIF_TYPES:
                raise ValueError(f"invalid vif type {val!r} (use bridge, nat or user)")
            types.add(_VIF_TYPES[val])
        elif key in ("nat", "user"):
            if val.lower() not in _FLAGS:
                raise ValueError(f"{key}= must be 1 or 0, got {val!r}")
            types.add(key if _FLAGS[val.lower()] else "")
        else:
            vif.extra[key] = val
            types.add("nat" if key == "script" and "nat" in val else "")
    if len(types := types - {""}) > 1:
        raise ValueError(f"vif {spec!r} asks for several network types: {', '.join(sorted(types))}")
    vif.type = types.pop() if types else vif.type
    return vif


def parse_config_file(text: str, filename: str | None, overrides: Sequence[str] = ()
                      ) -> tuple[DomainSpec, list[str]]:
    """A config file's text as the agent receives it from `create`: parsed (errors name
    ``filename``:line), relative kernel/ramdisk/disk paths made relative to the file's
    directory, as a user expects. Returns the spec and the warnings."""
    name = filename or "<config>"
    parsed = parse_config(text, filename=name, overrides=overrides)
    spec = parsed.spec
    base = posixpath.dirname(filename) if filename and filename.startswith("/") else ""
    if base:
        for key in ("kernel", "ramdisk"):
            val = getattr(spec, key)
            if val and not val.startswith("/"):
                setattr(spec, key, posixpath.join(base, val))
        for d in spec.disks:
            if d.path and d.backend != "nbd" and not d.path.startswith("/"):
                d.path = posixpath.join(base, d.path)
    spec.source = name
    return spec, parsed.warnings
