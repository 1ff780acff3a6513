"""dump-core, sysrq, trigger, rename; dmesg, log and console history.

dump-core writes the hypervisor's core file (QEMU: an ELF `crash` and gdb read;
Xen: xl's) through a new file created O_EXCL|O_NOFOLLOW next to the target, renamed
over it once whole: a failed dump leaves nothing. The domain runs on afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from pathlib import Path
from typing import Any

from sanvisor.agent import eventlog
from sanvisor.agent.plan import Plan
from sanvisor.agent.verbbase import VerbBase
from sanvisor.errors import ConfigError, ConflictError, NotFoundError, UsageError
from sanvisor.model import lifecycle
from sanvisor.model.domain import DomainSpec

TRIGGERS = ("nmi", "reset", "power")
#: SysRq keys Linux knows (a letter or digit; xm sent one character)
_SYSRQ = re.compile(r"^[0-9a-z]\Z")
RESERVED_NAMES = ("Domain-0",)


class DiagVerbs(VerbBase):
    async def dump_core(self, ref: str, path: str) -> dict[str, Any]:
        dom = self.find(ref)
        target = Path(path)
        if not target.is_absolute():
            raise UsageError(f"dump-core: {path}: give an absolute path", path=path)
        if not target.parent.is_dir():
            raise ConfigError(f"dump-core: {target.parent}: no such directory", path=path)
        if target.is_dir():
            raise ConfigError(f"dump-core: {path} is a directory", path=path)
        tmp = f"{path}.part"
        async with dom.lock, Plan("dump-core", dom.name) as plan:
            inst = self.admit(dom, "dump-core")
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                raise ConflictError(f"dump-core: {tmp} exists (another dump in progress, "
                                    "or left by a crash: remove it)", path=tmp) from None
            except OSError as exc:
                raise ConfigError(f"dump-core: {tmp}: {exc.strerror}", path=path) from exc
            held = [fd]
            plan.did(f"{tmp} created", lambda: _drop(held, tmp))
            await inst.dump_core(fd)
            size = os.fstat(fd).st_size
            os.close(held.pop())
            os.replace(tmp, path)
            plan.commit()
        return {**self.view(dom), "path": path, "bytes": size}

    async def sysrq(self, ref: str, key: str) -> dict[str, Any]:
        if not _SYSRQ.match(key):
            raise UsageError(f"sysrq: key {key!r} is not a SysRq key (one letter or digit, "
                             "e.g. s sync, u remount read-only, b reboot, h help)")
        dom = self.find(ref)
        async with dom.lock:
            await self.admit(dom, "sysrq").sysrq(key)
        return self.view(dom)

    async def trigger(self, ref: str, what: str) -> dict[str, Any]:
        if what not in TRIGGERS:
            raise UsageError(f"trigger: {what!r} is not one of {', '.join(TRIGGERS)}")
        dom = self.find(ref)
        async with dom.lock:
            await self.admit(dom, "trigger").trigger(what)
        return self.view(dom)

    async def rename(self, ref: str, new: str) -> dict[str, Any]:
        """xm rename: the domain keeps its uuid, MACs and id; its registered config (a
        managed domain) follows the new name."""
        try:
            DomainSpec(name=new).validate()
        except ConfigError:
            raise UsageError(f"rename: name: invalid domain name {new!r}") from None
        if new in RESERVED_NAMES:
            raise UsageError(f"rename: name: {new} is the host's name")
        dom = self.find(ref)
        async with dom.lock, Plan("rename", dom.name) as plan:
            lifecycle.check("rename", dom.state, dom.name)
            old = dom.name
            if new == old:
                return self.view(dom)
            other = self.table.by_name(new)
            if other is not None or any(r.name == new for r in self.table.reserved.values()):
                raise ConflictError(f"rename: domain {new} already exists", domain=new)
            if self.configs.get(new) is not None:
                raise ConflictError(f"rename: {new} is the name of a registered domain "
                                    "(sanvisor delete it first)", domain=new)
            dom.record.spec.name = new
            plan.did("renamed in the record", lambda: setattr(dom.record.spec, "name", old))
            if dom.inst is not None:
                await dom.inst.renamed(old)
            self.table.registry.rename(old, new)
            if self.configs.get(old) is not None:
                self.configs.rename(old, new)
            self.remember(dom)
            plan.commit()
        return self.view(dom)

    async def dmesg(self, clear: bool = False) -> dict[str, Any]:
        """The hypervisor's messages (`xl dmesg`), or on a QEMU host the agent's event
        log in their stead."""
        text = await asyncio.to_thread(self.driver.hypervisor_log, clear)
        if text is not None:
            return {"source": self.driver.name, "text": text}
        events = eventlog.for_home(self.table.layout.home)
        return {"source": "agent", "text": await asyncio.to_thread(events.read, clear=clear)}

    async def agent_log(self, lines: int = 0) -> dict[str, Any]:
        """The agent's own log (xm log: xend.log)."""
        path = self.table.layout.log
        return {"path": str(path),
                "text": await asyncio.to_thread(eventlog.tail, path, lines)}

    async def console_history(self, ref: str, lines: int = 0) -> dict[str, Any]:
        """What the domain printed on its console since it started here (its
        console.log), attached or not."""
        dom = self.find(ref)
        path = self.table.layout.domain_dir(dom.record.uuid) / "console.log"
        if not path.exists() and dom.inst is None:
            raise NotFoundError(f"{dom.name} has no console log", domain=dom.name)
        return {"name": dom.name, "path": str(path),
                "text": await asyncio.to_thread(eventlog.tail, path, lines)}


def _drop(held: list[int], tmp: str) -> None:
    if held:
        os.close(held.pop())
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
