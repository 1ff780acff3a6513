"""The distributed store: etcd v3 (Debian's etcd-server, 3.4), through etcd's own JSON
gateway (``POST /v3/kv/range``, ``/v3/kv/txn``, ``/v3/lease/grant``, ``/v3/watch``...:
the gRPC API as JSON over HTTP/1.1, keys and values base64) with httpx.

Every key lives under the store's namespace (default ``sanvisor/``), so that several
pools, or other users, can share one etcd cluster. Revisions and leases are etcd's
own: a revision is the cluster's, a lease id is etcd's (shown in hex, as etcdctl does).

Endpoints are tried in order; the next one only when the last could not be connected
to (nothing was sent). A request sent whose answer does not come within the timeout
raises StoreUnavailableError: a write may then have happened or not.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import math
import os
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

import httpx

from sanvisor.errors import (
    StoreCompactedError,
    StoreError,
    StoreLeaseExpiredError,
    StoreUnavailableError,
    UsageError,
)
from sanvisor.pool.store import (
    DEFAULT_ETCD_NAMESPACE,
    Compare,
    Delete,
    Event,
    KeyValue,
    Lease,
    Listing,
    Op,
    Put,
    Store,
    TxnResult,
    Watch,
    decode_value,
    encode_value,
    prefix_end,
)

PAGE = 1000  # keys per range request of a list
#: gRPC status codes etcd answers with (in the gateway's error body)
_DEADLINE, _NOT_FOUND, _OUT_OF_RANGE, _UNAVAILABLE = 4, 5, 11, 14


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _reason(exc: BaseException) -> str:
    """What the system said (connection refused, no route...), else httpx's text."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno)
        cause = cause.__cause__ or cause.__context__
    text = str(exc) or type(exc).__name__
    return re.sub(r"^\[Errno \d+\] ", "", text).strip()


