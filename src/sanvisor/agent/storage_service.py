"""The agent's storage verbs: SCSI discovery (and multipath, built on it)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sanvisor.storage.multipathd import Multipathd
from sanvisor.storage.scsi import ScsiTable


class StorageService:
    def __init__(self, home: Path, mpd: Multipathd) -> None:
        self.home = home
        self.mpd = mpd
        self.lock = asyncio.Lock()

    def scsi_list(self) -> dict[str, Any]:
        table = ScsiTable(self.home)
        return {"paths": [asdict(p) | {"hctl": p.hctl} for p in table.paths],
                "text": table.proc_scsi()}

    async def scsi_rescan(self, hba: int | None) -> dict[str, Any]:
        async with self.lock:
            result = await asyncio.to_thread(ScsiTable(self.home).rescan, hba)
        await self.mpd.reload(reconfigure=True)
        return result

    async def scsi_add(self, hba: int, channel: int, target: int, lun: int) -> dict[str, Any]:
        async with self.lock:
            p = await asyncio.to_thread(ScsiTable(self.home).add_single, hba, channel, target,
                                        lun)
        await self.mpd.reload(reconfigure=True)
        return asdict(p) | {"hctl": p.hctl}

    def multipath(self) -> dict[str, Any]:
        return self.mpd.view()

    async def set_multipath_conf(self, text: str, source: str) -> dict[str, Any]:
        self.mpd.set_conf(text, source)
        await self.mpd.reload(reconfigure=True)
        return self.mpd.view()
