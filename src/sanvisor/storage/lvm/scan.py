"""What a host sees: its devices' PVs, grouped into VGs by the metadata they hold.

A VG's metadata is the copy with the highest sequence number among the sound copies
of all its PVs' areas. Copies that are older, empty or damaged (a bad checksum) are
reported, never silently: each command prints a warning naming the copy and the one
used instead, and the VG's next write brings them up to date. A PV the metadata lists
but no device holds is missing; a VG with a missing PV is read, not written (but by
`vgreduce --removemissing`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sanvisor.errors import MetadataError, VolumeNotFoundError
from sanvisor.storage.lvm.blockdev import BlockDevice
from sanvisor.storage.lvm.model import Vg
from sanvisor.storage.lvm.ondisk import format_uuid
from sanvisor.storage.lvm.pvdisk import MdaCopy, PvDisk, read_pv


@dataclass
class VgState:
    vg: Vg
    disks: dict[str, PvDisk] = field(default_factory=dict)  # present PVs, by uuid
    missing: list[str] = field(default_factory=list)  # PV uuids no device holds
    lagging: list[str] = field(default_factory=list)  # copies the next write repairs
    outdated: list[PvDisk] = field(default_factory=list)  # left the VG, still hold it

    def device_name(self, uuid: str) -> str:
        d = self.disks.get(uuid)
        return d.dev.name if d is not None else f"[unknown] ({format_uuid(uuid)})"


@dataclass
class Scan:
    disks: list[PvDisk] = field(default_factory=list)
    vgs: list[VgState] = field(default_factory=list)
    others: list[BlockDevice] = field(default_factory=list)  # devices that are no PV
    warnings: list[str] = field(default_factory=list)

    def vg(self, name: str) -> VgState:
        found = [v for v in self.vgs if v.vg.name == name]
        if not found:
            raise VolumeNotFoundError(f'Volume group "{name}" not found', vg=name)
        if len(found) > 1:
            raise MetadataError(f"two VGs are named {name} "
                                f"({', '.join(format_uuid(v.vg.uuid) for v in found)}): "
                                "rename one with vgrename UUID NEWNAME")
        return found[0]

    def vg_of(self, disk: PvDisk) -> VgState | None:
        return next((v for v in self.vgs if disk.uuid in v.disks), None)

    @property
    def orphans(self) -> list[PvDisk]:
        return [d for d in self.disks if self.vg_of(d) is None]

    def disk(self, name: str) -> PvDisk | None:
        return next((d for d in self.disks if d.dev.name == name), None)


def scan(devices: list[BlockDevice]) -> Scan:
    out = Scan()
    by_uuid: dict[str, PvDisk] = {}
    for dev in devices:
        try:
            disk = read_pv(dev)
        except MetadataError as exc:
            out.warnings.append(f"{dev.name}: {exc}; ignored")
            continue
        except Exception as exc:  # a device that cannot be read is reported, not fatal
            out.warnings.append(f"{dev.name}: cannot read: {exc}")
            continue
        if disk is None:
            out.others.append(dev)
            continue
        if disk.uuid in by_uuid:
            out.warnings.append(f"PV {format_uuid(disk.uuid)} is on both "
                                f"{by_uuid[disk.uuid].dev.name} and {dev.name}: using the "
                                "first (give each LUN one multipath map)")
            continue
        by_uuid[disk.uuid] = disk
        out.disks.append(disk)
    copies = [(d, c) for d in out.disks for c in d.copies if c.vg is not None]
    newest: dict[str, MdaCopy] = {}
    for _, c in copies:
        assert c.vg is not None
        best = newest.get(c.vg.uuid)
        if best is None or c.seqno > best.seqno:
            newest[c.vg.uuid] = c
    for vg_uuid, best in newest.items():
        assert best.vg is not None
        out.vgs.append(_assemble(best, by_uuid, out))
        same = {c.text for _, c in copies
                if c.vg is not None and c.vg.uuid == vg_uuid and c.seqno == best.seqno}
        if len(same) > 1:
            out.warnings.append(f"VG {best.vg.name}: two different metadata copies carry "
                                f"seqno {best.seqno}; using one of them")
    out.vgs.sort(key=lambda v: v.vg.name)
    for d in out.disks:
        if out.vg_of(d) is not None:
            continue
        for c in d.copies:
            if c.error:
                out.warnings.append(f"{c.error} (PV {d.dev.name}, in no VG)")
            elif c.vg is not None:
                owner = next((v for v in out.vgs if v.vg.uuid == c.vg.uuid), None)
                out.warnings.append(f"{d.dev.name} holds old metadata of VG {c.vg.name} "
                                    f"(seqno {c.seqno}) but is not in it any more")
                if owner is not None and d not in owner.outdated:
                    owner.outdated.append(d)
    return out


def _assemble(best: MdaCopy, by_uuid: dict[str, PvDisk], out: Scan) -> VgState:
    assert best.vg is not None
    vg = best.vg
    state = VgState(vg)
    for pv in vg.pvs:
        disk = by_uuid.get(pv.uuid)
        if disk is None:
            state.missing.append(pv.uuid)
            continue
        state.disks[pv.uuid] = disk
        for c in disk.copies:
            where = f"{disk.dev.name} (area at {c.loc.offset})"
            if c.error:
                state.lagging.append(where)
                out.warnings.append(f"{c.error}; VG {vg.name} read from the copy with seqno "
                                    f"{vg.seqno} instead")
            elif c.vg is None or c.vg.uuid != vg.uuid or c.seqno < vg.seqno:
                state.lagging.append(where)
                held = "no metadata" if c.vg is None else f"seqno {c.seqno}"
                out.warnings.append(f"VG {vg.name}: {where} holds {held}, the VG is at seqno "
                                    f"{vg.seqno}; repaired at its next change")
    for uuid in state.missing:
        out.warnings.append(f"VG {vg.name} is missing PV {format_uuid(uuid)} (last written "
                            f"on {vg.pv(uuid).device})")
    return state
