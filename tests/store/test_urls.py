"""Choosing the store: URLs, the default, the pool config's ``store`` (no server needed:
these run in the unit tier too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sanvisor.errors import UsageError
from sanvisor.pool.config import PoolConfig, PoolHost
from sanvisor.pool.store import default_store_url, open_store, parse_store_url
from sanvisor.pool.store_etcd import EtcdStore
from sanvisor.pool.store_sqlite import SqliteStore

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("url", "parsed"), [
    ("sqlite:/var/lib/sanvisor/lab/store.db", ("sqlite", ["/var/lib/sanvisor/lab/store.db"], "")),
    ("sqlite://tmp/x.db", ("sqlite", ["tmp/x.db"], "")),
    ("sqlite:rel/x.db", ("sqlite", ["rel/x.db"], "")),
    ("etcd://10.0.0.1:2379", ("etcd", ["10.0.0.1:2379"], "sanvisor/")),
    ("etcd://a:2379,b:2379,c:2379/pools/sv", ("etcd", ["a:2379", "b:2379", "c:2379"],
                                              "pools/sv/")),
    ("etcd://a:2379/", ("etcd", ["a:2379"], "")),
    ("etcd://[::1]:2379/x/", ("etcd", ["[::1]:2379"], "x/")),
])
def test_store_urls(url: str, parsed: tuple[str, list[str], str]) -> None:
    assert parse_store_url(url) == parsed


@pytest.mark.parametrize(("url", "says"), [
    ("sqlite:", "names no file"), ("etcd://", "names no etcd endpoint"),
    ("etcd://host", "is not HOST:PORT"), ("etcd://host:0", "is not HOST:PORT"),
    ("etcd://h:1,h:x", "'h:x' is not HOST:PORT"), ("redis://h:1", "unknown store URL"),
    ("/var/lib/store.db", "use sqlite:PATH or etcd://HOST:PORT"),
    ("etcd://h:1/a\tb", "control characters"),
])
def test_bad_store_urls(url: str, says: str) -> None:
    with pytest.raises(UsageError, match=says) as err:
        open_store(url)
    assert "\n" not in str(err.value)


def test_the_default_store(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path = scratch
    monkeypatch.delenv("SANVISOR_STORE", raising=False)
    monkeypatch.setenv("SANVISOR_POOL_HOME", str(tmp_path))
    assert default_store_url() == f"sqlite:{tmp_path}/store.db"
    store = open_store()
    assert isinstance(store, SqliteStore) and store.path == tmp_path / "store.db"
    PoolConfig("sv", {"h1": PoolHost("h1", "/x")}, store="etcd://a:1,b:2/sv").save()
    assert default_store_url() == "etcd://a:1,b:2/sv"
    store = open_store()
    assert isinstance(store, EtcdStore) and store.endpoints == ["a:1", "b:2"]
    monkeypatch.setenv("SANVISOR_STORE", "sqlite:/elsewhere.db")
    assert default_store_url() == "sqlite:/elsewhere.db"
    assert not (tmp_path / "store.db").exists()  # nothing is opened before it is used


def test_the_pool_config_keeps_its_store(scratch: Path) -> None:
    tmp_path = scratch
    path = tmp_path / "pool.json"
    path.write_text(json.dumps({"name": "old", "hosts": {"h1": {"home": "/h1"}}}))
    old = PoolConfig.load(path)  # a pool.json from before the store: still read
    assert old.store == "" and old.hosts["h1"].home == "/h1"
    old.save(path)
    assert "store" not in json.loads(path.read_text())  # and written as it was
    PoolConfig("sv", {}, store="etcd://a:1").save(path)
    assert PoolConfig.load(path).store == "etcd://a:1"
