"""The disk array's configuration: LUNs, initiators (host HBAs) and zoning.

Kept in one JSON file under the array's home, changed under an exclusive lock
and replaced atomically; the array daemon re-reads it when it changes, so
`sanvisor array ...` commands act on a running array. Like a real array,
changes are seen by hosts at their next rescan (a new connection).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sanvisor.errors import ConflictError, NotFoundError, UsageError

HITACHI_OUI = 0x0060E8
_WWPN_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){7}\Z")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def check_wwpn(wwpn: str) -> str:
    w = wwpn.strip().lower()
    if not _WWPN_RE.match(w):
        raise UsageError(f"invalid WWPN {wwpn!r} (8 bytes, e.g. 10:00:00:00:c9:00:01:00)")
    return w


def naa_wwid(serial: int, lun_id: int) -> str:
    """An NAA type 6 identifier (registered extended), as multipath shows it: '3' + 32 hex."""
    return f"36{HITACHI_OUI:06x}{serial & 0xFFFFFFFFF:09x}{lun_id:016x}"


@dataclass
class Lun:
    id: int
    name: str
    wwid: str
    size: int  # bytes
    backing: str  # a file or block device
    vendor: str = "HITACHI"
    model: str = "DF600F"
    rev: str = "0000"
    zones: list[str] = field(default_factory=list)  # WWPNs allowed to see it
    thick: bool = False  # every block allocated at creation (fallocate)

    def description(self) -> str:
        """What travels in NBD's export description: the SCSI inquiry data."""
        return (f"vendor={self.vendor} model={self.model} rev={self.rev} lun={self.id} "
                f"wwid={self.wwid} name={self.name} size={self.size}")


@dataclass
class Initiator:
    wwpn: str
    host: str
    address: str  # the HBA's address on its fabric: how the array knows who connects


@dataclass
class ArrayConfig:
    serial: int = 0xD6009592
    luns: list[Lun] = field(default_factory=list)
    initiators: list[Initiator] = field(default_factory=list)

    # ---- lookups ------------------------------------------------------------------------
    def lun(self, ref: str) -> Lun:
        for lun in self.luns:
            if ref in (lun.name, lun.wwid, str(lun.id)):
                return lun
        raise NotFoundError(f"no LUN {ref!r} on the array", lun=ref)

    def initiator_at(self, address: str) -> Initiator | None:
        return next((i for i in self.initiators if i.address == address), None)

    def visible_to(self, wwpn: str) -> list[Lun]:
        return sorted((lun for lun in self.luns if wwpn in lun.zones), key=lambda x: x.id)

    # ---- changes ------------------------------------------------------------------------
    def add_lun(self, name: str, size: int, backing: Path, lun_id: int | None = None,
                vendor: str = "HITACHI", model: str = "DF600F", rev: str = "0000") -> Lun:
        if not _NAME_RE.match(name):
            raise UsageError(f"invalid LUN name {name!r}")
        if size <= 0 or size % 512:
            raise UsageError(f"LUN size must be a positive multiple of 512 bytes, got {size}")
        if any(lun.name == name for lun in self.luns):
            raise ConflictError(f"a LUN named {name} already exists")
        if lun_id is None:
            lun_id = next(i for i in range(1, 1 << 14) if all(x.id != i for x in self.luns))
        elif not 0 <= lun_id < (1 << 14):
            raise UsageError(f"LUN id {lun_id} is out of range (0..16383)")
        elif any(x.id == lun_id for x in self.luns):
            raise ConflictError(f"LUN id {lun_id} is already in use "
                                f"(by {self.lun(str(lun_id)).name})")
        lun = Lun(id=lun_id, name=name, wwid=naa_wwid(self.serial, lun_id), size=size,
                  backing=str(backing), vendor=vendor, model=model, rev=rev)
        self.luns.append(lun)
        return lun

    def zone_add(self, ref: str, wwpn: str) -> None:
        lun, w = self.lun(ref), check_wwpn(wwpn)
        if not any(i.wwpn == w for i in self.initiators):
            raise NotFoundError(f"unknown initiator WWPN {w} (known: "
                                f"{', '.join(i.wwpn for i in self.initiators) or 'none'})")
        if w not in lun.zones:
            lun.zones.append(w)

    def zone_remove(self, ref: str, wwpn: str) -> None:
        lun, w = self.lun(ref), check_wwpn(wwpn)
        if w not in lun.zones:
            raise NotFoundError(f"LUN {lun.name} is not zoned to {w}")
        lun.zones.remove(w)

    def add_initiator(self, wwpn: str, host: str, address: str) -> Initiator:
        w = check_wwpn(wwpn)
        for i in self.initiators:
            if i.wwpn == w:
                raise ConflictError(f"initiator {w} is already known (host {i.host})")
            if i.address == address:
                raise ConflictError(f"address {address} already belongs to {i.wwpn}")
        ini = Initiator(wwpn=w, host=host, address=address)
        self.initiators.append(ini)
        return ini

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> ArrayConfig:
        luns = [Lun(**x) for x in d.get("luns", [])]  # type: ignore[attr-defined]
        inis = [Initiator(**x) for x in d.get("initiators", [])]  # type: ignore[attr-defined]
        return cls(serial=int(d.get("serial", 0xD6009592)), luns=luns,  # type: ignore[call-overload]
                   initiators=inis)


class ArrayStore:
    """The array's home: config.json (+ lock), and luns/ for the backing files."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / "config.json"

    def load(self) -> ArrayConfig:
        try:
            return ArrayConfig.from_dict(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return ArrayConfig()

    def mtime(self) -> float:
        try:
            return self.path.stat().st_mtime_ns / 1e9
        except FileNotFoundError:
            return 0.0

    @contextlib.contextmanager
    def edit(self) -> Iterator[ArrayConfig]:
        """Change the config under an exclusive lock; written only if the block succeeds."""
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "luns").mkdir(exist_ok=True)
        with open(self.home / "config.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            cfg = self.load()
            yield cfg
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cfg.to_dict(), indent=1))
            os.replace(tmp, self.path)

    def backing_path(self, wwid: str) -> Path:
        return self.home / "luns" / f"{wwid}.img"
