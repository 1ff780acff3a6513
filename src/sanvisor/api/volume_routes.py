"""The volume routes of the agent's API: LVM's commands (docs/volumes.md).

``POST /v1/lvm/{command}`` with ``{"args": {...}}`` runs pvcreate, vgcreate,
lvcreate, lvs... on this host (the arguments are the command line's, by name: see
agent/volume_service.py); the answer is ``{"messages": [...], "warnings": [...],
"data": {...}}`` (pvs, vgs, lvs: ``{"kind", "fields", "rows"}`` with sizes in bytes).
``POST /v1/backup`` backs up a domain's LV from a snapshot (agent/backup.py);
``GET /v1/lvm-devices`` lists the LVs served here. ``POST /v1/multipath/flush``
removes a map (``multipath -f``; every unused one: ``-F``), refused while held.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from sanvisor.agent.storage_service import StorageService


class LvmBody(BaseModel):
    args: dict[str, Any] = Field(default_factory=dict,
                                 description="the command's arguments, by name")


class FlushBody(BaseModel):
    name: str | None = Field(None, description="the map (multipath -f NAME); none: every "
                             "map nothing holds (multipath -F)")


class BackupBody(BaseModel):
    domain: str = Field(description="the domain: name, id or uuid")
    target: str = Field(description="its disk, by target (sda): an LV served here")
    file: str = Field(description="the copy: an absolute path on this host")
    size: str | None = Field(None, description="the snapshot's size (default: a fifth "
                             "of the LV)")
    force: bool = Field(False, description="replace the file if it exists")


def register(app: FastAPI, storage: StorageService | None) -> None:
    if storage is None:
        return
    from sanvisor.agent.volume_service import COMMANDS, VolumeService

    volumes = VolumeService.of(storage)

    @app.post("/v1/lvm/{command}")
    async def lvm(command: str, body: LvmBody) -> dict[str, Any]:
        """One LVM command on this host: one of ``COMMANDS``."""
        return await volumes.run(command, dict(body.args))

    @app.get("/v1/lvm")
    async def lvm_commands() -> dict[str, Any]:
        return {"commands": sorted(COMMANDS), "host": volumes.host}

    @app.post("/v1/multipath/flush")
    async def multipath_flush(body: FlushBody) -> dict[str, Any]:
        """Remove a map, unless something holds it (a guest, a mount, an active LV):
        then refused (409, volume.in_use) naming who."""
        return await volumes.flush_maps(body.name)

    @app.post("/v1/backup")
    async def backup(body: BackupBody) -> dict[str, Any]:
        """Back up a domain's LV from a snapshot (docs/verbs.md, backup): the snapshot is
        made, the copy starts; poll ``GET /v1/backup/{job}`` for its progress."""
        return await volumes.backups.start(body.domain, body.target, body.file, body.size,
                                           body.force)

    @app.get("/v1/backup/{job}")
    async def backup_job(job: str) -> dict[str, Any]:
        """A backup's state: copying, done (its sha256), or failed (its error)."""
        return volumes.backups.job(job).view()

    @app.get("/v1/lvm-devices")
    async def lvm_devices() -> dict[str, Any]:
        """The LVs served here: their names, kind, size, socket, block device, clients."""
        return await volumes.devices()
