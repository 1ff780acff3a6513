"""The agent's HTTP API: FastAPI app over the HostService (OpenAPI at /openapi.json)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sanvisor import __version__
from sanvisor.agent.service import HostService
from sanvisor.agent.storage_service import StorageService
from sanvisor.api import volume_routes, xm_routes
from sanvisor.errors import (
    AgentProtocolError,
    AgentUnavailableError,
    ConfigError,
    ConflictError,
    DeviceError,
    InternalError,
    NotFoundError,
    ResourceError,
    SanvisorError,
    SaveFileError,
    TimeoutError_,
    TlsForbiddenError,
    TlsPeerError,
    TlsRefusedError,
    UsageError,
)
from sanvisor.model.config import parse_config_file
from sanvisor.model.domain import DomainSpec

log = logging.getLogger("sanvisor.agent.api")

#: The HTTP status of an error reply: that of the nearest class in the error's MRO, else
#: 500. 4xx: the request does not fit (fix it and retry); 502: another agent failed us.
#: Our client goes by the error's code, not by this (docs/architecture.md, "Errors").
_STATUS: dict[type[SanvisorError], int] = {
    UsageError: 400, ConfigError: 400, SaveFileError: 400, NotFoundError: 404,
    ConflictError: 409, DeviceError: 409, ResourceError: 507, TimeoutError_: 504,
    AgentUnavailableError: 502, AgentProtocolError: 502,
    TlsPeerError: 502, TlsRefusedError: 502, TlsForbiddenError: 403,
}


def http_status(exc: SanvisorError) -> int:
    return next((_STATUS[c] for c in type(exc).__mro__ if c in _STATUS), 500)


def _error_reply(exc: SanvisorError) -> JSONResponse:
    return JSONResponse(status_code=http_status(exc), content={"error": exc.to_dict()})


class _Unexpected:
    """ASGI middleware: an exception no handler meant (anything but a SanvisorError)
    becomes an ``internal`` error reply with its type and message, its traceback in the
    agent log; so the user sees the cause, not a bare 500 without a body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started or scope["type"] != "http":
                raise  # too late for a reply of ours: the server logs it, drops the line
            cause: BaseException = exc
            while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
                cause = cause.exceptions[0]  # a task group's one failure
            request = f"{scope.get('method')} {scope.get('path')}"
            if isinstance(cause, SanvisorError):
                err = cause
            else:
                log.error("%s: unexpected %s: %s", request, type(cause).__name__, cause,
                          exc_info=exc)
                err = InternalError.wrap(cause, request=request)
            await _error_reply(err)(scope, receive, send)


class CreateBody(BaseModel):
    spec: dict[str, Any] | None = Field(None, description="a parsed domain config "
                                        "(DomainSpec); or give config")
    config: str | None = Field(None, description="an xm/xl config file's text, parsed "
                               "here (errors name config_file:line)")
    config_file: str | None = Field(None, description="its path: messages name it, and "
                                    "relative paths in it are relative to its directory")
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE overrides")
    paused: bool = False
    dry_run: bool = Field(False, description="run every check, start nothing, return "
                          "the domain that would start (create -n)")


class ShutdownBody(BaseModel):
    wait: bool = False
    timeout: float = 60.0


class PathBody(BaseModel):
    path: str
    paused: bool = False


class AmountBody(BaseModel):
    value: int


class RescanBody(BaseModel):
    hba: int | None = None


class ScsiAddBody(BaseModel):
    host: int
    channel: int = 0
    id: int = 0
    lun: int


class ConfBody(BaseModel):
    text: str
    source: str = "multipath.conf"


class MigrateBody(BaseModel):
    target: str = Field(description="the target: a host of the pool (its name; reached "
                        "over TCP with mutual TLS), or an agent's unix socket (an "
                        "absolute path, on this machine)")
    live: bool = False
    policy: dict[str, Any] | None = Field(None, description="convergence policy "
                                          "(model/migration.py); default when absent")


