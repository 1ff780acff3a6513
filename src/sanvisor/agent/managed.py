"""Managed domains, as xm had them: `new FILE` registers a domain (its config kept,
agent/configstore.py), `start DOM` runs it, `delete DOM` forgets it, and `list`
shows the registered domains that do not run with state ``------``. `create` stays
the unmanaged path (a registered name is refused there). A domain registered
with autostart (``new --autostart``, or xm's ``on_xend_start = 'start'`` in its
config) is started when the agent starts, as xendomains did at boot; one whose
process died with the host (state lost) is cleared first.
"""

from __future__ import annotations

import logging
from typing import Any

from sanvisor.agent.configstore import Registration
from sanvisor.agent.table import Domain
from sanvisor.agent.verbbase import VerbBase
from sanvisor.errors import ConflictError, NotFoundError, SanvisorError, UsageError
from sanvisor.model.domain import DomainSpec, State
from sanvisor.model.lifecycle import Busy

log = logging.getLogger("sanvisor.agent")
STOPPED_LETTERS = "------"


class ManagedVerbs(VerbBase):
    def _registration(self, name: str) -> Registration:
        reg = self.configs.get(name)
        if reg is None:
            raise NotFoundError(f"domain {name!r} is not registered (sanvisor new FILE "
                                "registers it)", domain=name)
        return reg

    async def register(self, spec: DomainSpec, *, autostart: bool | None = None,
                       source: str = "") -> dict[str, Any]:
        """xm new: keep the config; nothing starts. A registered domain that does not
        run may be registered again (its config replaced)."""
        spec.validate()
        if spec.name == "Domain-0":
            raise UsageError("new: name: Domain-0 is the host's name")
        dom = self.table.by_name(spec.name)
        if dom is not None:
            raise ConflictError(f"domain {spec.name} exists (id {dom.record.domid}, "
                                f"{dom.state.value}): new registers a domain that does not "
                                "run; shut it down or destroy it first", domain=spec.name)
        for r in self.table.reserved.values():
            if r.name == spec.name:
                raise ConflictError(f"domain {spec.name} is {r.why} on this host")
        before = self.configs.get(spec.name)
        if autostart is None:
            autostart = (str(spec.unknown.pop("on_xend_start", "")) == "start"
                         or (before is not None and before.autostart))
        spec.unknown.pop("on_xend_start", None)
        spec.uuid = self.table.registry.uuid_for(spec.name, spec.uuid)
        if spec.uuid in self.table.domains:
            raise ConflictError(f"uuid {spec.uuid} is already used by "
                                f"{self.table.domains[spec.uuid].name}", uuid=spec.uuid)
        reg = Registration(name=spec.name, spec=spec.to_dict(), autostart=autostart,
                           source=source or (spec.source or ""))
        self.configs.put(reg)
        log.info("%s registered%s", spec.name, " (autostart)" if autostart else "")
        return self.registered_row(reg)

    async def start_managed(self, name: str, *, paused: bool = False) -> dict[str, Any]:
        """xm start: run a registered domain from its config."""
        reg = self._registration(name)
        if reg.away:
            raise ConflictError(f"domain {name} {reg.away}: it runs elsewhere, so it is not "
                                "started here (registrations are per host until the pool's "
                                f"store holds them); 'sanvisor new FILE' here takes it back",
                                domain=name)
        dom = self.table.by_name(name)
        if dom is not None:
            raise ConflictError(f"domain {name} is already running (id {dom.record.domid}, "
                                f"{dom.state.value})", domain=name)
        return await self.create(reg.domain_spec(), paused=paused, managed=True)

    async def delete(self, name: str) -> dict[str, Any]:
        """xm delete: forget a registered domain that does not run."""
        reg = self._registration(name)
        dom = self.table.by_name(name)
        if dom is not None:
            raise ConflictError(f"{name} is {dom.state.value} (id {dom.record.domid}): "
                                "delete needs a domain that does not run; shut it down or "
                                "destroy it first", domain=name)
        self.configs.remove(name)
        log.info("%s unregistered", name)
        return {"name": name, "uuid": reg.uuid, "state": "deleted"}

    def registered(self) -> list[dict[str, Any]]:
        return [self.registered_row(r) for r in self.configs.all()]

    def registered_row(self, reg: Registration) -> dict[str, Any]:
        """A registered domain that does not run, as `list` shows it."""
        spec = reg.spec
        return {"name": reg.name, "domid": None, "uuid": reg.uuid,
                "state": "away" if reg.away else "stopped", "reason": reg.away,
                "letters": STOPPED_LETTERS, "mem_mib": spec.get("memory", 0),
                "maxmem_mib": spec.get("maxmem", 0), "vcpus": spec.get("vcpus", 0),
                "maxvcpus": spec.get("maxvcpus", 0), "cpu_seconds": 0.0, "managed": True,
                "autostart": reg.autostart, "source": reg.source, "config": spec}

    def stopped_rows(self, running: set[str]) -> list[dict[str, Any]]:
        return [self.registered_row(r) for r in self.configs.all() if r.name not in running]

    def domain_gone(self, dom: Domain, was: Busy) -> None:
        """A registered domain that left this host by migration runs elsewhere now: it
        must not be started here again (by `start`, or autostart at the next agent start)
        while its registration stays here."""
        reg = self.configs.get(dom.name)
        if was is Busy.MIGRATING and reg is not None and reg.uuid == dom.record.uuid:
            reg.away = "left this host by migration"
            self.configs.put(reg)
            log.warning("%s: %s; its registration here is kept, not started", dom.name,
                        reg.away)

    async def autostart(self) -> list[str]:
        """Start every autostart domain that does not run (the agent's start)."""
        started = []
        for reg in self.configs.all():
            if not reg.autostart or reg.away:
                continue
            dom = self.table.by_name(reg.name)
            try:
                if dom is not None:
                    if dom.state is not State.LOST:
                        continue  # it runs (the agent found it again)
                    async with dom.lock:
                        await self.life.teardown(dom)  # its process died with the host
                await self.start_managed(reg.name)
            except SanvisorError as exc:
                log.warning("autostart: %s: %s", reg.name, exc)
                continue
            log.info("autostart: %s started", reg.name)
            started.append(reg.name)
        return started
