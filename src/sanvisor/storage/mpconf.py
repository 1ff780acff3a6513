"""multipath.conf, parsed as multipath-tools 0.9.4 (Debian 12) parses it (I/O-free).

    defaults   { user_friendly_names yes  polling_interval 1  no_path_retry queue ... }
    blacklist  { wwid "3600508b.*"  devnode "^hd[a-z]"  device { vendor ..  product .. } }
    blacklist_exceptions { ... }          (the same entries; an exception wins)
    multipaths { multipath { wwid 36006...  alias domU-systeme  [settings] } }
    devices    { device { vendor "HITACHI"  product "DF600F"  [revision ..] [settings] } }
    overrides  { [settings] }

A map's settings: `conf.settings_for(wwid, vendor, product)`, taken from its
multipath section > overrides > matching devices (the file's, then the built-in
hardware table's) > defaults > built-in defaults (see mpsettings). Regexes are
POSIX extended ones, unanchored (posixre).

Errors (ConfigError, one line, `file:line: ...`) for what multipath-tools would
refuse or ignore: values it does not take, regexes that do not compile, device
entries without vendor or product, multipath entries without wwid, unclosed
sections or quotes; and for names no pool can live with (one alias for two
WWIDs, two aliases for one). What it reads with a message is read the same way
and the message kept in `conf.warnings`: unknown keywords (ignored), repeated
keywords and sections (the last value wins), extra words after a value (ignored:
quote values with spaces), numbers out of range (capped). One extension: a
fractional polling_interval (the lab's checker; multipath-tools ignores it).
"""

from __future__ import annotations

import re

from sanvisor.errors import ConfigError
from sanvisor.storage import hwtable as hw
from sanvisor.storage.mpsettings import (
    DeviceEntry,
    Filters,
    MultipathConf,
    MultipathEntry,
    Rx,
    Settings,
    drop_feature,
)
from sanvisor.storage.mptokens import CLOSE, OPEN, QUOTE, lines, tokenize
from sanvisor.storage.posixre import compile_ere

__all__ = ["DeviceEntry", "MultipathConf", "MultipathEntry", "Settings", "parse_mpconf"]

_ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}$")
_REGEX_KEYS = {"vendor", "product", "revision", "product_blacklist", "devnode", "wwid",
               "property", "protocol"}
_LISTS = {"devnode", "wwid", "property", "protocol"}  # blacklist entries: any number
MAXLINE = 1023  # multipath-tools reads lines into a 1024-byte buffer


class _Section:
    def __init__(self, path: str, line: int) -> None:
        self.path, self.line = path, line
        self.name = path.rsplit("/", 1)[-1]
        self.values: dict[str, str | None] = {}  # None: set to "not set"
        self.lines: dict[str, int] = {}
        self.filters = Filters()


def parse_mpconf(text: str, filename: str = "multipath.conf") -> MultipathConf:
    conf = MultipathConf(hwtable=[], blacklist=Filters(), exceptions=Filters())
    stack: list[_Section] = []
    seen_roots: dict[str, int] = {}

    def bad(msg: str, n: int) -> ConfigError:
        return ConfigError(msg, file=filename, line=n)

    for n, line in lines(text):
        if len(line.encode(errors="surrogatepass")) > MAXLINE:
            raise bad(f"line longer than {MAXLINE} bytes (multipath-tools would cut it)", n)
        words = tokenize(line)
        if not words:
            continue
        head = words[0]
        if head == CLOSE:
            if len(words) > 1:
                raise bad("put '}' on a line of its own", n)
            if not stack:
                raise bad("'}' without an open section", n)
            _close(conf, stack.pop(), stack, filename)
            continue
        if OPEN in words:
            path = stack[-1].path if stack else None
            if head in (QUOTE, OPEN) or words[1:] != [OPEN]:
                raise bad("put '{' at the end of a section line, after the section name", n)
            if head not in hw.SUBSECTIONS.get(path, frozenset()):
                raise bad(f"unexpected section {head!r}" + (f" inside {path}" if path else ""), n)
            if path is None and head in seen_roots:
                conf.warnings.append(f"{filename}:{n}: a second {head} section (line "
                                     f"{seen_roots[head]}): both are read, the later wins")
            if path is None:
                seen_roots.setdefault(head, n)
            stack.append(_Section(f"{path}/{head}" if path else head, n))
            continue
        if CLOSE in words:
            raise bad("put '}' on a line of its own", n)
        if not stack:
            raise bad(f"{_show(head)!r} outside of any section", n)
        _keyword(conf, stack[-1], words, n, filename)
    if stack:
        raise bad(f"section {stack[-1].name!r} is not closed", stack[-1].line)
    _finish(conf, filename)
    return conf