class IncomingBody(BaseModel):
    record: dict[str, Any]
    disks: dict[str, str | None] = Field(default_factory=dict,
                                         description="path -> identity on the source")
    live: bool = False
    policy: dict[str, Any] | None = None
    driver: str | None = None
    accelerator: str | None = None
    source: str = Field("", description="the source host's name in the pool")
    token: int | None = Field(None, description="the source's fencing token for it")


class FinishBody(BaseModel):
    resume: bool = Field(True, description="run the domain here once it arrived")
    source: str = Field("", description="the source host's name in the pool")
    token: int | None = Field(None, description="the source's fencing token for the "
                              "domain (pool/ownership.py): the hand-over happens only if "
                              "it is still current")


class DeviceBody(BaseModel):
    spec: str = Field(description="xl disk or vif spec, e.g. 'phy:/dev/sdb,sdc,w'")


def build_app(svc: HostService, storage: StorageService | None = None) -> FastAPI:
    app = FastAPI(title="sanvisor host agent", version=__version__,
                  description="One agent per hypervisor host; the CLI speaks to it.")

    @app.exception_handler(SanvisorError)
    async def on_error(_: Request, exc: SanvisorError) -> JSONResponse:
        return _error_reply(exc)

    app.add_middleware(_Unexpected)  # around on_error, which answered SanvisorErrors already

    @app.get("/v1/host")
    async def host() -> dict[str, Any]:
        return {"version": __version__, "driver": svc.driver.name, **(await svc.domain0())}

    @app.get("/v1/host/info")
    async def host_info() -> dict[str, Any]:
        """`sanvisor info`: host facts (xm info's), the driver and the accelerator."""
        return {"version": __version__, **(await svc.facts())}

    @app.get("/v1/domains")
    async def list_domains() -> list[dict[str, Any]]:
        return await svc.domains()

    @app.get("/v1/stats")
    async def stats() -> list[dict[str, Any]]:
        return await svc.stats()

    @app.post("/v1/domains")
    async def create(body: CreateBody) -> dict[str, Any]:
        warnings: list[str] = []
        if body.config is not None:
            spec, warnings = parse_config_file(body.config, body.config_file, body.overrides)
        elif body.spec is not None:
            try:
                spec = DomainSpec.from_dict(body.spec)
            except (TypeError, ValueError) as exc:
                raise UsageError(f"malformed domain spec: {exc}") from exc
        else:
            raise UsageError("create: give a spec or a config")
        if body.dry_run:
            return {**(await svc.preview(spec)), "warnings": warnings}
        return {**(await svc.create(spec, paused=body.paused)), "warnings": warnings}

    @app.get("/v1/domains/{ref:path}")
    async def info(ref: str) -> dict[str, Any]:
        return await svc.lookup(ref)

    # the verbs answer with the domain as it is afterwards (state "gone" once gone)
    @app.delete("/v1/domains/{ref:path}")
    async def destroy(ref: str) -> dict[str, Any]:
        return await svc.destroy(ref)

    @app.post("/v1/domains/{ref:path}/pause")
    async def pause(ref: str) -> dict[str, Any]:
        return await svc.pause(ref)

    @app.post("/v1/domains/{ref:path}/unpause")
    async def unpause(ref: str) -> dict[str, Any]:
        return await svc.unpause(ref)

    @app.post("/v1/domains/{ref:path}/shutdown")
    async def shutdown(ref: str, body: ShutdownBody) -> dict[str, Any]:
        return await svc.shutdown(ref, wait=body.wait, timeout=body.timeout)

    @app.post("/v1/domains/{ref:path}/reboot")
    async def reboot(ref: str, body: ShutdownBody) -> dict[str, Any]:
        return await svc.reboot(ref, wait=body.wait, timeout=body.timeout)

    @app.post("/v1/domains/{ref:path}/save")
    async def save(ref: str, body: PathBody) -> dict[str, Any]:
        return await svc.save(ref, body.path)

    from sanvisor.agent.migration import Migrations

    migrations = Migrations(svc)

    @app.post("/v1/domains/{ref:path}/migrate")
    async def migrate(ref: str, body: MigrateBody) -> dict[str, Any]:
        from sanvisor.model.migration import ConvergencePolicy

        try:
            policy = ConvergencePolicy.from_dict(body.policy)
        except ValueError as exc:
            raise UsageError(f"migrate: {exc}") from exc
        return await migrations.migrate(ref, body.target, body.live, policy)

    @app.get("/v1/domains/{ref:path}/migration")
    async def migration_status(ref: str) -> dict[str, Any]:
        return migrations.status(ref)

    # the calls a migration's source makes on its target; over the pool's network the
    # caller is an authenticated host (agent/peers.py), which must be the source
    from sanvisor.agent.peers import peer_of

    @app.post("/v1/migrate/incoming")
    async def migrate_incoming(body: IncomingBody, request: Request) -> dict[str, str]:
        return await migrations.incoming(body.model_dump(), peer_of(request.scope))

    @app.post("/v1/migrate/{uuid}/abort")
    async def migrate_abort(uuid: str, request: Request) -> dict[str, str]:
        await migrations.abort(uuid, peer_of(request.scope))
        return {"ok": uuid}

    @app.post("/v1/migrate/{uuid}/switchover")
    async def migrate_switchover(uuid: str, body: FinishBody,
                                 request: Request) -> dict[str, str]:
        await migrations.switchover(uuid, body.model_dump(), peer_of(request.scope))
        return {"result": "switched over"}

    @app.post("/v1/migrate/{uuid}/finish")
    async def migrate_finish(uuid: str, body: FinishBody, request: Request) -> dict[str, Any]:
        return await migrations.finish(uuid, body.model_dump(), peer_of(request.scope))

    @app.post("/v1/restore")
    async def restore(body: PathBody) -> dict[str, Any]:
        return await svc.restore(body.path, paused=body.paused)

    @app.post("/v1/domains/{ref:path}/mem-set")
    async def mem_set(ref: str, body: AmountBody) -> dict[str, Any]:
        return await svc.mem_set(ref, body.value)

    @app.post("/v1/domains/{ref:path}/mem-max")
    async def mem_max(ref: str, body: AmountBody) -> dict[str, Any]:
        return await svc.mem_max(ref, body.value)

    @app.post("/v1/domains/{ref:path}/vcpu-set")
    async def vcpu_set(ref: str, body: AmountBody) -> dict[str, Any]:
        return await svc.vcpu_set(ref, body.value)

    @app.post("/v1/domains/{ref:path}/block-attach")
    async def block_attach(ref: str, body: DeviceBody) -> dict[str, Any]:
        return await svc.block_attach(ref, body.spec)

    @app.post("/v1/domains/{ref:path}/block-detach")
    async def block_detach(ref: str, body: DeviceBody) -> dict[str, Any]:
        return await svc.block_detach(ref, body.spec)

    @app.post("/v1/domains/{ref:path}/network-attach")
    async def network_attach(ref: str, body: DeviceBody) -> dict[str, Any]:
        return await svc.network_attach(ref, body.spec)

    @app.post("/v1/domains/{ref:path}/network-detach")
    async def network_detach(ref: str, body: DeviceBody) -> dict[str, Any]:
        return await svc.network_detach(ref, body.spec)

    if storage is not None:
        _storage_routes(app, storage)
    volume_routes.register(app, storage)
    xm_routes.register(app, svc)
    return app


def _storage_routes(app: FastAPI, st: StorageService) -> None:
    @app.get("/v1/scsi")
    async def scsi_list() -> dict[str, Any]:
        return st.scsi_list()

    @app.post("/v1/scsi/rescan")
    async def scsi_rescan(body: RescanBody) -> dict[str, Any]:
        return await st.scsi_rescan(body.hba)

    @app.get("/v1/multipath")
    async def multipath() -> dict[str, Any]:
        return st.multipath()

    @app.put("/v1/multipath/conf")
    async def multipath_conf(body: ConfBody) -> dict[str, Any]:
        return await st.set_multipath_conf(body.text, body.source)

    @app.post("/v1/scsi/add")
    async def scsi_add(body: ScsiAddBody) -> dict[str, Any]:
        return await st.scsi_add(body.host, body.channel, body.id, body.lun)
