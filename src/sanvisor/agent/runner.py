"""One command runner for the agent (VDSM style): raises CommandError with cmd/rc/out/err."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence

from sanvisor.errors import CommandError

RunFn = Callable[[Sequence[str]], str]


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 60) -> str:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise CommandError(list(cmd), 127, "", f"{cmd[0]}: command not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(list(cmd), -1, "", f"timed out after {timeout}s") from exc
    if check and proc.returncode != 0:
        raise CommandError(list(cmd), proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout
