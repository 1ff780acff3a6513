"""Where sanvisor keeps its files. Resolved at call time, never at import time."""

from __future__ import annotations

import os
from pathlib import Path

from sanvisor import where


def default_home() -> Path:
    return Path(where.default_home())


class Layout:
    """The files of one host agent under its home directory."""

    __slots__ = ("home",)

    def __init__(self, home: Path) -> None:
        self.home = Path(home)

    def __repr__(self) -> str:
        return f"Layout({str(self.home)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and other.home == self.home

    def __hash__(self) -> int:
        return hash(self.home)

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
