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


def pool_home() -> str:
    """The pool's home: its pool.json (the hosts and their agents). The one-machine
    lab is a pool whose hosts' homes are below it ($SANVISOR_LAB_HOME names it too)."""
    return (os.environ.get("SANVISOR_POOL_HOME") or os.environ.get("SANVISOR_LAB_HOME")
            or "/var/lib/sanvisor/lab")


def lab_root() -> str:
    """The one-machine lab's home: the pool home it builds."""
    return pool_home()


def pool_host_home(name: str) -> str | None:
    """The agent home of pool host ``name`` from the pool's pool.json (None if there is
    no such host or no pool). Plain json: the CLI's fast path reads it."""
    import json

    try:
        with open(os.path.join(pool_home(), "pool.json")) as fh:
            home = json.load(fh)["hosts"][name]["home"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return home if isinstance(home, str) else None


def agent_socket(home: str) -> str:
    return os.path.join(home, "agent.sock")
