"""The host's view of the SAN: SCSI paths found through each HBA.

A rescan (the seed's `echo 1 > /sys/class/fc_host/hostN/issue_lip`) asks the
array, through each HBA's own fabric address, which LUNs it may see; each
(HBA, LUN) is a path, named like a SCSI disk (sdb, sdc, ... in discovery order,
kept across rescans). Paths appear only after a rescan, and a LUN no longer
zoned disappears at the next one. The table is kept in the agent's home.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from sanvisor.errors import ConfigError, NotFoundError, UsageError
from sanvisor.model.diskspec import sd_name
from sanvisor.storage.nbdclient import NbdClient, NbdError


@dataclass
class HbaConf:
    index: int
    wwpn: str
    address: str
    ifname: str
    target: str  # host:port of the array on this HBA's fabric
    fault_file: str = ""  # loopback lab: the HBA is down while this file exists

    @property
    def target_host(self) -> str:
        return self.target.rsplit(":", 1)[0]

    @property
    def target_port(self) -> int:
        return int(self.target.rsplit(":", 1)[1])


@dataclass
class ScsiPath:
    hba: int  # scsi host number
    lun: int
    wwid: str
    vendor: str
    model: str
    rev: str
    dev: str  # sdb
    minor: int
    size: int = 0
    channel: int = 0
    target: int = 0

    @property
    def hctl(self) -> str:
        return f"{self.hba}:{self.channel}:{self.target}:{self.lun}"


def load_hbas(home: Path) -> list[HbaConf]:
    path = home / "host.json"
    try:
        data = json.loads(path.read_text())
        hbas = [HbaConf(**h) for h in data.get("hbas", [])]
    except FileNotFoundError:
        raise NotFoundError("this host has no HBAs (not a lab host: see 'sanvisor lab up')",
                            home=str(home)) from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"malformed host description ({exc})", file=str(path)) from None
    if not hbas:
        raise NotFoundError("this host has no HBAs", home=str(home))
    return hbas


class ScsiTable:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / "scsi.json"
        self.paths: list[ScsiPath] = []
        with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
            self.paths = [ScsiPath(**p) for p in json.loads(self.path.read_text())]

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(p) for p in self.paths], indent=1))
        tmp.replace(self.path)

    def _next_dev(self) -> tuple[str, int]:
        used = {p.dev for p in self.paths}
        n = 1  # sda is the host's own disk
        while sd_name(n) in used:
            n += 1
        return sd_name(n), 16 * n

    @staticmethod
    def probe(hba: HbaConf) -> list[dict[str, str]]:
        """What the array shows this HBA: one dict of inquiry fields per LUN."""
        with NbdClient(hba.target_host, hba.target_port, source=hba.address,
                       timeout=3) as c:
            return [e.fields() | {"wwid": e.name} for e in c.exports()]

    def rescan(self, hba_index: int | None = None) -> dict[str, list[str]]:
        hbas = load_hbas(self.home)
        if hba_index is not None:
            hbas = [h for h in hbas if h.index == hba_index]
            if not hbas:
                raise UsageError(f"no HBA {hba_index} on this host")
        added: list[str] = []
        removed: list[str] = []
        errors: list[str] = []
        for hba in hbas:
            try:
                seen = {int(f["lun"]): f for f in self.probe(hba)}
            except NbdError as exc:
                errors.append(f"scsi{hba.index}: {exc}")
                continue  # a dead link: keep its paths, the path checker owns their state
            for p in [p for p in self.paths if p.hba == hba.index]:
                if p.lun not in seen or seen[p.lun]["wwid"] != p.wwid:
                    self.paths.remove(p)
                    removed.append(p.hctl)
            have = {p.lun for p in self.paths if p.hba == hba.index}
            for lun, f in sorted(seen.items()):
                if lun not in have:
                    self._add(hba.index, lun, f)
                    added.append(f"{hba.index}:0:0:{lun}")
        self.save()
        return {"added": added, "removed": removed, "errors": errors}

    def _add(self, hba: int, lun: int, f: dict[str, str]) -> ScsiPath:
        dev, minor = self._next_dev()
        p = ScsiPath(hba=hba, lun=lun, wwid=f["wwid"], vendor=f.get("vendor", ""),
                     model=f.get("model", ""), rev=f.get("rev", ""), dev=dev, minor=minor,
                     size=int(f.get("size", 0)))
        self.paths.append(p)
        self.paths.sort(key=lambda x: (x.hba, x.lun))
        return p

    def add_single(self, hba: int, channel: int, target: int, lun: int) -> ScsiPath:
        """The seed's `scsiadd -a H C I L`: probe one LUN through one HBA."""
        if channel != 0 or target != 0:
            raise NotFoundError(f"no device at {hba}:{channel}:{target}:{lun} "
                                "(the array is channel 0, id 0)")
        conf = next((h for h in load_hbas(self.home) if h.index == hba), None)
        if conf is None:
            raise UsageError(f"no HBA {hba} on this host")
        for p in self.paths:
            if (p.hba, p.lun) == (hba, lun):
                return p
        seen = {int(f["lun"]): f for f in self.probe(conf)}
        if lun not in seen:
            raise NotFoundError(f"no LUN {lun} behind scsi{hba} (not zoned to "
                                f"{conf.wwpn}, or not on the array)")
        p = self._add(hba, lun, seen[lun])
        self.save()
        return p

    def proc_scsi(self) -> str:
        """The /proc/scsi/scsi view of the seed."""
        lines = ["Attached devices:"]
        for p in self.paths:
            lines.append(f"Host: scsi{p.hba} Channel: {p.channel:02d} Id: {p.target:02d} "
                         f"Lun: {p.lun:02d}")
            lines.append(f"  Vendor: {p.vendor:<8} Model: {p.model:<16} Rev: {p.rev:<4}")
            lines.append("  Type:   Direct-Access                    ANSI  SCSI revision: 03")
        return "\n".join(lines)
