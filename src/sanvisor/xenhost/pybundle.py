"""The Python that runs dom0's command server: this host's own interpreter, with only
the standard-library files the server imports (found by importing it, ~30 files).

dom0 gets ``PYTHON_HOME/bin/python3``, the stdlib under ``PYTHON_HOME/lib/python3.X``
(``PYTHONHOME`` points there, so nothing else on dom0 is searched) and the server's
two modules under ``SERVER_PATH`` as a package with empty ``__init__`` files (the
real ``sanvisor`` package imports far more than dom0 has).
"""

from __future__ import annotations

import os
import sys
import sysconfig
import tempfile
from pathlib import Path

from sanvisor.command import run
from sanvisor.errors import XenHostError

PYTHON_HOME = "/usr/lib/sv-python"
SERVER_PATH = "/usr/lib/sv-dom0"
SERVER_MODULE = "sanvisor.xenhost.dom0server"
#: mignet: dom0's end of a migration stream over the LAN (``python3 -S MIGNET ...``)
_SERVER_FILES = ("wire.py", "dom0server.py", "mignet.py")
MIGNET = f"{SERVER_PATH}/sanvisor/xenhost/mignet.py"
_PKG_DIRS = ("sanvisor", "sanvisor/xenhost")


def interpreter() -> Path:
    return Path(os.path.realpath(sys.executable))


def server_files() -> dict[str, bytes]:
    """dom0 path (relative, no leading /) -> content of the server package."""
    here = Path(__file__).resolve().parent
    files = {f"{SERVER_PATH[1:]}/{d}/__init__.py": b"" for d in _PKG_DIRS}
    for name in _SERVER_FILES:
        files[f"{SERVER_PATH[1:]}/sanvisor/xenhost/{name}"] = (here / name).read_bytes()
    return files


def _imported_files(python: Path, root: Path) -> list[str]:
    code = (f"import sys; sys.path.insert(0, {str(root)!r}); import {SERVER_MODULE}; "
            "import sanvisor.xenhost.mignet; "
            "print('\\n'.join(sorted({getattr(m, '__file__', None) or '' "
            "for m in list(sys.modules.values())})))")
    res = run([str(python), "-S", "-E", "-c", code], check=False)
    if res.rc != 0:
        raise XenHostError(f"cannot import the dom0 server with {python}: "
                           f"{res.err.strip()[-300:]}")
    return [line for line in res.out.splitlines() if line]


def bundle() -> tuple[Path, dict[str, Path], dict[str, bytes]]:
    """(interpreter, {dom0 path: stdlib file on this host}, {dom0 path: server file})."""
    python = interpreter()
    stdlib = Path(sysconfig.get_path("stdlib", vars={"base": sys.base_prefix,
                                                      "installed_base": sys.base_prefix}))
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    server = server_files()
    with tempfile.TemporaryDirectory(prefix="sv-dom0py.") as tmp:
        for rel, data in server.items():
            path = Path(tmp) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        found = _imported_files(python, Path(tmp) / SERVER_PATH[1:])
    files: dict[str, Path] = {}
    for name in found:
        path = Path(name)
        if path.is_file() and path.is_relative_to(stdlib):
            files[f"{PYTHON_HOME[1:]}/lib/{ver}/{path.relative_to(stdlib)}"] = path
    if not any(k.endswith("/os.py") for k in files):
        raise XenHostError(f"no os.py found under {stdlib} for dom0's Python")
    return python, files, server
