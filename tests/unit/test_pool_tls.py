"""Mutual TLS between the hosts of a pool, on real sockets: two real agents (the fake
driver: no hypervisor) of a pool whose CA `lab up`'s code made, each listening on
127.0.0.1 (docs/pool.md). Whoever cannot prove a certificate of the pool's CA is
refused in the handshake; a host of the pool may make only the calls hosts make on
each other, and only in its own name; a client checks the server names the host it
dialled. The unix socket stays as it was."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sanvisor.agent import daemon
from sanvisor.agent.peers import PoolNetwork
from sanvisor.api.client import AgentClient
from sanvisor.api.peer_client import PeerClient
from sanvisor.errors import SanvisorError, TlsForbiddenError, TlsPeerError, TlsRefusedError
from sanvisor.lab import credentials
from sanvisor.paths import Layout
from sanvisor.pool import pki
from sanvisor.pool.config import PoolConfig, PoolHost
from sanvisor.pool.tls import Credentials, client_context, expiry

pytestmark = pytest.mark.unit
HOSTS = ("host1", "host2")


class Pool:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = PoolConfig.load(root / "pool.json")

    def home(self, name: str) -> Path:
        return Path(self.conf.hosts[name].home)

    def net(self, name: str) -> PoolNetwork:
        net = PoolNetwork.of_home(self.home(name))
        assert net is not None
        return net

    def port(self, name: str) -> int:
        return int(self.conf.hosts[name].port)

    def client(self, dial: str, creds: Credentials, *, as_host: str | None = None,
               port: int | None = None) -> PeerClient:
        """``creds`` calling the agent of ``dial`` (at ``port``: another's, to pose)."""
        return PeerClient(as_host or dial, "127.0.0.1", port or self.port(dial), creds,
                          timeout=10)


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    root = Path(tempfile.mkdtemp(prefix="svtls", dir="/tmp"))
    layouts: list[Layout] = []
    try:
        hosts: dict[str, PoolHost] = {}
        for name in HOSTS:
            home = root / name
            port = credentials.free_port("127.0.0.1", {h.port for h in hosts.values()})
            hosts[name] = PoolHost(name, str(home), "fake", "", "127.0.0.1", port)
        PoolConfig("tlspool", hosts).save(root / "pool.json")
        credentials.issue(root, "tlspool", [(n, h.home, h.address) for n, h in hosts.items()])
        for name, h in hosts.items():
            layout = Layout(Path(h.home))
            layout.ensure()
            (layout.home / "host.json").write_text(json.dumps(
                {"name": name, "driver": "fake", "pool": str(root)}))
            layouts.append(layout)
            daemon.start_background(layout, timeout=60)
        yield Pool(root)
    finally:
        for layout in layouts:
            daemon.stop(layout)
        shutil.rmtree(root, ignore_errors=True)


def _other_ca(tmp: Path, host: str, **dates: dt.datetime) -> Credentials:
    pki.create_ca(tmp / "ca-other", "other")
    out = tmp / host / "tls"
    pki.issue_host(pki.ca_dir(tmp / "ca-other"), host, ["127.0.0.1"], out, **dates)
    return Credentials(out)


def test_a_host_of_the_pool_reaches_another_over_mutual_tls(pool: Pool) -> None:
    client, stream = pool.net("host2").dial("host1")
    assert isinstance(client, PeerClient)
    assert client.call("GET", "/v1/host")["driver"] == "fake"
    assert stream is not None and stream.peer == "host1"
    # TLS 1.3, and the peer's certificate is the one the pool's CA issued for host1
    with socket.create_connection(("127.0.0.1", pool.port("host1")), timeout=10) as raw, \
            client_context(pool.net("host2").creds).wrap_socket(
                raw, server_hostname="host1") as tls:
        assert tls.version() == "TLSv1.3"
        assert ("DNS", "host1") in tls.getpeercert()["subjectAltName"]


def test_the_unix_socket_is_as_it_was(pool: Pool) -> None:
    assert AgentClient(Layout(pool.home("host1")).socket).call(
        "GET", "/v1/domains") is not None


def test_a_client_without_tls_or_without_a_certificate_is_refused(pool: Pool) -> None:
    request = b"GET /v1/host HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", pool.port("host1")), timeout=10) as raw:
        raw.sendall(request)  # plain HTTP: no reply, the connection closed
        assert raw.recv(65536) == b""
    ctx = ssl.create_default_context(cafile=str(pool.net("host2").creds.ca))  # no cert
    with socket.create_connection(("127.0.0.1", pool.port("host1")), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="host1") as tls:
        assert _reply(tls, request) == b""  # TLS 1.3: refused after the handshake


