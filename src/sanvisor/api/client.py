"""The typed client of the agent API, over the agent's unix socket.

It speaks a minimal HTTP/1.1 itself (one request per connection, Connection:
close, JSON bodies with Content-Length) instead of using httpx or http.client:
every CLI call pays the client's import time, and the toolstack's overhead
budget for `create` is tens of milliseconds (http.client alone costs ~16 ms
to import here, httpx ~80 ms).
"""

from __future__ import annotations

import _socket  # socket.py costs ~3 ms more to import (its IntEnums); this is all we use
import json

from sanvisor.errors import AgentProtocolError, AgentUnavailableError, from_dict

TYPE_CHECKING = False  # typing costs ~4 ms to import: every CLI call would pay it
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any


_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def quote(part: str) -> str:
    """A path segment percent-encoded (RFC 3986): a reference such as 'a/b' or '../x'
    stays one segment (urllib.parse costs ~2 ms to import, paid by every CLI call)."""
    if part in (".", ".."):
        return part.replace(".", "%2E")
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in part.encode())


def _ref(ref: str) -> str:
    """A domain reference as a path segment; an empty one names no domain."""
    if not ref:
        from sanvisor.errors import NotFoundError

        raise NotFoundError("domain '' does not exist (an empty name)", domain=ref)
    return quote(ref)


def _object(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise AgentProtocolError(f"agent answered {what} with {type(data).__name__}, "
                                 "not an object")
    return data


def _exchange(path: str, request: bytes, timeout: float) -> tuple[int, bytes]:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    finally:
        sock.close()
    return parse_reply(b"".join(chunks))


def parse_reply(raw: bytes) -> tuple[int, bytes]:
    """(status, body) of a whole HTTP/1.1 reply; OSError if it is none."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise OSError("truncated reply")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise OSError(f"not an HTTP reply: {lines[0]!r}")
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (ln.partition(":") for ln in lines[1:])}
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return int(parts[1]), body


def _detail(data: Any) -> str:
    """An HTTP error body without an error of ours: FastAPI's ``{"detail": ...}``
    (a string, or the list of what failed validation) or whatever came."""
    detail = data.get("detail", data) if isinstance(data, dict) else data
    if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
        return "; ".join(_where(d.get("loc")) + str(d.get("msg", d)) for d in detail)
    return "no details" if detail is None else str(detail)


def _where(loc: Any) -> str:
    return ".".join(str(x) for x in loc) + ": " if isinstance(loc, list) and loc else ""


class AgentClient:
    def __init__(self, socket_path: Path, timeout: float = 900.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        payload = json.dumps(body).encode() if body is not None else b""
        request = (f"{method} {path} HTTP/1.1\r\nHost: sanvisor\r\n"
                   "Content-Type: application/json\r\nConnection: close\r\n"
                   f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
        try:
            status, raw = self._exchange(request)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentUnavailableError(
                f"no sanvisor agent at {self.socket_path} (start it with "
                "'sanvisor agent start')", socket=str(self.socket_path)) from exc
        except PermissionError as exc:
            raise AgentUnavailableError(
                f"not allowed to talk to the agent at {self.socket_path}") from exc
        except OSError as exc:
            raise AgentUnavailableError(f"agent at {self.socket_path}: {exc}") from exc
        try:
            data = json.loads(raw) if raw else None
        except ValueError as exc:
            raise AgentProtocolError(
                f"agent sent a malformed reply to {method} {path} ({status}): "
                f"{raw[:200].decode('utf-8', 'replace')!r}",
                status=status, method=method, path=path) from exc
        if status >= 400:
            if isinstance(data, dict) and isinstance(data.get("error"), dict):
                raise from_dict(data["error"])
            raise AgentProtocolError(
                f"agent refused {method} {path} ({status}): {_detail(data)}",
                status=status, method=method, path=path)
        return data

    def _exchange(self, request: bytes) -> tuple[int, bytes]:
        """One request, its whole reply (the transport: the unix socket; a host of the
        pool whose home is not on this machine is reached over TCP with mutual TLS, with
        the pool's administrator certificate: api/peer_client.py)."""
        try:
            return _exchange(str(self.socket_path), request, self.timeout)
        except FileNotFoundError:
            # a pool host's agent on another machine: over TCP with mutual TLS
            from sanvisor.api.peer_client import remote_for

            remote = remote_for(self.socket_path, self.timeout)
            if remote is None:
                raise
            return remote._exchange(request)

    # typed helpers ------------------------------------------------------------------
    def domains(self) -> list[dict[str, Any]]:
        data = self.call("GET", "/v1/domains")
        if not isinstance(data, list):
            raise AgentProtocolError("agent answered GET /v1/domains with "
                                     f"{type(data).__name__}, not a list")
        return data

    def host(self) -> dict[str, Any]:
        return _object(self.call("GET", "/v1/host"), "GET /v1/host")

    def info(self, ref: str) -> dict[str, Any]:
        return _object(self.call("GET", f"/v1/domains/{_ref(ref)}"), "GET")

    def create(self, spec: dict[str, Any], paused: bool = False) -> dict[str, Any]:
        return _object(self.call("POST", "/v1/domains", {"spec": spec, "paused": paused}),
                       "POST /v1/domains")

    def destroy(self, ref: str) -> None:
        self.call("DELETE", f"/v1/domains/{_ref(ref)}")

    def verb(self, ref: str, verb: str, body: dict[str, Any] | None = None) -> Any:
        return self.call("POST", f"/v1/domains/{_ref(ref)}/{verb}", body or {})

    def restore(self, path: str, paused: bool = False) -> dict[str, Any]:
        return _object(self.call("POST", "/v1/restore", {"path": path, "paused": paused}),
                       "POST /v1/restore")

    def stats(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/v1/stats"))
