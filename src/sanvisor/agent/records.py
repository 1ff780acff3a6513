"""What the agent keeps on disk: one record per domain, and the host registry.

Writes are atomic (temp file + rename), so a crash never leaves half a record.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sanvisor.drivers.base import NicPlan
from sanvisor.errors import ConfigError, RecordError
from sanvisor.model.cpulist import MAX_CPUS
from sanvisor.model.domain import XEN_OUI, DomainSpec, State, VifSpec
from sanvisor.model.sched import Credit

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class DomainRecord:
    uuid: str
    domid: int
    spec: DomainSpec  # the current configuration (hot-added disks/NICs included)
    nics: list[NicPlan] = field(default_factory=list)
    kernel: str = ""
    initrd: str | None = None
    cmdline: str = ""
    pid: int = 0
    state: State = State.RUNNING
    reason: str = ""  # why the state is what it is (e.g. "QEMU exited")
    created: float = field(default_factory=time.time)
    target_mib: int = 0  # balloon target
    max_mib: int = 0  # mem-max ceiling
    dimms_mib: list[int] = field(default_factory=list)
    vcpus: int = 0  # online in the guest
    vcpus_present: int = 0  # plugged into the hypervisor (>= vcpus)
    vcpu_pins: dict[str, list[int]] = field(default_factory=dict)  # vcpu-pin: vCPU -> CPUs
    credit: dict[str, int] = field(default_factory=dict)  # sched-credit: weight, cap

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        d["state"] = self.state.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DomainRecord:
        d = dict(d)
        d["spec"] = DomainSpec.from_dict(d["spec"])
        d["state"] = State(d["state"])
        d["nics"] = [
            NicPlan(index=n["index"], vif=VifSpec(**n["vif"]), mac=n["mac"], tap=n["tap"])
            for n in d.get("nics", [])
        ]
        return cls(**d)

    @classmethod
    def from_untrusted(cls, d: object) -> DomainRecord:
        """A record from outside the agent (a save file, an incoming migration): every
        field checked as a config file's would be. Raises RecordError (one line)."""
        if not isinstance(d, dict):
            raise RecordError("the domain record is not an object")
        try:
            rec = cls.from_dict(d)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            detail = repr(str(exc))[1:-1]  # one line, whatever the keys were
            raise RecordError(f"malformed domain record ({type(exc).__name__}: {detail})"
                              ) from None
        try:
            rec.spec.validate()
        except ConfigError as exc:
            raise RecordError(f"domain record: {repr(str(exc))[1:-1]}") from None
        rec.check()
        return rec

    def check(self) -> None:
        """The record's own fields (beyond its spec): types, forms, consistency."""
        def want(ok: bool, what: str) -> None:
            if not ok:
                raise RecordError(f"domain record: invalid {what}")

        want(isinstance(self.uuid, str) and _UUID_RE.match(self.uuid) is not None
             and self.spec.uuid in (None, self.uuid), "uuid")
        for key in ("domid", "pid", "target_mib", "max_mib", "vcpus", "vcpus_present"):
            v = getattr(self, key)
            want(isinstance(v, int) and not isinstance(v, bool) and -2 < v < 1 << 40, key)
        for key in ("kernel", "initrd", "cmdline", "reason"):
            v = getattr(self, key)
            want(v is None or (isinstance(v, str) and "\0" not in v), key)
        want(isinstance(self.kernel, str) and (self.kernel == "" or
                                               self.kernel.startswith("/")), "kernel")
        want(self.initrd is None or self.initrd.startswith("/"), "initrd")
        want(isinstance(self.created, (int, float)), "created")
        want(isinstance(self.dimms_mib, list) and all(
            isinstance(m, int) and 0 < m <= self.spec.maxmem for m in self.dimms_mib),
            "dimms_mib")
        want(isinstance(self.vcpu_pins, dict) and all(
            isinstance(k, str) and k.isascii() and k.isdigit() and int(k) < self.spec.maxvcpus
            and isinstance(v, list) and v and all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c < MAX_CPUS
                for c in v) for k, v in self.vcpu_pins.items()), "vcpu_pins")
        try:
            if self.credit:
                Credit.from_dict(self.credit, maxvcpus=self.spec.maxvcpus)
        except ValueError:
            want(False, "credit")
        indexes: set[int] = set()
        for nic in self.nics:
            want(isinstance(nic.index, int) and 0 <= nic.index < 64
                 and nic.index not in indexes, "NIC index")
            indexes.add(nic.index)
            try:
                VifSpec.check_mac(str(nic.mac))
                if nic.tap is not None:
                    VifSpec.check_ifname("tap", str(nic.tap))
                DomainSpec(name=self.spec.name, vifs=[nic.vif]).validate()
            except (ValueError, ConfigError) as exc:
                raise RecordError(f"domain record: NIC {nic.index}: {exc}") from None

    def save(self, dirpath: Path) -> None:
        dirpath.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json(dirpath / "domain.json", self.to_dict())