def _keyword(conf: MultipathConf, sec: _Section, words: list[str], n: int,
             filename: str) -> None:
    head = words[0]
    if head not in hw.KEYWORDS[sec.path]:
        conf.warnings.append(f"{filename}:{n}: unknown keyword {_show(head)!r} in {sec.name} "
                             "(ignored)")
        return
    key = hw.SYNONYMS.get(head, head)
    rest = words[1:]
    if not rest:
        raise ConfigError(f"{head}: no value", file=filename, line=n)
    if rest[0] == QUOTE:
        if len(rest) < 2 or (rest[1] != QUOTE and rest[2:3] != [QUOTE]):
            raise ConfigError(f"{head}: No closing quotation mark", file=filename, line=n)
        value, extra = ("", rest[2:]) if rest[1] == QUOTE else (rest[1], rest[3:])
    else:
        value, extra = rest[0], rest[1:]
    if extra:
        shown = " ".join(map(_show, extra))
        conf.warnings.append(f"{filename}:{n}: {head}: extra words {shown!r} ignored "
                             "(values with spaces go in double quotes)")
    if key in _REGEX_KEYS and (key != "wwid" or not sec.path.startswith("multipaths")):
        try:
            compile_ere(value[1:] if sec.path.startswith("blacklist") and
                        value.startswith(("!", "\\!")) else value)
        except ValueError as exc:
            raise ConfigError(f"{head}: {value!r} is not a regular expression: {exc}",
                              file=filename, line=n) from None
        if sec.name in ("blacklist", "blacklist_exceptions") and key in _LISTS:
            getattr(sec.filters, key).append(Rx(value, n))
            return
    if key == "alias" and not _ALIAS_RE.match(value):
        raise ConfigError(f"alias: {value!r} is not a usable device name", file=filename,
                          line=n)
    if key == "wwid" and not value:
        raise ConfigError("wwid: empty", file=filename, line=n)
    try:
        norm, note = hw.normalize(key, value)
    except ValueError as exc:
        raise ConfigError(f"{head}: {exc}", file=filename, line=n) from None
    if note:
        conf.warnings.append(f"{filename}:{n}: {head} {value}: {note}")
    if key in sec.values:
        conf.warnings.append(f"{filename}:{n}: {head} repeated in this {sec.name} section "
                             f"(line {sec.lines[key]}): this one wins")
    sec.values[key], sec.lines[key] = norm, n


def _show(word: str) -> str:
    return word.replace("\0", "")


