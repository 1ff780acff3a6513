"""save and restore: a domain's state to a file and back (xm save / xm restore).

The file is sanvisor's save file (agent/savefile.py): a checked header with the
domain's record, then the hypervisor's migration stream. Hashing it (seconds for a
large guest) runs in a worker thread: the agent's event loop also carries every
guest's multipath I/O. A save file is input from outside: its record is checked
field by field, as a config file is, before anything starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

from sanvisor.agent import savefile
from sanvisor.agent.plan import Plan
from sanvisor.agent.records import DomainRecord
from sanvisor.agent.verbbase import VerbBase
from sanvisor.errors import (
    ConfigError,
    ConflictError,
    HypervisorError,
    RecordError,
)
from sanvisor.model.domain import State
from sanvisor.model.lifecycle import Busy


class SaveVerbs(VerbBase):
    async def save(self, ref: str, path: str) -> dict[str, Any]:
        dom = self.find(ref)
        target = Path(path)
        if not target.parent.is_dir():
            raise ConfigError(f"save: {target.parent}: no such directory", path=path)
        if target.is_dir():
            raise ConfigError(f"save: {path} is a directory", path=path)
        async with dom.lock, Plan("save", dom.name) as plan:
            inst = self.admit(dom, "save")
            was = dom.state
            tmp = f"{path}.part"
            try:  # a new file, never through a symlink planted at its name
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                raise ConflictError(f"save: {tmp} exists (another save in progress, or "
                                    "left by a crash: remove it)", path=tmp) from None
            except OSError as exc:
                raise ConfigError(f"save: {tmp}: {exc.strerror}", path=path) from exc
            held = [fd]  # closed once: a closed fd's number may belong to another file
            plan.did(f"{tmp} created", lambda: _drop(held, tmp))
            dom.busy = Busy.SAVING
            plan.did("marked as saving", lambda: self._resume(dom, was))
            os.pwrite(fd, b" " * savefile.HEADER_SIZE, 0)
            os.lseek(fd, savefile.HEADER_SIZE, os.SEEK_SET)
            await inst.save_to(fd)  # the guest stops here (and stays stopped)
            plan.did("guest state written")
            await asyncio.to_thread(savefile.write_header, fd, dom.record.to_dict(),
                                    self.driver.name)
            os.close(held.pop())
            os.replace(tmp, path)
            plan.commit()  # the file is whole: from here the domain's place is the file
            await self.life.teardown(dom)
        return {**self.view(dom), "path": path}

    async def _resume(self, dom: Any, was: State) -> None:
        """A failed save gives the domain back as it was."""
        dom.busy = Busy.NONE
        if was is State.RUNNING and dom.inst is not None:
            await dom.inst.unpause()

    async def restore(self, path: str, *, paused: bool = False) -> dict[str, Any]:
        fd, hdr = await asyncio.to_thread(savefile.read_header, Path(path))
        try:
            if hdr.get("hypervisor") != self.driver.name:
                raise HypervisorError(f"{path}: saved by the {hdr.get('hypervisor')} driver, "
                                      f"this host runs {self.driver.name}")
            try:
                rec = DomainRecord.from_untrusted(hdr["record"])
            except RecordError as exc:
                raise RecordError(f"{path}: {exc}", path=path) from exc
            self.table.check_free(rec.spec.name, rec.uuid, [n.mac for n in rec.nics])
            self.host.check_memory(rec.spec.memory + sum(rec.dimms_mib))
            for f in (rec.kernel, rec.initrd):
                if f and not self.host.remote and not os.path.exists(f):  # dom0's: xl says
                    raise HypervisorError(f"{path}: the domain's boot file {f} is gone")
            self.host.check_disks(rec.spec)
            rec.domid = self.table.registry.next_domid()
            rec.pid = 0  # the saved process is long gone; its pid may be another's now
            rec.state, rec.reason = (State.PAUSED if paused else State.RUNNING), "restored"
            rec.created = time.time()
            for nic in rec.nics:
                nic.tap = None  # taps are this host's, made at start
            return await self.start(rec, paused=paused, incoming_fd=fd)
        finally:
            os.close(fd)


def _drop(held: list[int], tmp: str) -> None:
    if held:
        os.close(held.pop())
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