def load_records(domains_dir: Path) -> list[DomainRecord]:
    out: list[DomainRecord] = []
    if not domains_dir.exists():
        return out
    for sub in sorted(domains_dir.iterdir()):
        f = sub / "domain.json"
        if f.exists():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                out.append(DomainRecord.from_dict(json.loads(f.read_text())))
    return out


class Registry:
    """Host-wide memory: next domain id, and the MAC and UUID each name was given.

    A MAC assigned to a domain is kept for that name forever, so a guest that is
    destroyed and created again keeps its MAC (the seed's udev eth0->eth1 trap).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"next_domid": 1, "names": {}}
        self._held = 0  # > 0: inside batch(); saves wait for its end
        self._dirty = False
        if path.exists():
            with contextlib.suppress(ValueError, OSError):
                self.data.update(json.loads(path.read_text()))

    def save(self) -> None:
        if self._held:
            self._dirty = True
            return
        write_json(self.path, self.data)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """One write (and fsync) for all the changes made inside, at its end: a create
        assigns a uuid, a domain id and MACs, each of which used to write the file."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
            if not self._held and self._dirty:
                self._dirty = False
                write_json(self.path, self.data)

    def next_domid(self, *, dry: bool = False) -> int:
        """The next domain id (``dry``: the one the next create would get, unused)."""
        n = int(self.data["next_domid"])
        if not dry:
            self.data["next_domid"] = n + 1
            self.save()
        return n

    def _entry(self, name: str, dry: bool = False) -> dict[str, Any]:
        names: dict[str, Any] = self.data["names"]
        if dry:
            return dict(names.get(name) or {"macs": {}}, macs=dict(
                (names.get(name) or {}).get("macs", {})))
        entry: dict[str, Any] = names.setdefault(name, {"macs": {}})
        return entry

    def uuid_for(self, name: str, given: str | None, *, dry: bool = False) -> str:
        e = self._entry(name, dry)
        if given:
            e["uuid"] = given
        elif "uuid" not in e:
            e["uuid"] = str(uuidlib.uuid4())
        if not dry:
            self.save()
        return str(e["uuid"])

    def rename(self, old: str, new: str) -> None:
        """A domain renamed: its uuid and MACs go with it to the new name (what the
        registry held for a past domain of that name is forgotten)."""
        names: dict[str, Any] = self.data["names"]
        if old in names:
            names[new] = names.pop(old)
            self.save()

    def all_macs(self, except_name: str | None = None) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, e in self.data["names"].items():
            if name == except_name:
                continue
            for mac in e.get("macs", {}).values():
                out[mac] = name
        return out

    def mac_for(self, name: str, index: int, given: str | None, *, dry: bool = False) -> str:
        """The MAC for NIC ``index`` of ``name``: given, remembered, or new (Xen OUI).
        ``dry``: what it would be, remembering nothing."""
        e = self._entry(name, dry)
        macs: dict[str, str] = e["macs"]
        if given:
            macs[str(index)] = given
        elif str(index) not in macs:
            taken = set(self.all_macs())
            while True:
                b = secrets.token_bytes(3)
                mac = f"{XEN_OUI}:{b[0] & 0x7F:02x}:{b[1]:02x}:{b[2]:02x}"
                if mac not in taken:
                    break
            macs[str(index)] = mac
        if not dry:
            self.save()
        return macs[str(index)]
