"""The agent's storage verbs: SCSI discovery (and multipath, built on it)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sanvisor.storage.scsi import ScsiTable


class StorageService:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.lock = asyncio.Lock()

    def scsi_list(self) -> dict[str, Any]:
        table = ScsiTable(self.home)
        return {"paths": [asdict(p) | {"hctl": p.hctl} for p in table.paths],
                "text": table.proc_scsi()}

    async def scsi_rescan(self, hba: int | None) -> dict[str, Any]:
        async with self.lock:
            return await asyncio.to_thread(ScsiTable(self.home).rescan, hba)

    async def scsi_add(self, hba: int, channel: int, target: int, lun: int) -> dict[str, Any]:
        async with self.lock:
            p = await asyncio.to_thread(ScsiTable(self.home).add_single, hba, channel, target,
                                        lun)
            return asdict(p) | {"hctl": p.hctl}
