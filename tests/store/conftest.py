"""The state store's tests run against both backends: ``store_url`` is an SQLite file
of the test's own, or a namespace of its own in a real etcd server (Debian's
etcd-server) that this module starts on 127.0.0.1 with free ports and a temporary data
directory, and kills and removes afterwards. Skipped for etcd only where the binary is
absent (scripts/setup.sh installs it)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from sanvisor.pool.store import Store, open_store
from sanvisor.waiting import wait_until

T = TypeVar("T")
ETCD = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
BACKENDS = ("sqlite", "etcd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """One single-member etcd on 127.0.0.1 (fast elections: leases of 1 s are honoured)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="svetcd", dir="/tmp"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, namespace: str | None = None) -> str:
        return f"etcd://{self.endpoint}/{namespace or 't' + uuid.uuid4().hex[:10]}/"

    def start(self) -> EtcdServer:
        assert ETCD is not None
        for _attempt in range(3):  # a free port may be taken between the probe and etcd
            self.port, peer = free_port(), free_port()
            data = self.dir / "data"
            shutil.rmtree(data, ignore_errors=True)
            with open(self.dir / "etcd.log", "ab") as log:
                self.proc = subprocess.Popen(
                    [ETCD, "--name", "sv", "--data-dir", str(data),
                     "--listen-client-urls", f"http://{self.endpoint}",
                     "--advertise-client-urls", f"http://{self.endpoint}",
                     "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                     "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                     "--initial-cluster", f"sv=http://127.0.0.1:{peer}",
                     "--heartbeat-interval", "10", "--election-timeout", "100"],
                    stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                wait_until("etcd answers", self._ready, timeout=15, interval=0.05)
                return self
            except Exception:
                self.kill()
        raise AssertionError("etcd did not start: "
                             + (self.dir / "etcd.log").read_text()[-2000:])

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"etcd exited ({self.proc.returncode})")
        try:
            self.call("kv/range", {"key": "AA=="})
            return True
        except OSError:
            return False

    def call(self, path: str, body: dict[str, object]) -> dict[str, object]:
        req = urllib.request.Request(f"http://{self.endpoint}/v3/{path}",
                                     data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=5) as reply:
            answer: dict[str, object] = json.loads(reply.read())
            return answer

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def started_etcd() -> EtcdServer:
    if ETCD is None:
        pytest.skip("etcd is not installed (Debian's etcd-server; scripts/setup.sh)")
    return EtcdServer().start()


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    server = None
    try:
        server = started_etcd()
        yield server
    finally:
        if server is not None:
            server.remove()


@pytest.fixture
def own_etcd() -> Iterator[EtcdServer]:
    """An etcd of the test's own (to kill)."""
    server = None
    try:
        server = started_etcd()
        yield server
    finally:
        if server is not None:
            server.remove()


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="svstore", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_url(backend: str, scratch: Path, request: pytest.FixtureRequest) -> str:
    """A fresh, empty store of the backend under test."""
    if backend == "sqlite":
        return f"sqlite:{scratch / 'store.db'}"
    server: EtcdServer = request.getfixturevalue("etcd_server")
    return server.url()


def run(url: str, scenario: Callable[[Store], Awaitable[T]]) -> T:
    """Run ``scenario`` with the store at ``url`` open, in an event loop of its own."""

    async def main() -> T:
        async with open_store(url) as store:
            return await scenario(store)

    return asyncio.run(main())
