"""Where the `array` verbs find the array: $SANVISOR_ARRAY_HOME, else the pool's array
(pool.json's "array", written by whoever builds the pool: the lab), else HOME/array.
No CLI code reads the lab's own files (issue 10, item 6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sanvisor.cli.array_verbs import _default_home
from sanvisor.errors import ConfigError
from sanvisor.pool.config import PoolConfig, PoolHost


@pytest.fixture
def pool_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SANVISOR_POOL_HOME", str(tmp_path / "pool"))
    monkeypatch.delenv("SANVISOR_ARRAY_HOME", raising=False)
    return tmp_path / "pool"


def test_the_pools_array_is_the_default(pool_home: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "agent"
    assert _default_home(home) == home / "array"  # no pool at all
    PoolConfig("p", {"h1": PoolHost("h1", str(home))}).save(pool_home / "pool.json")
    assert _default_home(home) == home / "array"  # a pool without an array
    (pool_home / "lab.json").write_text("{}")  # the lab's own file: not read
    assert _default_home(home) == home / "array"
    PoolConfig("p", {}, array=str(tmp_path / "arr")).save(pool_home / "pool.json")
    assert PoolConfig.load(pool_home / "pool.json").array == str(tmp_path / "arr")
    assert _default_home(home) == tmp_path / "arr"
    monkeypatch.setenv("SANVISOR_ARRAY_HOME", str(tmp_path / "env"))
    assert _default_home(home) == tmp_path / "env"


def test_a_malformed_array_entry_is_refused(pool_home: Path, tmp_path: Path) -> None:
    pool_home.mkdir()
    (pool_home / "pool.json").write_text(json.dumps({"name": "p", "hosts": {},
                                                     "array": 5}))
    with pytest.raises(ConfigError, match="array must be a directory"):
        PoolConfig.load(pool_home / "pool.json")
    with pytest.raises(ConfigError, match="array must be a directory"):
        _default_home(tmp_path)  # not a silent fall-back to another array
