"""A multipath map's settings, resolved as multipath-tools 0.9.4 resolves them.

The parsed multipath.conf (MultipathConf, filled by mpconf.parse_mpconf) and
the resolution: each setting of a map comes from the first of, in this order
(libmultipath/propsel.c): its `multipath` section (exact WWID) > `overrides` >
every `device` entry whose vendor/product/revision regexes match (the user's,
later ones first, then the built-in hardware table's, later ones first) >
`defaults` > the built-in default. The blacklist: the criteria in order, an
exception winning within its criterion (libmultipath/blacklist.c).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sanvisor.storage import hwtable as hw
from sanvisor.storage.posixre import compile_ere


@dataclass
class Settings:
    """One map's settings, resolved; `origins` says where each came from."""

    path_grouping_policy: str = "failover"
    path_selector: str = "service-time 0"
    polling_interval: float = 5.0
    no_path_retry: str = "fail"  # N | queue | fail (multipath-tools' "undef" queues nothing)
    failback: str = "manual"  # immediate | manual | followover | N
    base_features: str = "0"  # the `features` setting, less queue_if_no_path
    rr_weight: str = "uniform"
    rr_min_io: int = 1000  # bio-based dm-multipath
    rr_min_io_rq: int = 1  # request-based dm-multipath (what current kernels use)
    user_friendly_names: bool = False
    alias_prefix: str = "mpath"
    path_checker: str = "tur"
    prio: str = "const"
    origins: dict[str, str] = field(default_factory=dict)

    @property
    def queue_if_no_path(self) -> bool:
        return self.no_path_retry != "fail"

    def features(self) -> str:
        """The device-mapper features, as multipath-tools loads them (assemble_map)."""
        words = self.base_features.split()
        if self.queue_if_no_path and "queue_if_no_path" not in words[1:]:
            words = [str(int(words[0]) + 1), *words[1:], "queue_if_no_path"]
        return " ".join(words)


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
    revision: str | None = None
    line: int = 0  # 0: the built-in hardware table
    product_blacklist: str | None = None

    def matches(self, vendor: str | None, product: str | None, revision: str | None) -> bool:
        """hwe_regmatch: a regex is skipped when the device does not report the field."""
        if vendor is None and product is None and revision is None:
            return False
        return all(s is None or pat is None or compile_ere(pat).search(s)
                   for pat, s in ((self.vendor, vendor), (self.product, product),
                                  (self.revision, revision)))

    def where(self) -> str:
        return f"line {self.line}" if self.line else "built-in"


@dataclass
class Rx:
    """A blacklist regex; a leading '!' inverts it ('\\!' is a literal '!')."""

    text: str
    line: int = 0

    def hit(self, s: str) -> bool:
        invert = self.text.startswith("!")
        body = self.text[1:] if invert or self.text.startswith("\\!") else self.text
        return bool(compile_ere(body).search(s)) != invert


@dataclass
class Filters:
    devnode: list[Rx] = field(default_factory=list)
    wwid: list[Rx] = field(default_factory=list)
    property: list[Rx] = field(default_factory=list)
    protocol: list[Rx] = field(default_factory=list)
    device: list[tuple[Rx | None, Rx | None]] = field(default_factory=list)

    def hit(self, kind: str, value: str | tuple[str, str]) -> Rx | None:
        if isinstance(value, tuple):
            for v, p in self.device:
                if (v or p) and (v is None or v.hit(value[0])) and (p is None or p.hit(value[1])):
                    return v or p
            return None
        rxs: list[Rx] = getattr(self, kind)
        return next((rx for rx in rxs if rx.hit(value)), None)


def _builtin_hwtable() -> list[DeviceEntry]:
    return [DeviceEntry(v, p, dict(s)) for v, p, s in hw.HWTABLE]


