"""One verb's run as a plan: what it checked, what it did, and how to undo it.

A verb checks everything it can without side effects first, then acts step by
step, registering an undo for each step that has one. If a later step fails, the
undos run in reverse order and the error goes on to the caller: a refused or
failed verb leaves nothing behind (no process, no tap, no record, no file).

    async with Plan("network-attach", dom.name) as plan:
        plan.check("MAC free")
        host.plumb(domid, nics)
        plan.did("tap created", lambda: host.unplumb(nics))
        await inst.attach_nic(nics[0])
        plan.did("NIC plugged")
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

log = logging.getLogger("sanvisor.agent")
Undo = Callable[[], "Awaitable[None] | None"]


class Plan:
    def __init__(self, verb: str, name: str) -> None:
        self.verb = verb
        self.name = name
        self.checked: list[str] = []
        self.done: list[str] = []
        self._undo: list[tuple[str, Undo]] = []

    def check(self, what: str) -> None:
        """A prerequisite that held (for the log: what the verb relied on)."""
        self.checked.append(what)

    def did(self, what: str, undo: Undo | None = None) -> None:
        """A step that happened, and how to take it back if a later one fails."""
        self.done.append(what)
        if undo is not None:
            self._undo.append((what, undo))

    def commit(self) -> None:
        """Past this point nothing is undone (the verb's effect is final)."""
        self._undo.clear()

    async def rollback(self) -> list[str]:
        """Undo every registered step, newest first; returns what could not be undone
        (logged; the first failure does not stop the others)."""
        failed = []
        while self._undo:
            what, undo = self._undo.pop()
            try:
                result = undo()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                log.warning("%s %s: could not undo %r: %s", self.verb, self.name, what, exc)
                failed.append(what)
        return failed

    async def __aenter__(self) -> Plan:
        return self

    async def __aexit__(self, et: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if exc is None:
            return
        undone = [what for what, _ in self._undo]
        failed = await self.rollback()
        log.info("%s %s failed (%s); undone: %s%s", self.verb, self.name, exc,
                 ", ".join(reversed(undone)) or "nothing",
                 f"; NOT undone: {', '.join(failed)}" if failed else "")
