"""The array's management operations: LUNs, zoning, initiators (one implementation).

Every client goes through here: the running array daemon serves these operations on
its management socket (storage/arrayapi.py: `sanvisor array ...`, a script or a web
view get the same behaviour), and when no daemon runs the CLI applies them to the
array's home directly (a lab registers its HBAs before the array starts). Each
operation returns a Result: the object afterwards, and xm-style text saying what
was done.

A running daemon adds what only it knows: a LUN with open sessions is not deleted
(``--force`` cuts them first, as a real array's forced unmap does).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sanvisor.errors import ConfigError, ConflictError, UsageError
from sanvisor.storage.array import ArrayStore, Lun
from sanvisor.storage.arraypool import allocated, human, pool_space, preallocate

OPS = ("lun-create", "lun-delete", "lun-resize", "lun-list", "zone-add", "zone-remove",
       "initiator-add", "initiator-list")


@dataclass
class Result:
    data: Any  # what --json prints
    text: str  # what a person reads


class ArrayAdmin:
    def __init__(self, store: ArrayStore,
                 sessions_of: Callable[[Lun], list[str]] | None = None) -> None:
        self.store = store
        # the running daemon: who has a session open on a LUN ("peer (host)" each)
        self.sessions_of = sessions_of

    def run(self, op: str, args: dict[str, Any]) -> Result:
        """One operation by name, its arguments checked (they may come off a socket)."""
        if op not in OPS:
            raise UsageError(f"unknown array operation {op!r} (one of {', '.join(OPS)})")
        fn: Callable[..., Result] = getattr(self, op.replace("-", "_"))
        try:
            return fn(**args)
        except TypeError as exc:  # missing or unknown argument names
            raise UsageError(f"array {op}: {exc}") from None

    # ---- LUNs -----------------------------------------------------------------------
    def lun_create(self, name: str, size: int, id: int | None = None,
                   backing: str | None = None, thick: bool = False,
                   vendor: str = "HITACHI", model: str = "DF600F") -> Result:
        _check(size=(size, int), id=(id, (int, type(None))), thick=(thick, bool),
               backing=(backing, (str, type(None))), vendor=(vendor, str),
               model=(model, str), name=(name, str))
        if thick and backing is not None:
            raise UsageError("--thick allocates a new LUN file; not with --backing")
        with self.store.edit() as cfg:
            lun = cfg.add_lun(name, size, Path(backing or "/pending"), id,
                              vendor=vendor, model=model)
            if backing is None:
                path = self.store.backing_path(lun.wwid)
                try:
                    if thick:
                        preallocate(path, size)
                    with open(path, "r+b" if thick else "wb") as fh:
                        fh.truncate(size)
                except BaseException:
                    path.unlink(missing_ok=True)
                    raise
                lun.backing, lun.thick = str(path), thick
            elif not Path(backing).exists():
                raise ConfigError(f"--backing {backing}: no such file or device")
        return Result(vars(lun), f"LUN {lun.id} {lun.name} created: {human(lun.size)}, "
                      f"{'thick' if lun.thick else 'thin'}, WWID {lun.wwid}")

    def lun_delete(self, lun: str, force: bool = False) -> Result:
        _check(lun=(lun, str), force=(force, bool))
        with self.store.edit() as cfg:
            x = cfg.lun(lun)
            if x.zones and not force:
                raise ConflictError(f"LUN {x.name} is zoned to {', '.join(x.zones)}; "
                                    "remove the zones first (or --force)")
            users = self.sessions_of(x) if self.sessions_of else []
            if users and not force:
                raise ConflictError(f"LUN {x.name} is in use: {len(users)} session(s) "
                                    f"open from {', '.join(sorted(set(users)))} "
                                    "(or --force, which cuts them)")
            cfg.luns.remove(x)
            if Path(x.backing).parent == self.store.home / "luns":
                Path(x.backing).unlink(missing_ok=True)
        return Result({"lun": x.name, "deleted": True, "sessions_cut": len(users)},
                      f"LUN {x.id} {x.name} deleted"
                      + (f" ({len(users)} open session(s) cut)" if users else ""))

    def lun_resize(self, lun: str, size: int) -> Result:
        _check(lun=(lun, str), size=(size, int))
        with self.store.edit() as cfg:
            x = cfg.lun(lun)
            if size < x.size:
                raise ConflictError(f"LUN {x.name}: shrinking ({x.size} -> {size} "
                                    "bytes) would destroy data; only growing is supported")
            if x.thick:
                preallocate(Path(x.backing), size)
            if Path(x.backing).is_file():
                os.truncate(x.backing, size)
            x.size = size
        return Result(vars(x), f"LUN {x.id} {x.name} is now {human(size)} (hosts see it "
                      "after a rescan)")

    def lun_list(self) -> Result:
        luns = sorted(self.store.load().luns, key=lambda x: x.id)
        pools: dict[str, Any] = {}
        rows = []
        for x in luns:
            try:
                pool = pool_space(Path(x.backing))
                pools[pool.path] = pool
                pinfo: dict[str, object] | None = pool.to_dict()
            except OSError:
                pinfo = None
            rows.append(vars(x) | {"allocated": allocated(Path(x.backing)), "pool": pinfo})
        if not pools:
            with contextlib.suppress(OSError):
                pool = pool_space(self.store.home)
                pools[pool.path] = pool
        lines = [f"{'LUN':>4} {'Name':<16} {'Size':>10} {'Allocated':>10} {'':5} "
                 f"{'WWID':<34} Zoned to"]
        for x, row in zip(luns, rows, strict=True):
            lines.append(f"{x.id:>4} {x.name:<16} {human(x.size):>10} "
                         f"{human(int(row['allocated'])):>10} "
                         f"{'thick' if x.thick else 'thin':5} {x.wwid:<34} "
                         f"{', '.join(x.zones) or '-'}")
        for p in pools.values():
            lines.append(f"pool {p.path}: {human(p.free)} free of {human(p.size)} "
                         f"({100 * p.free / max(p.size, 1):.0f} %)")
            if p.low:
                lines.append(p.warning())
        return Result(rows, "\n".join(lines))

    # ---- zoning and initiators ----------------------------------------------------------
    def zone_add(self, lun: str, wwpn: str) -> Result:
        return self._zone("added", lun, wwpn)

    def zone_remove(self, lun: str, wwpn: str) -> Result:
        return self._zone("removed", lun, wwpn)

    def _zone(self, verb: str, lun: str, wwpn: str) -> Result:
        _check(lun=(lun, str), wwpn=(wwpn, str))
        with self.store.edit() as cfg:
            (cfg.zone_add if verb == "added" else cfg.zone_remove)(lun, wwpn)
            x = cfg.lun(lun)
        return Result({"lun": x.name, "wwpn": wwpn, "zone": verb, "zones": x.zones},
                      f"zone {verb}: LUN {x.name} "
                      f"{'visible to' if verb == 'added' else 'hidden from'} {wwpn} "
                      "(seen after its host's next rescan)")

    def initiator_add(self, wwpn: str, address: str, host: str = "") -> Result:
        _check(wwpn=(wwpn, str), address=(address, str), host=(host, str))
        with self.store.edit() as cfg:
            ini = cfg.add_initiator(wwpn, host, address)
        return Result(vars(ini), f"initiator {ini.wwpn} registered (host {host or '-'}, "
                      f"address {address})")

    def initiator_list(self) -> Result:
        inis = self.store.load().initiators
        lines = [f"{'WWPN':<24} {'Host':<10} Address"]
        lines += [f"{i.wwpn:<24} {i.host:<10} {i.address}" for i in inis]
        return Result([vars(i) for i in inis], "\n".join(lines))


def _check(**fields: tuple[object, type | tuple[type, ...]]) -> None:
    """Arguments off a socket have the types the operation expects (bool is no int)."""
    for name, (value, kind) in fields.items():
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise UsageError(f"array: {name} has the wrong type ({type(value).__name__})")
