"""The agent API of another host of the pool, over TCP with mutual TLS (docs/pool.md).

The same requests and replies as the unix-socket client (api/client.py); only the
transport differs: this host presents its own certificate, checks that the other's is
signed by the pool's CA and names the host it dialled. A failure is one line naming
the host, its address and the reason (pool/tls.py).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from sanvisor.api.client import AgentClient, parse_reply
from sanvisor.errors import AgentUnavailableError, ConfigError, NotFoundError, TlsCredentialsError
from sanvisor.pool.tls import (
    ADMIN_DIR,
    CLIENT_CERT,
    CONNECT_TIMEOUT,
    Credentials,
    client_context,
    closed_in_handshake,
    failure,
)


def endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def remote_for(sock: Path, timeout: float) -> PeerClient | None:
    """The CLI's way to the agent whose unix socket ``sock`` would be, when that is a
    host of the pool (pool.json) whose home is not on this machine and which listens on
    the pool's network: TCP with mutual TLS, the pool's administrator certificate
    (``<pool home>/admin/tls``, `sanvisor pool admin`). None: no such host."""
    from sanvisor import where
    from sanvisor.pool.config import POOL_FILE, PoolConfig

    home = Path(where.pool_home())
    try:
        pool = PoolConfig.load(home / POOL_FILE)
    except (NotFoundError, ConfigError):
        return None
    for h in pool.hosts.values():
        if str(h.socket) != str(sock) or not h.port or Path(h.home).exists():
            continue
        creds = Credentials(home / ADMIN_DIR)
        if not (creds.dir / CLIENT_CERT).exists():
            raise TlsCredentialsError(
                f"{h.name}'s agent is on another machine ({endpoint(h.address or h.lan, h.port)}"
                f"), and there is no administrator's certificate in {creds.dir} (make one "
                "with 'sanvisor pool admin NAME' where the pool's CA is)", path=str(creds.dir))
        return PeerClient(h.name, h.address or h.lan, int(h.port), creds, timeout=timeout)
    return None


class PeerClient(AgentClient):
    def __init__(self, host: str, address: str, port: int, creds: Credentials,
                 context: ssl.SSLContext | None = None, timeout: float = 900.0) -> None:
        super().__init__(Path(endpoint(address, port)), timeout)
        self.peer, self.address, self.port = host, address, port
        self.creds = creds
        self.context = context or client_context(creds)

    @property
    def where(self) -> str:
        return endpoint(self.address, self.port)

    def _exchange(self, request: bytes) -> tuple[int, bytes]:
        try:
            return self._tls_exchange(request)
        except _Closed:
            raise closed_in_handshake(self.peer, self.where, self.creds) from None
        except (ssl.SSLError, ssl.CertificateError) as exc:
            err = failure(exc, self.peer, self.where, self.creds)
            if err is None:
                raise
            raise err from None
        except ConnectionRefusedError:
            raise AgentUnavailableError(f"no agent of {self.peer} answers at {self.where} "
                                        "(connection refused)", host=self.peer,
                                        address=self.where) from None
        except TimeoutError:
            raise AgentUnavailableError(f"{self.peer} ({self.where}) did not answer in time",
                                        host=self.peer, address=self.where) from None
        except OSError as exc:
            raise AgentUnavailableError(f"{self.peer} ({self.where}): "
                                        f"{exc.strerror or exc}", host=self.peer,
                                        address=self.where) from None

    def _tls_exchange(self, request: bytes) -> tuple[int, bytes]:
        raw = socket.create_connection((self.address, self.port), timeout=CONNECT_TIMEOUT)
        # no Nagle: the handshake's and the request's small writes would each wait for
        # the other side's delayed ACK (~40 ms a call, measured)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # the handshake has the call's time, as a unix socket's caller waits for the
        # reply: a busy agent's loop may take seconds to get to it
        raw.settimeout(self.timeout)
        chunks: list[bytes] = []
        with raw, self.context.wrap_socket(raw, server_hostname=self.peer) as tls:
            try:
                tls.sendall(request)
                while chunk := tls.recv(65536):
                    chunks.append(chunk)
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError,
                    BrokenPipeError):
                if not chunks:  # refused once it saw our certificate (TLS 1.3)
                    raise _Closed from None
                # else a server that closed without close_notify: what came
        if not chunks:
            raise _Closed
        return parse_reply(b"".join(chunks))


class _Closed(Exception):
    """The server closed the connection before any reply."""
