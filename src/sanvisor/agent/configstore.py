"""Where managed domains' configs are kept (`new`, `start`, `delete`): behind a small
interface, so that the pool's state store can hold them instead of the host.

    ConfigStore      the interface the agent's verbs use (agent/managed.py)
    HostConfigStore  this host's: one JSON file per domain under <home>/managed/,
                     written atomically, read once at start (`list` asks it for
                     every domain: no file read per row)

The seam: ``HostService(manager, configs=...)`` takes any ConfigStore; a store
backed by pool/store*.py (pool-wide registrations, `start --host` anywhere) only
has to implement these five methods.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sanvisor.agent.records import write_json
from sanvisor.errors import ConfigError, RecordError
from sanvisor.model.domain import DomainSpec


@dataclass
class Registration:
    """A managed domain: its config (the parsed spec, uuid included) and options."""

    name: str
    spec: dict[str, Any]  # DomainSpec.to_dict(), uuid filled in
    autostart: bool = False  # start it when the agent starts (xendomains' job)
    source: str = ""  # the config file it came from
    registered: float = field(default_factory=time.time)
    away: str = ""  # why it is not to be started here (it left by migration)

    def domain_spec(self) -> DomainSpec:
        """A fresh DomainSpec (each start gets its own copy)."""
        try:
            spec = DomainSpec.from_dict(self.spec)
            spec.validate()
        except (TypeError, ValueError, KeyError, ConfigError) as exc:
            raise RecordError(f"the registered config of {self.name} is unreadable: "
                              f"{exc}") from None
        return spec

    @property
    def uuid(self) -> str:
        return str(self.spec.get("uuid") or "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ConfigStore(abc.ABC):
    @abc.abstractmethod
    def get(self, name: str) -> Registration | None: ...

    @abc.abstractmethod
    def all(self) -> list[Registration]: ...

    @abc.abstractmethod
    def put(self, reg: Registration) -> None:
        """Add or replace the registration of ``reg.name``."""

    @abc.abstractmethod
    def remove(self, name: str) -> bool:
        """Forget ``name``; False if it was not registered."""

    @abc.abstractmethod
    def rename(self, old: str, new: str) -> None: ...


class HostConfigStore(ConfigStore):
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._regs: dict[str, Registration] = {}
        if directory.is_dir():
            for f in sorted(directory.glob("*.json")):
                with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                    reg = Registration(**json.loads(f.read_text()))
                    if reg.name == f.stem:
                        self._regs[reg.name] = reg

    def _file(self, name: str) -> Path:
        return self.dir / f"{name}.json"  # a domain name has no '/' (DomainSpec rules)

    def get(self, name: str) -> Registration | None:
        return self._regs.get(name)

    def all(self) -> list[Registration]:
        return sorted(self._regs.values(), key=lambda r: r.name)

    def put(self, reg: Registration) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_json(self._file(reg.name), reg.to_dict())
        self._regs[reg.name] = reg

    def remove(self, name: str) -> bool:
        if self._regs.pop(name, None) is None:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._file(name))
        return True

    def rename(self, old: str, new: str) -> None:
        reg = self._regs.get(old)
        if reg is None:
            return
        moved = Registration(**{**reg.to_dict(), "name": new,
                                "spec": {**reg.spec, "name": new}})
        self.put(moved)
        self.remove(old)
