"""The pool config: which hosts make the pool and how to reach each one's agent.

One JSON file in the pool's home (``sanvisor.where.pool_home()``): written by
whoever builds the pool (`sanvisor lab up` for the one-machine lab; an
administrator for real hosts), read by the CLI (`-H HOST`, `list --pool`,
`migrate DOM HOST`) and by the agents. Nothing else knows how the pool was built.

    {"name": "sv", "hosts": {"host1": {"home": "/var/lib/sanvisor/lab/host1",
                                        "driver": "qemu", "lan": "10.213.100.11",
                                        "address": "10.213.100.11", "port": 8141}},
     "store": "etcd://10.0.0.1:2379,10.0.0.2:2379"}

``store`` (optional) is the pool's state store URL (docs/store.md); without it, the
SQLite file store.db in the pool home.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sanvisor import where
from sanvisor.errors import ConfigError, NotFoundError

POOL_FILE = "pool.json"


@dataclass
class PoolHost:
    name: str
    home: str  # the host agent's home: its unix socket is home/agent.sock
    driver: str = "qemu"  # qemu | xen
    lan: str = ""  # the host's address on the pool's LAN ("" if it has none)
    # where its agent listens for the other hosts (TCP, mutual TLS; docs/pool.md) and
    # its QEMU for a migration stream; port 0: none (reached by its unix socket only)
    address: str = ""
    port: int = 0

    @property
    def socket(self) -> Path:
        return Path(self.home) / "agent.sock"


@dataclass
class PoolConfig:
    name: str
    hosts: dict[str, PoolHost] = field(default_factory=dict)
    store: str = ""  # the state store's URL ("": sqlite:<pool home>/store.db)
    array: str = ""  # the home of the pool's disk array daemon on this machine, if any

    def host(self, name: str) -> PoolHost:
        try:
            return self.hosts[name]
        except KeyError:
            raise NotFoundError(f"no host {name!r} in pool {self.name} (hosts: "
                                f"{', '.join(self.hosts) or 'none'})", host=name) from None

    def save(self, path: Path | None = None) -> Path:
        path = path or pool_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        data: dict[str, object] = {"name": self.name, "hosts": {
            n: asdict(h) for n, h in self.hosts.items()}}
        if self.store:
            data["store"] = self.store
        if self.array:
            data["array"] = self.array
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path | None = None) -> PoolConfig:
        path = path or pool_file()
        try:
            data = json.loads(path.read_text())
            hosts = {n: PoolHost(**{**h, "name": n}) for n, h in data["hosts"].items()}
            store = data.get("store") or ""
            if not isinstance(store, str):
                raise TypeError(f"store must be a URL, not {store!r}")
            array = data.get("array") or ""
            if not isinstance(array, str):
                raise TypeError(f"array must be a directory, not {array!r}")
            return cls(name=str(data["name"]), hosts=hosts, store=store, array=array)
        except FileNotFoundError:
            raise NotFoundError(f"no pool at {path.parent} (build one with 'sanvisor lab "
                                "up', or write its pool.json)", path=str(path)) from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"malformed pool config ({type(exc).__name__}: {exc})",
                              file=str(path)) from None


def pool_file() -> Path:
    return Path(where.pool_home()) / POOL_FILE
