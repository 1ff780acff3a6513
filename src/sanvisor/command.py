"""The one way sanvisor runs a program: argv only (never a shell string), stdin,
a timeout, and a typed error carrying argv, rc, stdout and stderr (VDSM's LVM
runner is the model). Injected where tests fake it: a ``Runner`` is any callable
with :func:`run`'s signature.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sanvisor.errors import CommandError


@dataclass(frozen=True)
class Result:
    argv: list[str]
    rc: int
    out: str
    err: str


class Runner(Protocol):
    def __call__(self, argv: Sequence[str], *, stdin: str | None = None,
                 timeout: float = 60.0, check: bool = True, cwd: Path | None = None,
                 env: Mapping[str, str] | None = None, what: str | None = None
                 ) -> Result: ...


def run(argv: Sequence[str], *, stdin: str | None = None, timeout: float = 60.0,
        check: bool = True, cwd: Path | None = None,
        env: Mapping[str, str] | None = None, what: str | None = None) -> Result:
    """Run ``argv`` to completion. ``check``: a non-zero exit raises CommandError
    (``what`` names the command in its message). A missing program is rc 127, a
    timeout rc -1, both raised whatever ``check``."""
    cmd = [str(a) for a in argv]
    if not cmd:
        raise ValueError("run: empty argv")
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd, env=env,
                              stdin=None if stdin is not None else subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise CommandError(cmd, 127, "", f"{cmd[0]}: command not found", what=what) from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(cmd, -1, "", f"timed out after {timeout:g}s", what=what) from exc
    result = Result(cmd, proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise CommandError(cmd, proc.returncode, proc.stdout, proc.stderr, what=what)
    return result