def _reply(tls: ssl.SSLSocket, request: bytes) -> bytes:
    """What the server answers ``request``: b"" when it closes the connection."""
    try:
        tls.sendall(request)
        return tls.recv(65536)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return b""


def test_a_certificate_of_another_ca_is_refused(pool: Pool, tmp_path: Path) -> None:
    foreign = _other_ca(tmp_path, "host2")  # the right name, the wrong CA
    mixed = tmp_path / "mixed"  # the pool's CA, and a certificate of another CA
    shutil.copytree(pool.net("host2").creds.dir, mixed)
    for role in ("client", "server"):
        for part in ("cert", "key"):
            shutil.copy2(foreign.dir / f"{role}-{part}.pem", mixed / f"{role}-{part}.pem")
    with pytest.raises(TlsRefusedError, match=r"host1 \(127.0.0.1:\d+\) refused us: our "
                       "certificate is not signed by the pool's CA"):
        pool.client("host1", Credentials(mixed)).call("GET", "/v1/host")
    # and from the other side: a server of another CA is refused by a host of the pool
    with pytest.raises(TlsPeerError, match="not signed by the pool's CA"):
        PeerClient("host1", "127.0.0.1", pool.port("host1"), pool.net("host2").creds,
                   client_context(foreign), timeout=10).call("GET", "/v1/host")


def test_an_expired_certificate_is_refused_with_the_reason(pool: Pool,
                                                          tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    out = tmp_path / "old"
    pki.issue_host(pki.ca_dir(pool.root), "host2", ["127.0.0.1"], out,
                   not_before=now - dt.timedelta(days=30),
                   not_after=now - dt.timedelta(days=1))
    with pytest.raises(TlsRefusedError, match="our certificate expired on"):
        pool.client("host1", Credentials(out)).call("GET", "/v1/host")


def test_a_host_presenting_another_hosts_certificate_is_refused(pool: Pool) -> None:
    # host1 dials "host1" but reaches host2's agent (a wrong address, or host2 posing
    # as host1): host2's certificate names host2, not host1
    with pytest.raises(TlsPeerError, match="names another host"):
        pool.client("host1", pool.net("host1").creds, as_host="host1",
                    port=pool.port("host2")).call("GET", "/v1/host")


def test_a_host_may_not_speak_for_another(pool: Pool) -> None:
    # host2, authenticated, sends a migration on behalf of host1
    body = {"record": {}, "source": "host1", "live": True}
    with pytest.raises(TlsForbiddenError, match="host2 may not send a domain on behalf "
                       "of 'host1'"):
        pool.client("host1", pool.net("host2").creds).call(
            "POST", "/v1/migrate/incoming", body)


def test_a_host_may_make_only_the_calls_hosts_make_on_each_other(pool: Pool) -> None:
    with pytest.raises(TlsForbiddenError, match="GET /v1/domains: not a call hosts"):
        pool.client("host1", pool.net("host2").creds).call("GET", "/v1/domains")


def test_a_certificate_of_the_pools_ca_for_no_host_of_the_pool_is_forbidden(
        pool: Pool, tmp_path: Path) -> None:
    out = tmp_path / "intruder"
    pki.issue_host(pki.ca_dir(pool.root), "intruder", ["127.0.0.1"], out)
    with pytest.raises(TlsForbiddenError, match="'intruder' is no host of pool tlspool"):
        pool.client("host1", Credentials(out)).call("GET", "/v1/host")


def test_keys_are_private_and_a_readable_key_is_refused(pool: Pool, tmp_path: Path) -> None:
    creds = pool.net("host1").creds
    assert (creds.key.stat().st_mode & 0o777) == 0o600
    assert (pki.ca_dir(pool.root) / "ca-key.pem").stat().st_mode & 0o077 == 0
    copy = tmp_path / "tls"
    shutil.copytree(creds.dir, copy)
    (copy / "server-key.pem").chmod(0o644)
    with pytest.raises(SanvisorError, match="may be read by others"):
        Credentials(copy).check("host1")


def _remote_pool(pool: Pool, where: Path, admin: bool = True) -> dict[str, str]:
    """The pool as another machine sees it: the same pool.json, no host's home here;
    the administrator's certificate (or none)."""
    conf = json.loads((pool.root / "pool.json").read_text())
    for name, h in conf["hosts"].items():
        h["home"] = str(where / "elsewhere" / name)
    where.mkdir(parents=True, exist_ok=True)
    (where / "pool.json").write_text(json.dumps(conf))
    if admin:
        shutil.copytree(pool.root / "admin", where / "admin")
    return dict(os.environ, SANVISOR_POOL_HOME=str(where), SANVISOR_LAB_HOME=str(where))


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sanvisor", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_cli_reaches_a_remote_agent_with_the_administrators_certificate(
        pool: Pool, tmp_path: Path) -> None:
    env = _remote_pool(pool, tmp_path / "remote")
    for argv in (["-H", "host1", "--json", "list"], ["-H", "host2", "--json", "info"]):
        got = _cli(env, *argv)
        assert got.returncode == 0, got.stderr
        assert "Domain-0" in got.stdout or '"driver": "fake"' in got.stdout, got.stdout
    assert not (tmp_path / "remote" / "elsewhere").exists()  # nothing made here
    # without the administrator's certificate: one line, naming where it should be
    got = _cli(_remote_pool(pool, tmp_path / "bare", admin=False), "-H", "host1", "list")
    assert got.returncode != 0 and len(got.stderr.strip().splitlines()) == 1, got.stderr
    assert "no administrator's certificate in" in got.stderr, got.stderr