@dataclass
class MultipathConf:
    defaults: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, str] = field(default_factory=dict)
    multipaths: list[MultipathEntry] = field(default_factory=list)
    devices: list[DeviceEntry] = field(default_factory=list)  # the file's, as written
    hwtable: list[DeviceEntry] = field(default_factory=_builtin_hwtable)  # built-in + file's
    blacklist: Filters = field(default_factory=lambda: Filters(
        devnode=[Rx(hw.BLACKLIST_DEVNODE)]))
    exceptions: Filters = field(default_factory=lambda: Filters(
        property=[Rx(hw.EXCEPTIONS_PROPERTY)]))
    warnings: list[str] = field(default_factory=list)

    @property
    def user_friendly_names(self) -> bool:
        """The defaults section's value (a map's own: settings_for(...).user_friendly_names)."""
        return self.defaults.get("user_friendly_names", "no") == "yes"

    def multipath(self, wwid: str) -> MultipathEntry | None:
        return next((m for m in self.multipaths if m.wwid == wwid), None)

    def hw_matches(self, vendor: str | None, product: str | None,
                   revision: str | None = None) -> list[DeviceEntry]:
        """Every matching device entry, the one that wins first (find_hwe)."""
        return [d for d in reversed(self.hwtable) if d.matches(vendor, product, revision)]

    def settings_for(self, wwid: str, vendor: str | None, product: str | None,
                     revision: str | None = None) -> Settings:
        mpe = self.multipath(wwid)
        levels = [("multipaths section", mpe.settings if mpe else {}),
                  ("overrides section", self.overrides),
                  *((f"device {d.vendor!r} {d.product!r} ({d.where()})", d.settings)
                    for d in self.hw_matches(vendor, product, revision)),
                  ("defaults section", self.defaults)]
        origins: dict[str, str] = {}

        def pick(key: str) -> str | None:
            for origin, values in levels:
                if key in values:
                    origins[key] = origin
                    return values[key]
            origins[key] = "built-in default"
            return hw.BUILTIN_DEFAULTS.get(key)

        def get(key: str) -> str:
            value = pick(key)
            return hw.BUILTIN_DEFAULTS[key] if value is None else value

        retry = pick("no_path_retry")
        features = get("features")
        if "queue_if_no_path" in features:  # reconcile_features_with_options
            if retry is None:
                retry, origins["no_path_retry"] = "queue", "features " + origins["features"]
            features = drop_feature(features, "queue_if_no_path")
        if retry is None:
            origins["no_path_retry"] = "not set (built-in): no queueing"
        return Settings(
            path_grouping_policy=get("path_grouping_policy"), path_selector=get("path_selector"),
            polling_interval=float(get("polling_interval")), no_path_retry=retry or "fail",
            failback=get("failback"),
            base_features=drop_feature(features, "retain_attached_hw_handler"),
            rr_weight=get("rr_weight"), rr_min_io=int(get("rr_min_io")),
            rr_min_io_rq=int(get("rr_min_io_rq")),
            user_friendly_names=get("user_friendly_names") == "yes",
            alias_prefix=get("alias_prefix"), path_checker=get("path_checker"),
            prio=get("prio"), origins=origins)

    def alias_for(self, wwid: str) -> str | None:
        mpe = self.multipath(wwid)
        return mpe.alias if mpe else None

    def blacklist_reason(self, wwid: str, vendor: str | None = None,
                         product: str | None = None, devnode: str | None = None,
                         protocol: str | None = None) -> str | None:
        """Why a path is blacklisted, or None. The criteria in multipath-tools' order
        (udev properties, not known here, are skipped): device node, vendor/product,
        protocol, WWID; for each, an exception wins over the blacklist."""
        checks: list[tuple[str, str, str | tuple[str, str] | None]] = [
            ("devnode", "device node", devnode),
            ("device", "vendor/product", (vendor, product) if vendor is not None
             and product is not None else None),
            ("protocol", "protocol", protocol), ("wwid", "wwid", wwid)]
        for kind, label, value in checks:
            if value is None or self.exceptions.hit(kind, value):
                continue
            rx = self.blacklist.hit(kind, value)
            if rx is not None:
                where = f"line {rx.line}" if rx.line else "built-in"
                return f"{label} blacklisted by {rx.text!r} ({where})"
        return None

    def blacklisted(self, wwid: str, vendor: str | None = None, product: str | None = None,
                    devnode: str | None = None, protocol: str | None = None) -> bool:
        return self.blacklist_reason(wwid, vendor, product, devnode, protocol) is not None


def drop_feature(features: str, name: str) -> str:
    words = features.split()
    if name not in words[1:] or not words[0].isdigit():
        return features
    rest = [w for w in words[1:] if w != name]
    return " ".join([str(max(int(words[0]) - (len(words) - 1 - len(rest)), 0)), *rest])