def _settings(sec: _Section, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {k: v for k, v in sec.values.items() if v is not None and k not in skip}


def _close(conf: MultipathConf, sec: _Section, stack: list[_Section], filename: str) -> None:
    def bad(msg: str) -> ConfigError:
        return ConfigError(msg, file=filename, line=sec.line)

    if sec.path in ("defaults", "overrides"):
        target = conf.defaults if sec.path == "defaults" else conf.overrides
        for k, v in sec.values.items():
            if v is None:
                target.pop(k, None)
            else:
                target[k] = v
    elif sec.path in ("blacklist", "blacklist_exceptions"):
        into = conf.blacklist if sec.path == "blacklist" else conf.exceptions
        for kind in ("devnode", "wwid", "property", "protocol", "device"):
            getattr(into, kind).extend(getattr(sec.filters, kind))
    elif sec.path.endswith("/device") and sec.path.startswith("blacklist"):
        v, p = sec.values.get("vendor"), sec.values.get("product")
        if v is None and p is None:
            conf.warnings.append(f"{filename}:{sec.line}: device entry without vendor or "
                                 "product (ignored)")
        stack[-1].filters.device.append((None if v is None else Rx(v, sec.lines["vendor"]),
                                         None if p is None else Rx(p, sec.lines["product"])))
    elif sec.path == "multipaths/multipath":
        if not sec.values.get("wwid"):
            raise bad("multipath section without a wwid")
        conf.multipaths.append(MultipathEntry(
            wwid=str(sec.values["wwid"]), alias=sec.values.get("alias"),
            settings=_settings(sec, ("wwid", "alias")), line=sec.line))
    elif sec.path == "devices/device":
        vendor, product = sec.values.get("vendor"), sec.values.get("product")
        if vendor is None or product is None:
            raise bad("device section without " + ("vendor" if vendor is None else "product")
                      + " (multipath-tools drops it)")
        conf.devices.append(DeviceEntry(
            vendor=vendor, product=product, revision=sec.values.get("revision"),
            product_blacklist=sec.values.get("product_blacklist"), line=sec.line,
            settings=_settings(sec, ("vendor", "product", "revision", "product_blacklist"))))


def _finish(conf: MultipathConf, filename: str) -> None:
    conf.multipaths = _merge_multipaths(conf, filename)
    conf.hwtable = _factorize(conf, filename)
    for d in conf.hwtable:
        if d.product_blacklist is not None:
            conf.blacklist.device.append((Rx(d.vendor, d.line), Rx(d.product_blacklist, d.line)))
    conf.blacklist.devnode.append(Rx(hw.BLACKLIST_DEVNODE))
    conf.exceptions.property.append(Rx(hw.EXCEPTIONS_PROPERTY))


def _merge_multipaths(conf: MultipathConf, filename: str) -> list[MultipathEntry]:
    """Sections for one WWID are merged, the later one's values winning (merge_mptable);
    an alias names one WWID only."""
    by_wwid: dict[str, MultipathEntry] = {}
    for mp in conf.multipaths:
        old = by_wwid.get(mp.wwid)
        if old is None:
            by_wwid[mp.wwid] = mp
            continue
        if old.alias and mp.alias and old.alias != mp.alias:
            raise ConfigError(f"wwid {mp.wwid} has two aliases: {old.alias} (line {old.line}) "
                              f"and {mp.alias}", file=filename, line=mp.line)
        conf.warnings.append(f"{filename}:{mp.line}: a second multipath section for "
                             f"{mp.wwid} (line {old.line}): merged, this one wins")
        by_wwid[mp.wwid] = MultipathEntry(mp.wwid, mp.alias or old.alias,
                                          {**old.settings, **mp.settings}, mp.line)
    by_alias: dict[str, MultipathEntry] = {}
    for mp in by_wwid.values():
        if mp.alias is None:
            continue
        first = by_alias.setdefault(mp.alias, mp)
        if first is not mp:
            raise ConfigError(f"alias {mp.alias} is given to two WWIDs: {first.wwid} "
                              f"(line {first.line}) and {mp.wwid}", file=filename,
                              line=mp.line)
    return list(by_wwid.values())


def _factorize(conf: MultipathConf, filename: str) -> list[DeviceEntry]:
    """The built-in table, then the file's entries; an entry with the same vendor,
    product and revision strings as a later file entry is merged into it, the later
    one's values winning (factorize_hwtable), which moves a built-in entry to the
    place of the file's."""
    table = [DeviceEntry(v, p, dict(s)) for v, p, s in hw.HWTABLE]
    builtin = len(table)
    table += [DeviceEntry(d.vendor, d.product, dict(d.settings), d.revision, d.line,
                          d.product_blacklist) for d in conf.devices]
    i = 0
    while i < len(table):
        old = table[i]
        later = next((d for d in table[max(builtin, i + 1):]
                      if (d.vendor, d.product, d.revision) ==
                      (old.vendor, old.product, old.revision)), None)
        if later is None:
            i += 1
            continue
        if old.line:
            conf.warnings.append(f"{filename}:{later.line}: a second device section for "
                                 f"{old.vendor!r} {old.product!r} (line {old.line}): "
                                 "merged, this one wins")
        later.settings = {**{k: v for k, v in old.settings.items() if v}, **later.settings}
        later.product_blacklist = later.product_blacklist or old.product_blacklist
        feats = later.settings.get("features", "")
        if "queue_if_no_path" in feats:  # reconciled as multipath-tools does on a merge
            later.settings.setdefault("no_path_retry", "queue")
            later.settings["features"] = drop_feature(feats, "queue_if_no_path")
        del table[i]
        if i < builtin:
            builtin -= 1
        i = 0
    return table
