"""The API of xm's other verbs: managed domains, vCPUs and scheduling, diagnostics,
logs, every-domain shutdown/reboot, and xm's device tables.

Reads that name a domain live under their own prefix (``/v1/vcpu-list/{ref}``...):
``GET /v1/domains/{ref:path}`` would take them otherwise (a path parameter).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from sanvisor.agent.service import HostService
from sanvisor.errors import UsageError
from sanvisor.model.config import parse_config_file
from sanvisor.model.domain import DomainSpec

#: config keys of xm that `new` reads itself (not "unknown" to it); on_xend_stop stays
#: unknown (guests outlive the agent: nothing is done to them when it stops)
_NEW_KEYS = ("on_xend_start",)


class NewBody(BaseModel):
    config: str | None = Field(None, description="an xm/xl config file's text")
    spec: dict[str, Any] | None = Field(None, description="or a parsed config (a "
                                        "registration moving from another host)")
    config_file: str | None = Field(None, description="its path (for messages)")
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE overrides")
    autostart: bool | None = Field(None, description="start it with the agent; None: "
                                   "the config's on_xend_start, else as registered")


class StartBody(BaseModel):
    paused: bool = False


class PinBody(BaseModel):
    vcpu: str = Field(description="a vCPU number, or all")
    cpus: str = Field(description="host CPUs: 0-3,^2, 1,3 or all")


class CreditBody(BaseModel):
    weight: int | None = None
    cap: int | None = None


class AllBody(BaseModel):
    verb: str = Field(description="shutdown or reboot")
    wait: bool = False
    timeout: float = 60.0


class KeyBody(BaseModel):
    key: str


class NameBody(BaseModel):
    name: str


class PathOnly(BaseModel):
    path: str


class ClearBody(BaseModel):
    clear: bool = False


def register(app: FastAPI, svc: HostService) -> None:
    # ---- managed domains ------------------------------------------------------------
    @app.get("/v1/managed")
    async def managed() -> list[dict[str, Any]]:
        return svc.registered()

    @app.post("/v1/managed")
    async def new(body: NewBody) -> dict[str, Any]:
        warnings: list[str] = []
        if body.config is not None:
            spec, warnings = parse_config_file(body.config, body.config_file,
                                               body.overrides)
            warnings = [w for w in warnings if not any(f"'{k}'" in w for k in _NEW_KEYS)]
        elif body.spec is not None:
            try:
                spec = DomainSpec.from_dict(body.spec)
            except (TypeError, ValueError) as exc:
                raise UsageError(f"new: malformed domain spec: {exc}") from exc
        else:
            raise UsageError("new: give a config or a spec")
        return {**(await svc.register(spec, autostart=body.autostart,
                                      source=body.config_file or "")),
                "warnings": warnings}

    @app.post("/v1/managed/{name}/start")
    async def start(name: str, body: StartBody) -> dict[str, Any]:
        return await svc.start_managed(name, paused=body.paused)

    @app.delete("/v1/managed/{name}")
    async def delete(name: str) -> dict[str, Any]:
        return await svc.delete(name)

    # ---- vCPUs and scheduling -------------------------------------------------------
    @app.get("/v1/vcpu-list")
    async def vcpu_list_all() -> list[dict[str, Any]]:
        return await svc.vcpu_list(None)

    @app.get("/v1/vcpu-list/{ref:path}")
    async def vcpu_list(ref: str) -> list[dict[str, Any]]:
        return await svc.vcpu_list(ref)

    @app.post("/v1/domains/{ref:path}/vcpu-pin")
    async def vcpu_pin(ref: str, body: PinBody) -> list[dict[str, Any]]:
        return await svc.vcpu_pin(ref, body.vcpu, body.cpus)

    @app.get("/v1/sched-credit")
    async def credit_all() -> list[dict[str, Any]]:
        return await svc.sched_credit(None)

    @app.post("/v1/domains/{ref:path}/sched-credit")
    async def credit(ref: str, body: CreditBody) -> list[dict[str, Any]]:
        return await svc.sched_credit(ref, body.weight, body.cap)

    # ---- all at once ------------------------------------------------------------------
    @app.post("/v1/all")
    async def all_domains(body: AllBody) -> list[dict[str, Any]]:
        if body.verb not in ("shutdown", "reboot"):
            raise UsageError(f"all: {body.verb!r} is not shutdown or reboot")
        return await svc.all_domains(body.verb, wait=body.wait, timeout=body.timeout)

    # ---- diagnostics ------------------------------------------------------------------
    @app.post("/v1/domains/{ref:path}/dump-core")
    async def dump_core(ref: str, body: PathOnly) -> dict[str, Any]:
        return await svc.dump_core(ref, body.path)

    @app.post("/v1/domains/{ref:path}/sysrq")
    async def sysrq(ref: str, body: KeyBody) -> dict[str, Any]:
        return await svc.sysrq(ref, body.key)

    @app.post("/v1/domains/{ref:path}/trigger")
    async def trigger(ref: str, body: KeyBody) -> dict[str, Any]:
        return await svc.trigger(ref, body.key)

    @app.post("/v1/domains/{ref:path}/rename")
    async def rename(ref: str, body: NameBody) -> dict[str, Any]:
        return await svc.rename(ref, body.name)

    # ---- logs -------------------------------------------------------------------------
    @app.post("/v1/dmesg")
    async def dmesg(body: ClearBody) -> dict[str, Any]:
        return await svc.dmesg(body.clear)

    @app.get("/v1/log")
    async def agent_log(lines: int = 0) -> dict[str, Any]:
        return await svc.agent_log(lines)

    @app.get("/v1/console-log/{ref:path}")
    async def console_log(ref: str, lines: int = 0) -> dict[str, Any]:
        return await svc.console_history(ref, lines)

    # ---- xm's device tables ----------------------------------------------------------
    @app.get("/v1/block-list/{ref:path}")
    async def block_list(ref: str) -> list[dict[str, Any]]:
        return await svc.device_rows(ref, "block")

    @app.get("/v1/network-list/{ref:path}")
    async def network_list(ref: str) -> list[dict[str, Any]]:
        return await svc.device_rows(ref, "network")
