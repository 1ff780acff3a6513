"""The typed client of the agent API, over the agent's unix socket.

It uses the standard library's http.client rather than httpx: every CLI call
pays the client's import time, and the toolstack's overhead budget for
`create` is tens of milliseconds (httpx costs ~80 ms to import here).
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from sanvisor.errors import AgentUnavailableError, SanvisorError, from_dict


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class AgentClient:
    def __init__(self, socket_path: Path, timeout: float = 900.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        conn = _UnixConnection(str(self.socket_path), self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            try:
                conn.request(method, path, body=payload, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise AgentUnavailableError(
                    f"no sanvisor agent at {self.socket_path} (start it with "
                    "'sanvisor agent start')", socket=str(self.socket_path)) from exc
            except PermissionError as exc:
                raise AgentUnavailableError(
                    f"not allowed to talk to the agent at {self.socket_path}") from exc
            except (OSError, http.client.HTTPException) as exc:
                raise AgentUnavailableError(f"agent at {self.socket_path}: {exc}") from exc
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else None
        except ValueError as exc:
            raise SanvisorError(f"agent sent a malformed reply ({resp.status})") from exc
        if resp.status >= 400:
            if isinstance(data, dict) and isinstance(data.get("error"), dict):
                raise from_dict(data["error"])
            detail = data.get("detail") if isinstance(data, dict) else data
            raise SanvisorError(f"agent refused the request ({resp.status}): {detail}")
        return data

    # typed helpers ------------------------------------------------------------------
    def domains(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/v1/domains"))

    def host(self) -> dict[str, Any]:
        return dict(self.call("GET", "/v1/host"))

    def info(self, ref: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/v1/domains/{ref}"))

    def create(self, spec: dict[str, Any], paused: bool = False) -> dict[str, Any]:
        return dict(self.call("POST", "/v1/domains", {"spec": spec, "paused": paused}))

    def destroy(self, ref: str) -> None:
        self.call("DELETE", f"/v1/domains/{ref}")

    def verb(self, ref: str, verb: str, body: dict[str, Any] | None = None) -> Any:
        return self.call("POST", f"/v1/domains/{ref}/{verb}", body or {})

    def restore(self, path: str, paused: bool = False) -> dict[str, Any]:
        return dict(self.call("POST", "/v1/restore", {"path": path, "paused": paused}))

    def stats(self) -> list[dict[str, Any]]:
        return list(self.call("GET", "/v1/stats"))
