"""Where sanvisor keeps its files. Resolved at call time, never at import time."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_home() -> Path:
    env = os.environ.get("SANVISOR_HOME")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/sanvisor")
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local/state")) / "sanvisor"


@dataclass(frozen=True)
class Layout:
    """The files of one host agent under its home directory."""

    home: Path

    @property
    def socket(self) -> Path:
        return self.home / "agent.sock"

    @property
    def domains(self) -> Path:
        return self.home / "dom"

    @property
    def registry(self) -> Path:
        return self.home / "registry.json"

    @property
    def pidfile(self) -> Path:
        return self.home / "agent.pid"

    @property
    def log(self) -> Path:
        return self.home / "agent.log"

    def domain_dir(self, uuid: str) -> Path:
        return self.domains / uuid

    def ensure(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.home, 0o700)
        self.domains.mkdir(exist_ok=True, mode=0o700)
