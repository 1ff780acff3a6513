"""multipath.conf: the dm-multipath configuration file, parsed (I/O-free).

    defaults   { user_friendly_names yes  polling_interval 1  no_path_retry queue ... }
    blacklist  { wwid ...  }                  (paths never grouped)
    multipaths { multipath { wwid 36006...  alias domU-systeme  [settings] } }
    devices    { device { vendor "HITACHI"  product "DF600F"  [settings] } }

Settings: path_grouping_policy failover|multibus, path_selector "round-robin 0",
polling_interval N (seconds, may be fractional), no_path_retry N|queue|fail,
failback immediate|manual|N, user_friendly_names yes|no (defaults only).
Precedence as in multipath: multipaths > devices > defaults. Errors name the
file and line; one alias for two WWIDs (or two aliases for one WWID) is an error.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from sanvisor.errors import ConfigError

SETTINGS = ("path_grouping_policy", "path_selector", "polling_interval", "no_path_retry",
            "failback", "features", "rr_min_io", "rr_weight", "path_checker")
_SECTIONS = {"defaults", "blacklist", "blacklist_exceptions", "multipaths", "devices",
             "overrides"}
_ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}$")


@dataclass
class Settings:
    path_grouping_policy: str = "failover"
    path_selector: str = "round-robin 0"
    polling_interval: float = 5.0
    no_path_retry: str = "fail"  # N | queue | fail
    failback: str = "immediate"

    def merged(self, over: dict[str, str]) -> Settings:
        s = Settings(**vars(self))
        for k, v in over.items():
            if k == "polling_interval":
                s.polling_interval = float(v)
            elif hasattr(s, k):
                setattr(s, k, v)
        return s

    @property
    def queue_if_no_path(self) -> bool:
        return self.no_path_retry != "fail"

    def features(self) -> str:
        return "1 queue_if_no_path" if self.queue_if_no_path else "0"


@dataclass
class MultipathEntry:
    wwid: str
    alias: str | None
    settings: dict[str, str]
    line: int


@dataclass
class DeviceEntry:
    vendor: str
    product: str
    settings: dict[str, str]


@dataclass
class MultipathConf:
    defaults: dict[str, str] = field(default_factory=dict)
    multipaths: list[MultipathEntry] = field(default_factory=list)
    devices: list[DeviceEntry] = field(default_factory=list)
    blacklist_wwids: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def user_friendly_names(self) -> bool:
        return self.defaults.get("user_friendly_names", "no") == "yes"

    def settings_for(self, wwid: str, vendor: str, product: str) -> Settings:
        base = Settings().merged({k: v for k, v in self.defaults.items() if k in SETTINGS})
        for dev in self.devices:
            if re.fullmatch(dev.vendor, vendor) and re.fullmatch(dev.product, product):
                base = base.merged(dev.settings)
        for mp in self.multipaths:
            if mp.wwid == wwid:
                base = base.merged(mp.settings)
        return base

    def alias_for(self, wwid: str) -> str | None:
        return next((m.alias for m in self.multipaths if m.wwid == wwid and m.alias), None)

    def blacklisted(self, wwid: str) -> bool:
        return any(re.fullmatch(p, wwid) for p in self.blacklist_wwids)


def _tokens(text: str, filename: str) -> list[tuple[int, list[str]]]:
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        try:
            words = shlex.split(raw, comments=True)
        except ValueError as exc:
            raise ConfigError(f"{exc}", file=filename, line=n) from None
        if words:
            out.append((n, words))
    return out


def parse_mpconf(text: str, filename: str = "multipath.conf") -> MultipathConf:
    conf = MultipathConf()
    lines = _tokens(text, filename)
    stack: list[tuple[str, int, dict[str, str]]] = []

    def bad(msg: str, n: int) -> ConfigError:
        return ConfigError(msg, file=filename, line=n)

    for n, words in lines:
        if words == ["}"]:
            if not stack:
                raise bad("'}' without an open section", n)
            name, start, body = stack.pop()
            _close(conf, name, body, start, stack, filename)
            continue
        if words[-1] == "{":
            name = words[0]
            parent = stack[-1][0] if stack else None
            allowed = {None: _SECTIONS, "multipaths": {"multipath"}, "devices": {"device"},
                       "blacklist": {"device"}, "blacklist_exceptions": {"device"},
                       "overrides": set()}.get(parent, set())
            if len(words) != 2 or name not in allowed:
                raise bad(f"unexpected section {name!r}"
                          + (f" inside {parent}" if parent else ""), n)
            stack.append((name, n, {}))
            continue
        if "{" in words or "}" in words:
            raise bad("put '{' at the end of a section line and '}' on a line of its own", n)
        if not stack:
            raise bad(f"{words[0]!r} outside of any section", n)
        key, value = words[0], " ".join(words[1:])
        if not value:
            raise bad(f"{key}: no value", n)
        section, _, body = stack[-1]
        if section == "blacklist" and key == "wwid":
            conf.blacklist_wwids.append(value)
            continue
        _check(key, value, section, n, filename, conf)
        if key in body:
            raise bad(f"{key} given twice in this section", n)
        body[key] = value
        body[f"__line_{key}"] = str(n)
    if stack:
        raise bad(f"section {stack[-1][0]!r} is not closed", stack[-1][1])
    _check_aliases(conf, filename)
    return conf


def _check(key: str, value: str, section: str, n: int, filename: str,
           conf: MultipathConf) -> None:
    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{key}: {msg}", file=filename, line=n)

    if key == "path_grouping_policy" and value not in ("failover", "multibus"):
        raise bad(f"{value!r} is not failover or multibus")
    if key == "polling_interval":
        try:
            if float(value) <= 0:
                raise ValueError
        except ValueError:
            raise bad(f"{value!r} is not a positive number of seconds") from None
    if key == "no_path_retry" and value not in ("queue", "fail") and not value.isdigit():
        raise bad(f"{value!r} is not a number, queue or fail")
    if key == "failback" and value not in ("immediate", "manual") and not value.isdigit():
        raise bad(f"{value!r} is not immediate, manual or a number")
    if key in ("user_friendly_names", "find_multipaths") and value not in ("yes", "no"):
        raise bad(f"{value!r} is not yes or no")
    if key == "path_selector" and not value.startswith(("round-robin", "queue-length",
                                                        "service-time")):
        raise bad(f"unknown path selector {value!r}")
    if key == "alias" and not _ALIAS_RE.match(value):
        raise bad(f"{value!r} is not a usable device name")
    known = set(SETTINGS) | {"wwid", "alias", "vendor", "product", "user_friendly_names",
                             "find_multipaths", "hardware_handler", "prio", "verbosity"}
    if key not in known:
        conf.warnings.append(f"{filename}:{n}: unknown keyword {key!r} in {section} (ignored)")


def _close(conf: MultipathConf, name: str, body: dict[str, str], start: int,
           stack: list[tuple[str, int, dict[str, str]]], filename: str) -> None:
    settings = {k: v for k, v in body.items() if k in SETTINGS}
    parent = stack[-1][0] if stack else None
    if name == "defaults":
        conf.defaults.update({k: v for k, v in body.items() if not k.startswith("__")})
    elif name == "multipath" and parent == "multipaths":
        if "wwid" not in body:
            raise ConfigError("multipath section without a wwid", file=filename, line=start)
        conf.multipaths.append(MultipathEntry(wwid=body["wwid"], alias=body.get("alias"),
                                              settings=settings, line=start))
    elif name == "device" and parent == "devices":
        conf.devices.append(DeviceEntry(vendor=body.get("vendor", ".*"),
                                        product=body.get("product", ".*"), settings=settings))


def _check_aliases(conf: MultipathConf, filename: str) -> None:
    by_alias: dict[str, MultipathEntry] = {}
    by_wwid: dict[str, MultipathEntry] = {}
    for mp in conf.multipaths:
        if mp.wwid in by_wwid:
            raise ConfigError(f"wwid {mp.wwid} has two multipath sections (first at line "
                              f"{by_wwid[mp.wwid].line})", file=filename, line=mp.line)
        by_wwid[mp.wwid] = mp
        if mp.alias:
            if mp.alias in by_alias:
                raise ConfigError(
                    f"alias {mp.alias} is given to two WWIDs: {by_alias[mp.alias].wwid} "
                    f"(line {by_alias[mp.alias].line}) and {mp.wwid}", file=filename,
                    line=mp.line)
            by_alias[mp.alias] = mp
