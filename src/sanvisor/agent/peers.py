"""This host's agent on the pool's network: the TCP listener the other hosts call,
with mutual TLS, and how this agent reaches theirs (docs/pool.md).

    host.json   {"name": "host1", "pool": "<pool home>"}: this host is in a pool
    pool.json   each host's ``address`` and ``port`` (8141): where its agent listens
    <home>/tls  this host's credentials (pool/tls.py; `sanvisor pool cert`)

The listener serves the same API as the unix socket, to authenticated hosts of the
pool only, and of it only the calls hosts make on each other (``PEER_ROUTES``: a
migration's incoming, switch-over, finish and abort, and ``GET /v1/host``); anything
else is refused (``tls.forbidden``). An administrator's certificate (``pool admin``:
the CLI on another machine, `-H HOST`) gets the whole API but the hosts' calls. A
connection is accepted only once the TLS handshake proved the peer holds a
certificate of the pool's CA (TLS 1.3); its name is the certificate's host, recorded
for every request of the connection (``peer_of``), and the host must be one of the
pool's. Refused handshakes are logged
with their reason. The local unix socket stays the administrator's (SO_PEERCRED).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from sanvisor.api.client import AgentClient
from sanvisor.api.peer_client import PeerClient, endpoint
from sanvisor.drivers.base import StreamTls
from sanvisor.errors import ConfigError, NotFoundError, TlsCredentialsError, TlsForbiddenError
from sanvisor.pool.config import POOL_FILE, PoolConfig
from sanvisor.pool.tls import (
    HANDSHAKE_TIMEOUT,
    Credentials,
    admin_name,
    client_context,
    describe_peer_failure,
    peer_name,
    server_context,
)

log = logging.getLogger("sanvisor.agent")
PEER_KEY = "sanvisor.peer"  # in each request's scope["state"]: the Peer, on the listener
PEER_ROUTES = re.compile(r"^(POST /v1/migrate/(incoming|[^/]+/(switchover|finish|abort))"
                         r"|GET /v1/host)$")
HOST_ONLY = re.compile(r"^POST /v1/migrate/(incoming|[^/]+/(switchover|finish|abort))$")
_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
          "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
          "domainComponent": "DC", "emailAddress": "EMAIL"}


@dataclass(frozen=True)
class Peer:
    """The host at the other end of a connection, as its certificate proved it."""

    name: str  # the certificate's host name (or administrator's name)
    dn: str  # its subject as QEMU (GnuTLS) writes it: "O=sanvisor,CN=host1"
    known: bool  # a host of the pool
    admin: bool = False  # an administrator's certificate (`pool admin`): the CLI


def subject_dn(cert: dict[str, Any]) -> str:
    """A certificate's subject (``getpeercert()``) in GnuTLS's order and escaping."""
    def esc(v: str) -> str:
        return re.sub(r'([,+"\\<>;])', r"\\\1", v)

    return ",".join("+".join(f"{_SHORT.get(k, k)}={esc(v)}" for k, v in rdn)
                    for rdn in cert.get("subject", ()))


def peer_of(scope: Scope) -> Peer | None:
    """The authenticated host a request came from; None: the local unix socket."""
    peer = (scope.get("state") or {}).get(PEER_KEY)
    return peer if isinstance(peer, Peer) else None


@dataclass
class PoolNetwork:
    host: str  # this host's name in the pool
    pool_home: Path
    creds: Credentials
    address: str  # where this agent listens for its peers (and QEMU for streams)
    port: int
    _server: tuple[tuple[int, ...], ssl.SSLContext] | None = None

    @classmethod
    def of_home(cls, home: Path) -> PoolNetwork | None:
        """This host's place on the pool's network; None when it is in no pool, or its
        pool entry gives it no port (then it is reached by its unix socket only)."""
        try:
            conf = json.loads((home / "host.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        pool, name = conf.get("pool"), conf.get("name")
        if not isinstance(pool, str) or not pool or not isinstance(name, str):
            return None
        try:
            me = PoolConfig.load(Path(pool) / POOL_FILE).host(name)
        except (NotFoundError, ConfigError) as exc:
            log.warning("pool: %s; no TLS listener", exc)
            return None
        if not me.port:
            return None
        creds = Credentials.of_home(home)
        creds.check(name)
        return cls(name, Path(pool), creds, me.address or me.lan, int(me.port))

    def config(self) -> PoolConfig:
        return PoolConfig.load(self.pool_home / POOL_FILE)  # read again: hosts come and go

    def dial(self, name: str) -> tuple[AgentClient, StreamTls | None]:
        """The agent of pool host ``name`` and how a migration stream goes there."""
        host = self.config().host(name)
        if not host.port:  # a host without a TLS endpoint: on this machine, if at all
            return AgentClient(host.socket), None
        client = PeerClient(name, host.address or host.lan, int(host.port), self.creds,
                            client_context(self.creds))
        return client, StreamTls(self.creds.dir, peer=name)

    def stream(self, peer: Peer) -> StreamTls:
        """How this host receives a migration stream from ``peer``."""
        return StreamTls(self.creds.dir, address=self.address, peer_dn=peer.dn)

    def bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.address, self.port))
        except OSError as exc:
            sock.close()
            from sanvisor.errors import ResourceError

            raise ResourceError(f"the agent cannot listen on {endpoint(self.address, self.port)}"
                                f" for its pool: {exc.strerror or exc}",
                                address=self.address, port=self.port) from None
        sock.listen(64)
        return sock

    def server_context(self) -> ssl.SSLContext:
        """The listener's context, made again when the credentials' files change: a
        certificate renewed (`pool cert`) is used from the next connection on."""
        files = (self.creds.ca, self.creds.cert, self.creds.key)
        try:
            stamp = tuple(x for f in files for x in (f.stat().st_mtime_ns, f.stat().st_ino))
        except OSError:
            stamp = ()
        if self._server is None or self._server[0] != stamp:
            self._server = (stamp, server_context(self.creds))
        return self._server[1]

    def protocol(self, base: type) -> type:
        """``base`` (uvicorn's HTTP protocol) with a TLS handshake first on TCP
        connections; unix-socket connections pass as they are."""
        self.server_context()  # unusable credentials: refused at the agent's start
        return _gated(base, self)


def _gated(base: type, net: PoolNetwork) -> type:
    pending: set[asyncio.Task[None]] = set()

    class Gated(base):  # type: ignore[misc]
        _ready = True
        _early: list[bytes]
        app_state: dict[str, Any]

        def connection_made(self, transport: Any) -> None:
            sock = transport.get_extra_info("socket")
            if sock is None or sock.family == socket.AF_UNIX:
                super().connection_made(transport)
                return
            self._ready, self._early = False, []
            # no Nagle: a reply's small TLS records would wait on the client's delayed
            # ACK (~40 ms a call, measured)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport.pause_reading()  # the ClientHello is start_tls's to read
            task = asyncio.get_running_loop().create_task(self._handshake(transport))
            pending.add(task)
            task.add_done_callback(pending.discard)

        async def _handshake(self, raw: Any) -> None:
            addr = raw.get_extra_info("peername") or ("?", 0)
            where = endpoint(str(addr[0]), int(addr[1]))
            try:
                tls = await asyncio.get_running_loop().start_tls(
                    raw, self, net.server_context(), server_side=True,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
            except (OSError, ssl.SSLError, TimeoutError, TlsCredentialsError) as exc:
                log.warning("pool: refused a TLS connection from %s: %s", where,
                            describe_peer_failure(exc))
                raw.abort()
                return
            if tls is None:
                raw.abort()
                return
            cert = tls.get_extra_info("peercert") or {}
            admin = admin_name(cert)
            name = admin or peer_name(cert) or "?"
            try:
                known = admin is None and name in net.config().hosts
            except (NotFoundError, ConfigError):
                known = False
            if not known and admin is None:
                log.warning("pool: %s presents a certificate of the pool's CA for %r, "
                            "which is no host of the pool", where, name)
            self.app_state = {**self.app_state, PEER_KEY: Peer(
                name, subject_dn(cert), known, admin is not None)}
            self._ready = True
            super().connection_made(tls)
            for data in self._early:
                super().data_received(data)
            self._early = []

        def data_received(self, data: bytes) -> None:
            if self._ready:
                super().data_received(data)
            else:
                self._early.append(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._ready:
                super().connection_lost(exc)

        def eof_received(self) -> Any:
            return super().eof_received() if self._ready else None

        def pause_writing(self) -> None:
            if self._ready:
                super().pause_writing()

        def resume_writing(self) -> None:
            if self._ready:
                super().resume_writing()

    return Gated


class PeerGuard:
    """ASGI middleware: what an authenticated host may ask over the pool's network."""

    def __init__(self, app: ASGIApp, pool: str) -> None:
        self.app, self.pool = app, pool

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        peer = peer_of(scope)
        if peer is not None and scope["type"] == "http":
            request = f"{scope.get('method')} {scope.get('path')}"
            err = None
            if peer.admin:  # the whole API, as on the unix socket; but not a host's calls
                if HOST_ONLY.match(request):
                    err = TlsForbiddenError(f"{request}: a call between hosts of the pool, "
                                            f"not an administrator's ({peer.name})",
                                            peer=peer.name)
            elif not peer.known:
                err = TlsForbiddenError(f"{peer.name!r} is no host of pool {self.pool}",
                                        peer=peer.name)
            elif not PEER_ROUTES.match(request):
                err = TlsForbiddenError(f"{request}: not a call hosts of the pool make on "
                                        f"each other ({peer.name} asked)", peer=peer.name)
            if err is not None:
                from fastapi.responses import JSONResponse

                await JSONResponse(status_code=403, content={"error": err.to_dict()})(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)
