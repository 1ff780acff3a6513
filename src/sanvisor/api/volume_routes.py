"""The volume routes of the agent's API: LVM's commands (docs/volumes.md).

``POST /v1/lvm/{command}`` with ``{"args": {...}}`` runs pvcreate, vgcreate,
lvcreate, lvs... on this host (the arguments are the command line's, by name: see
agent/volume_service.py); the answer is ``{"messages": [...], "warnings": [...],
"data": {...}}`` (pvs, vgs, lvs: ``{"kind", "fields", "rows"}`` with sizes in bytes).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from sanvisor.agent.storage_service import StorageService


class LvmBody(BaseModel):
    args: dict[str, Any] = Field(default_factory=dict,
                                 description="the command's arguments, by name")


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
