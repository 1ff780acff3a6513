"""A host's volume manager: its devices, what they hold, and changes made under the
pool-wide lease (docs/volumes.md).

Every change follows one pattern: scan, take the leases of the devices the change
touches (the VG's PVs; for vgcreate and vgrename, every PV this host sees), scan
again under them (another host may have changed the VG meanwhile), check everything
the command needs, then write: new metadata to every area of the VG's PVs (pvdisk),
each write refused if the lease has lapsed. A command that fails a check writes
nothing. Commands run one at a time on a host.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sanvisor.errors import (
    LeaseError,
    MetadataError,
    MissingPvError,
    VolumeError,
    VolumeInUseError,
)
from sanvisor.storage.lvm.blockdev import BlockDevice
from sanvisor.storage.lvm.lease import LeaseKeeper, lease_area_free
from sanvisor.storage.lvm.model import Vg, vg_to_text
from sanvisor.storage.lvm.ondisk import format_uuid
from sanvisor.storage.lvm.pvdisk import PvDisk, orphan, write_label, write_metadata
from sanvisor.storage.lvm.scan import Scan, VgState, scan


@dataclass
class DeviceRef:
    """A device this host may use as a PV: its name (what pvs prints), its identity
    (a map's WWID, else its path: the engine's map id) and how to open it."""

    name: str
    ident: str
    open: Callable[[], BlockDevice]


@dataclass
class Result:
    messages: list[str] = field(default_factory=list)  # what lvm2 prints on stdout
    data: dict[str, object] = field(default_factory=dict)


class Change:
    """One VG being changed, under its lease: modify ``vg``, then ``commit``."""

    def __init__(self, mgr: VolumeManager, found: Scan, state: VgState,
                 guard: Callable[[], None]) -> None:
        self.mgr, self.scan, self.state, self.guard = mgr, found, state, guard
        self.vg: Vg = copy.deepcopy(state.vg)
        self.joining: dict[str, PvDisk] = {}  # PVs entering the VG, by uuid

    def commit(self, description: str) -> None:
        try:
            self._commit(description)
        except LeaseError as exc:  # some of the new metadata may be on disk
            exc.context["partial"] = True
            raise

    def _commit(self, description: str) -> None:
        self.vg.seqno = self.state.vg.seqno + 1
        disks = {**self.state.disks, **self.joining}
        writing = [disks[p.uuid] for p in self.vg.pvs if p.uuid in disks]
        for d in writing:
            if not d.label.used:
                d.label.used = True
                write_label(d.dev, d.label, self.guard)
        text = vg_to_text(self.vg, description, self.mgr.host)
        write_metadata(writing, text, self.guard)
        kept = {p.uuid for p in self.vg.pvs}
        for d in [*self.state.disks.values(), *self.state.outdated]:
            if d.uuid not in kept:
                orphan(d, self.guard)
        # what is on disk now: a second commit of this change builds on it
        self.state.vg = copy.deepcopy(self.vg)
        self.state.disks = {u: d for u, d in disks.items() if u in kept}
        self.state.outdated, self.state.lagging, self.joining = [], [], {}


class VolumeManager:
    def __init__(self, host: str, devices: Callable[[], list[DeviceRef]],
                 leases: LeaseKeeper | None = None) -> None:
        self.host = host
        self.list_devices = devices
        self.leases = leases
        self.lock = threading.RLock()
        self.opened: dict[str, tuple[DeviceRef, BlockDevice]] = {}  # by name
        self.warnings: list[str] = []  # of the current command
        #: who holds an LV open on this host (its guests, mounts, other clients): set by
        #: the agent; an LV in use is not removed, reduced, renamed or deactivated
        self.in_use: Callable[[str, str], list[str]] | None = None

    # ---- devices --------------------------------------------------------------------
    def devices(self) -> list[BlockDevice]:
        refs = {r.name: r for r in self.list_devices()}
        for name in [n for n in self.opened if n not in refs
                     or refs[n].ident != self.opened[n][0].ident]:
            self.opened.pop(name)[1].close()
        out = []
        for name, ref in refs.items():
            if name not in self.opened:
                try:
                    self.opened[name] = (ref, ref.open())
                except VolumeError as exc:
                    self.warnings.append(str(exc))
                    continue
            out.append(self.opened[name][1])
        return out

    def ident(self, dev: BlockDevice) -> str:
        ref = self.opened.get(dev.name)
        return ref[0].ident if ref is not None else dev.name

    def device(self, name: str) -> BlockDevice:
        """A device by the name given on a command line (/dev/mapper/NAME, NAME or a
        path); VolumeNotFoundError if this host has no such device."""
        from sanvisor.errors import VolumeNotFoundError

        devs = self.devices()
        for cand in (name, f"/dev/mapper/{name}"):
            for d in devs:
                if d.name == cand:
                    return d
        raise VolumeNotFoundError(f"Cannot use {name}: device not found (the multipath maps "
                                  "of this host, or a device added with pvcreate)", device=name)

    def scan(self) -> Scan:
        found = scan(self.devices())
        for w in found.warnings:
            if w not in self.warnings:
                self.warnings.append(w)
        return found

    # ---- changes under the lease ----------------------------------------------------
    def lease_devices(self, disks: list[PvDisk], extra: list[BlockDevice] | None = None
                      ) -> dict[str, BlockDevice]:
        out = {self.ident(d.dev): d.dev for d in disks if lease_area_free(d.label)}
        for dev in extra or []:
            out[self.ident(dev)] = dev
        return out

    @contextlib.contextmanager
    def leased(self, devices: dict[str, BlockDevice]) -> Iterator[Callable[[], None]]:
        if self.leases is None or not devices:
            if self.leases is not None:
                raise LeaseError("no device with a lease area to serialise this change on")
            yield lambda: None
            return
        with self.leases.hold(devices) as guard:
            yield guard

    @contextlib.contextmanager
    def change(self, vg_name: str, *, allow_missing: bool = False,
               extra: list[BlockDevice] | None = None) -> Iterator[Change]:
        """The VG ``vg_name``, fresh under its lease (and the leases of ``extra``
        devices, joining it), to modify and commit."""
        with self.lock:
            keys = self.lease_devices(list(self.scan().vg(vg_name).disks.values()), extra)
            for _ in range(5):
                with self.leased(keys) as guard:
                    found = self.scan()
                    state = found.vg(vg_name)
                    need = self.lease_devices(list(state.disks.values()))
                    if not need.keys() <= keys.keys():
                        keys = {**keys, **need}
                        continue  # the VG gained PVs meanwhile: take theirs too
                    check_writable(state, allow_missing)
                    yield Change(self, found, state, guard)
                    return
            raise LeaseError(f"VG {vg_name} kept changing while its leases were taken")

    @contextlib.contextmanager
    def global_change(self, extra: list[BlockDevice]) -> Iterator[tuple[Scan, Callable[[],
                                                                                      None]]]:
        """Every PV this host sees (and ``extra``), for what must be unique or must not
        race across VGs: VG names, PVs entering a VG."""
        with self.lock:
            found = self.scan()
            keys = self.lease_devices(found.disks, extra)
            with self.leased(keys) as guard:
                yield self.scan(), guard

    def begin(self) -> None:
        self.warnings = []

    def check_unused(self, vg: str, lv: str, doing: str) -> None:
        """VolumeInUseError naming who holds ``vg/lv`` open here, if anyone does."""
        holders = self.in_use(vg, lv) if self.in_use is not None else []
        if holders:
            raise VolumeInUseError(f"Logical volume {vg}/{lv} is in use by "
                                   f"{', '.join(holders)}: cannot {doing} it", vg=vg, lv=lv,
                                   holders=holders)


def check_writable(state: VgState, allow_missing: bool = False) -> None:
    vg = state.vg
    if state.missing and not allow_missing:
        names = ", ".join(f"{format_uuid(u)} (last on {vg.pv(u).device})"
                          for u in state.missing)
        raise MissingPvError(f"Cannot change VG {vg.name} while PVs are missing: {names}; "
                             f"run vgreduce --removemissing {vg.name}", vg=vg.name)
    for lv in vg.lvs:
        for seg in lv.segments:
            if seg.type not in ("striped", "snapshot"):
                raise MetadataError(f"VG {vg.name} has LV {lv.name} of type {seg.type}, which "
                                    "sanvisor reads but does not change: use lvm2", vg=vg.name)
    if "WRITE" not in vg.status or "EXPORTED" in vg.status:
        raise MetadataError(f"VG {vg.name} is read-only or exported", vg=vg.name)
