"""Where an agent's home is, as plain strings: what the CLI's fast path needs
without importing pathlib (every CLI call pays its imports). Resolved at call
time, never at import time."""

from __future__ import annotations

import os


def default_home() -> str:
    env = os.environ.get("SANVISOR_HOME")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/sanvisor"
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"),
                                                             ".local", "state")
    return os.path.join(state, "sanvisor")


def lab_root() -> str:
    """The one-machine lab's home (its hosts' agent homes are below it)."""
    return os.environ.get("SANVISOR_LAB_HOME", "/var/lib/sanvisor/lab")


def agent_socket(home: str) -> str:
    return os.path.join(home, "agent.sock")