def test_an_administrator_may_not_make_a_hosts_calls(pool: Pool) -> None:
    admin = Credentials(pool.root / "admin" / "tls")
    body = {"record": {}, "source": "admin", "live": True}
    with pytest.raises(TlsForbiddenError, match="a call between hosts of the pool"):
        pool.client("host1", admin).call("POST", "/v1/migrate/incoming", body)


def test_pool_verbs_issue_certificates_and_refuse_bad_names(pool: Pool,
                                                           tmp_path: Path) -> None:
    env = dict(os.environ, SANVISOR_POOL_HOME=str(pool.root))
    got = _cli(env, "--json", "pool", "admin", "bob", "--out", str(tmp_path / "bob"))
    assert got.returncode == 0, got.stderr
    assert "OU=admin" in json.loads(got.stdout)["subject"]
    assert (tmp_path / "bob" / "client-key.pem").stat().st_mode & 0o777 == 0o600
    got = _cli(env, "pool", "cert", "bad name!", "--out", str(tmp_path / "bad"))
    assert got.returncode != 0 and "is not a host name" in got.stderr, got.stderr
    assert not (tmp_path / "bad").exists()
    got = _cli(env, "pool", "ca")  # the pool has one: every certificate depends on it
    assert got.returncode != 0 and "has a CA already" in got.stderr, got.stderr


def test_info_says_when_the_hosts_certificates_end(pool: Pool) -> None:
    facts = AgentClient(Layout(pool.root / "host1").socket).call("GET", "/v1/host/info")
    end = dt.datetime.strptime(facts["tls_expires"], "%Y-%m-%d %H:%M UTC")
    left = end - dt.datetime.now(dt.UTC).replace(tzinfo=None)
    assert 800 < left.days < 830  # the host certificate's 825 days
    assert "tls_warning" not in facts


@pytest.mark.parametrize(("days", "words"), [(10, "expires on"), (-1, "expired on")])
def test_a_certificate_near_or_past_its_end_is_warned_of(pool: Pool, tmp_path: Path,
                                                         days: int, words: str) -> None:
    now = dt.datetime.now(dt.UTC)
    pki.issue_host(pki.ca_dir(pool.root), "host2", ["127.0.0.1"], tmp_path,
                   not_before=now - dt.timedelta(days=30),
                   not_after=now + dt.timedelta(days=days))
    end, warning = expiry(Credentials(tmp_path))
    assert end is not None and abs((end - now).days - days) <= 1
    assert warning is not None and words in warning
    assert "this host's certificate" in warning and "sanvisor pool cert HOST" in warning
    _, later = expiry(Credentials(tmp_path), within_days=5)
    assert (later is None) == (days > 5)
