"""Which QEMU runs the guests.

``$SANVISOR_QEMU`` if set (it must be an executable), else the QEMU that
scripts/fetch-qemu.sh unpacked in the source tree's ``build/qemu`` (QEMU 10 from
bookworm-backports, fetched where the system's QEMU is 7.2: 7.2 corrupts about one
TCG guest in ten that it migrates live; docs/migration.md), else the system's
``qemu-system-x86_64`` on PATH. The nested Xen hosts of the lab keep the system's QEMU.
"""

from __future__ import annotations

import os
import shutil
from functools import cache
from pathlib import Path

from sanvisor.command import run
from sanvisor.errors import CommandError, ResourceError

QEMU_BINARY = "qemu-system-x86_64"
SOURCE_BUILD = Path(__file__).resolve().parents[4] / "build" / "qemu" / "bin" / QEMU_BINARY


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def qemu_binary() -> str:
    """The guests' QEMU, as the module docstring says (a ResourceError for a bad
    ``$SANVISOR_QEMU``, so an agent does not start on a QEMU that is not there)."""
    env = os.environ.get("SANVISOR_QEMU")
    if env:
        if not _executable(Path(env)):
            raise ResourceError(f"SANVISOR_QEMU={env}: no such executable")
        return env
    if _executable(SOURCE_BUILD):
        return str(SOURCE_BUILD)
    return shutil.which(QEMU_BINARY) or QEMU_BINARY


@cache
def qemu_version(binary: str) -> str:
    """``binary --version``'s first line's version ("10.0.2"), or "" if it cannot say."""
    try:
        out = run([binary, "--version"], timeout=10, check=False).out
    except (OSError, CommandError):
        return ""
    words = out.split("\n", 1)[0].split()
    return words[3] if len(words) > 3 and words[:3] == ["QEMU", "emulator", "version"] else ""