class EtcdStore(Store):
    def __init__(self, endpoints: Sequence[str], *, namespace: str = DEFAULT_ETCD_NAMESPACE,
                 timeout: float = 5.0) -> None:
        if not endpoints:
            raise UsageError("an etcd store needs at least one endpoint (HOST:PORT)")
        self.endpoints = list(endpoints)
        self.namespace = namespace
        self.url = f"etcd://{','.join(self.endpoints)}/{namespace}"
        self.timeout = timeout
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._current = 0  # the endpoint that answered last

    # ---- plumbing ----

    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:  # a client belongs to one loop
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 2.0)),
                trust_env=False)  # no proxy between the pool and its store
            self._loop = loop
        return self._client

    def _key(self, key: str) -> bytes:
        return (self.namespace + key).encode()

    def _range(self, prefix: str) -> dict[str, str]:
        start = self._key(prefix)
        end = prefix_end(start)
        return {"key": _b64(start or b"\0"), "range_end": _b64(end)}

    def _kv(self, kv: dict[str, Any]) -> KeyValue:
        return KeyValue(_unb64(kv["key"]).decode()[len(self.namespace):],
                        decode_value(_unb64(kv.get("value", ""))),
                        int(kv.get("create_revision", 0)), int(kv.get("mod_revision", 0)),
                        int(kv.get("version", 0)), int(kv.get("lease", 0)))

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        client = self._http()
        refused: list[str] = []
        for i in range(len(self.endpoints)):
            index = (self._current + i) % len(self.endpoints)
            endpoint = self.endpoints[index]
            try:
                reply = await client.post(f"http://{endpoint}/v3/{path}", json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing was sent
                refused.append(f"{endpoint}: {_reason(exc)}")
                continue
            except httpx.TimeoutException:
                raise StoreUnavailableError(
                    f"etcd at {endpoint} did not answer {path} within {self.timeout:g}s "
                    "(a write may or may not have happened)", endpoint=endpoint) from None
            except httpx.HTTPError as exc:
                raise StoreUnavailableError(f"etcd at {endpoint}: {path}: {_reason(exc)}",
                                            endpoint=endpoint) from None
            self._current = index
            return self._answer(endpoint, path, reply.status_code, reply.content)
        raise StoreUnavailableError(f"etcd unreachable ({'; '.join(refused)})",
                                    endpoints=self.endpoints)

    def _answer(self, endpoint: str, path: str, status: int, content: bytes) -> dict[str, Any]:
        try:
            data = json.loads(content)
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except ValueError:
            raise StoreUnavailableError(f"{endpoint} did not answer {path} as etcd does "
                                        f"(HTTP {status})", endpoint=endpoint) from None
        if status == 200 and "error" not in data:
            return data
        raise _error(endpoint, data)

    # ---- keys ----

    async def _get(self, key: str) -> KeyValue | None:
        data = await self._call("kv/range", {"key": _b64(self._key(key))})
        kvs = data.get("kvs") or []
        return self._kv(kvs[0]) if kvs else None

    async def _list(self, prefix: str) -> Listing:
        """In pages of PAGE keys, every page read at the revision of the first."""
        body: dict[str, Any] = {**self._range(prefix), "limit": str(PAGE)}
        items: list[KeyValue] = []
        while True:
            data = await self._call("kv/range", body)
            body["revision"] = body.get("revision") or data["header"]["revision"]
            kvs = data.get("kvs") or []
            items.extend(self._kv(kv) for kv in kvs)
            if not data.get("more") or not kvs:
                return Listing(int(body["revision"]), tuple(items))
            body["key"] = _b64(_unb64(kvs[-1]["key"]) + b"\0")  # the next key on

    async def revision(self) -> int:
        data = await self._call("kv/range", {"key": _b64(b"\0"), "count_only": True})
        return int(data["header"]["revision"])

    def _put_body(self, key: str, value: Any, lease: int) -> dict[str, Any]:
        body = {"key": _b64(self._key(key)), "value": _b64(encode_value(value, key).encode())}
        if lease:
            body["lease"] = str(lease)
        return body

    def _delete_body(self, key: str, prefix: bool) -> dict[str, Any]:
        return self._range(key) if prefix else {"key": _b64(self._key(key))}

    async def _put(self, key: str, value: Any, lease: int) -> int:
        data = await self._call("kv/put", self._put_body(key, value, lease))
        return int(data["header"]["revision"])

    async def _delete(self, key: str, prefix: bool) -> int:
        data = await self._call("kv/deleterange", self._delete_body(key, prefix))
        return int(data.get("deleted", 0))

    def _compare(self, c: Compare) -> dict[str, Any]:
        key = _b64(self._key(c.key))
        if c.kind == "absent":
            return {"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        if c.kind == "present":
            return {"key": key, "target": "CREATE", "result": "GREATER",
                    "create_revision": "0"}
        if c.kind == "revision":
            return {"key": key, "target": "MOD", "result": "EQUAL",
                    "mod_revision": str(c.operand)}
        return {"key": key, "target": "VALUE", "result": "EQUAL",
                "value": _b64(encode_value(c.operand).encode())}

    def _op(self, op: Op) -> dict[str, Any]:
        if isinstance(op, Put):
            return {"request_put": self._put_body(op.key, op.value, op.lease)}
        assert isinstance(op, Delete)
        return {"request_delete_range": self._delete_body(op.key, op.prefix)}

    async def _txn(self, compare: Sequence[Compare], success: Sequence[Op]) -> TxnResult:
        data = await self._call("kv/txn", {"compare": [self._compare(c) for c in compare],
                                           "success": [self._op(op) for op in success]})
        return TxnResult(bool(data.get("succeeded", False)), int(data["header"]["revision"]))

    # ---- leases ----

    async def grant(self, ttl: float) -> Lease:
        if not ttl > 0:
            raise UsageError(f"a lease needs a positive time to live, not {ttl!r}")
        data = await self._call("lease/grant", {"TTL": str(max(1, math.ceil(ttl)))})
        return Lease(int(data["ID"]), float(data["TTL"]))

    async def keepalive(self, lease: int) -> float:
        data = await self._call("lease/keepalive", {"ID": str(lease)})
        result = data.get("result") or {}
        ttl = int(result.get("TTL", 0))
        if ttl <= 0:
            raise StoreLeaseExpiredError(f"lease {lease:x} expired or was revoked",
                                         lease=lease)
        return float(ttl)

    async def revoke(self, lease: int) -> None:
        await self._call("lease/revoke", {"ID": str(lease)})

    async def time_to_live(self, lease: int) -> float | None:
        data = await self._call("lease/timetolive", {"ID": str(lease)})
        ttl = int(data.get("TTL", 0))  # whole seconds left, rounded down (0 is omitted)
        return None if ttl < 0 else float(ttl)

    # ---- changes ----

    def watch(self, prefix: str, *, start_revision: int | None = None) -> Watch:
        return _EtcdWatch(self, prefix, start_revision)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop():
            await client.aclose()


def _error(endpoint: str, data: dict[str, Any]) -> StoreError:
    """The error etcd's answer stands for (the gateway's body: error, code, message)."""
    err = data.get("error")
    if isinstance(err, dict):  # a stream's error: {"error": {"grpc_code", "message"}}
        code, message = err.get("grpc_code"), err.get("message")
    else:
        code, message = data.get("code"), data.get("message") or err
    text = str(message or "unknown error").removeprefix("etcdserver: ")
    ctx = {"endpoint": endpoint, "grpc_code": code}
    if code == _NOT_FOUND and "lease" in text:
        return StoreLeaseExpiredError(f"etcd at {endpoint}: {text} (expired or revoked)",
                                      **ctx)
    if code == _OUT_OF_RANGE or "compacted" in text:
        return StoreCompactedError(f"etcd at {endpoint}: {text}", **ctx)
    if code in (_UNAVAILABLE, _DEADLINE) or "leader" in text or "timed out" in text:
        return StoreUnavailableError(f"etcd at {endpoint}: {text}", **ctx)
    return StoreError(f"etcd at {endpoint}: {text}", **ctx)


class _EtcdWatch(Watch):
    """One watch stream (``POST /v3/watch``: newline-separated JSON answers)."""

    def __init__(self, store: EtcdStore, prefix: str, start: int | None) -> None:
        self.store = store
        self.prefix = prefix
        self.start_revision = start
        self._reply: httpx.Response | None = None
        self._lines: AsyncIterator[str] | None = None
        self._endpoint = ""
        self._ready: collections.deque[Event] = collections.deque()
        self._closed = False

    async def start(self) -> None:
        store = self.store
        create: dict[str, Any] = store._range(self.prefix)
        if self.start_revision is not None:
            create["start_revision"] = str(self.start_revision)
        client = store._http()
        refused: list[str] = []
        for i in range(len(store.endpoints)):
            endpoint = store.endpoints[(store._current + i) % len(store.endpoints)]
            request = client.build_request(
                "POST", f"http://{endpoint}/v3/watch", json={"create_request": create},
                timeout=httpx.Timeout(store.timeout, read=None))  # a watch may be quiet
            try:
                self._reply = await client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                refused.append(f"{endpoint}: {_reason(exc)}")
                continue
            except httpx.HTTPError as exc:
                raise StoreUnavailableError(f"etcd at {endpoint}: watch: {_reason(exc)}",
                                            endpoint=endpoint) from None
            self._endpoint = endpoint
            self._lines = self._reply.aiter_lines()
            if self._reply.status_code != 200:
                content = await self._reply.aread()
                await self.close()
                store._answer(endpoint, "watch", self._reply.status_code, content)
            first = await self._message()
            if not first.get("created"):
                await self.close()
                raise StoreError(f"etcd at {endpoint}: the watch was not created",
                                 endpoint=endpoint)
            return
        raise StoreUnavailableError(f"etcd unreachable ({'; '.join(refused)})",
                                    endpoints=store.endpoints)

    async def _message(self) -> dict[str, Any]:
        """The next answer on the stream (its "result")."""
        if self._lines is None:
            raise StopAsyncIteration
        where = self._endpoint
        try:
            line = ""
            while not line.strip():
                line = await anext(self._lines)
        except StopAsyncIteration:
            await self.close()
            raise StoreUnavailableError(f"etcd at {where}: the watch stream ended",
                                        endpoint=where) from None
        except httpx.HTTPError as exc:
            await self.close()
            raise StoreUnavailableError(f"etcd at {where}: the watch stream broke "
                                        f"({_reason(exc)})", endpoint=where) from None
        try:
            data = json.loads(line)
        except ValueError:
            await self.close()
            raise StoreError(f"etcd at {where}: a watch answer that is not JSON: "
                             f"{line[:100]!r}", endpoint=where) from None
        if "error" in data:
            await self.close()
            raise _error(where, data)
        result: dict[str, Any] = data.get("result") or {}
        if result.get("canceled"):
            await self.close()
            compact = int(result.get("compact_revision", 0))
            if compact:
                raise StoreCompactedError(
                    f"etcd at {where}: the history before revision {compact} is compacted; "
                    f"{self.start_revision} was asked", endpoint=where, revision=compact)
            raise StoreError(f"etcd at {where}: the watch was canceled "
                             f"({result.get('cancel_reason', 'no reason given')})",
                             endpoint=where)
        return result

    async def __anext__(self) -> Event:
        if self._closed:
            raise StopAsyncIteration
        if self._lines is None:
            await self.start()
        while not self._ready:
            result = await self._message()
            for event in result.get("events") or []:
                kv = event["kv"]
                kind: Literal["put", "delete"] = (
                    "delete" if event.get("type") == "DELETE" else "put")
                value = None if kind == "delete" else decode_value(_unb64(kv.get("value", "")))
                key = _unb64(kv["key"]).decode()[len(self.store.namespace):]
                self._ready.append(Event(kind, key, value, int(kv["mod_revision"])))
        return self._ready.popleft()

    async def close(self) -> None:
        self._closed = True
        reply, self._reply = self._reply, None
        self._lines = None
        if reply is not None:
            await reply.aclose()
