"""The whole sanvisor agent for a nested host's dom0, as one gzip'd tar stream.

A real Xen host installs sanvisor in dom0 like any Python program and its agent
calls xl there (drivers/xen/local.py). A nested host's dom0 is a busybox initramfs
with only the command server's Python (xenhost/pybundle.py): this bundle brings the
rest, taken from this machine's install, to unpack at ``/`` in dom0:

- ``AGENT_HOME/lib/python3.X``: the standard library (no tests, no Tk, no IDLE),
  its extension modules, and in ``site-packages`` the packages the agent and the
  CLI import (found by importing them: each whole top-level package is taken, so
  lazy imports inside a package are covered), sanvisor included;
- ``AGENT_HOME/bin/sanvisor-engine``: the data-path engine (C, libc only);
- ``AGENT_HOME/libs``: the shared libraries those extension modules link to that
  dom0 has no copy of (appended to dom0's LD_LIBRARY_PATH: dom0's own come first).

dom0's interpreter (``pybundle.PYTHON_HOME/bin/python3``) runs it with
``PYTHONHOME=AGENT_HOME``: :func:`agent_env`.
"""

from __future__ import annotations

import io
import os
import re
import sys
import sysconfig
import tarfile
from collections.abc import Iterable
from pathlib import Path

from sanvisor.command import run
from sanvisor.errors import XenHostError
from sanvisor.xenhost import pybundle

AGENT_HOME = "/opt/sanvisor"
ENGINE = f"{AGENT_HOME}/bin/sanvisor-engine"
#: What the agent (daemon, API, Xen driver) and the CLI import, lazily included.
AGENT_MODULES = (
    "sanvisor.cli.main", "sanvisor.cli.verbs", "sanvisor.agent.daemon",
    "sanvisor.agent.manager", "sanvisor.agent.service", "sanvisor.agent.storage_service",
    "sanvisor.agent.volume_service", "sanvisor.agent.peers", "sanvisor.agent.membership",
    "sanvisor.agent.eventlog", "sanvisor.api.app", "sanvisor.api.client",
    "sanvisor.drivers.xen.driver", "sanvisor.drivers.xen.transport",
    "sanvisor.drivers.xen.local", "sanvisor.drivers.qemu.driver", "sanvisor.drivers.fake",
    "sanvisor.storage.multipathd", "uvicorn", "uvicorn.protocols.http.h11_impl",
    "uvicorn.lifespan.on", "uvicorn.loops.asyncio", "uvicorn.loops.auto",
    "uvicorn.protocols.http.auto", "uvicorn.protocols.websockets.auto")
_SKIP_STDLIB = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
                "site-packages", "dist-packages", "__pycache__", "unittest", "pydoc_data"}
_SKIP_DYNLOAD = re.compile(r"^(_test|_tkinter|_ctypes_test|xxlimited|_xxtestfuzz|_xxsub)")
#: Loaded with every program: dom0 has them, the bundle never carries them.
_CORE_LIBS = re.compile(r"^(libc|libm|ld-linux[-\w]*)\.so")


def agent_env() -> dict[str, str]:
    """What dom0's Python needs in its environment to run the unpacked agent (on top
    of dom0's own, xenhost/scripts.py; PYTHONPATH and PYTHONDONTWRITEBYTECODE unset)."""
    libs = "/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu"
    return {"PYTHONHOME": AGENT_HOME, "LD_LIBRARY_PATH": f"{libs}:{AGENT_HOME}/libs",
            "SANVISOR_ENGINE": ENGINE}


def python_argv(*args: str) -> list[str]:
    """A command line for dom0 that runs its interpreter on the agent's home: through
    busybox ``env`` (dom0's command server takes argv only). Bytecode is written, so
    the modules are compiled once in dom0, not at every run."""
    sets = [f"{k}={v}" for k, v in sorted(agent_env().items())]
    return ["env", "-u", "PYTHONPATH", "-u", "PYTHONDONTWRITEBYTECODE", *sets,
            f"{pybundle.PYTHON_HOME}/bin/python3", *args]


def _imported(python: str) -> list[str]:
    """The files of the modules the agent imports, with their compiled bytecode
    (shipped: compiling them again under dom0's emulated CPU takes long)."""
    code = ("import importlib, sys\n"
            f"for m in {AGENT_MODULES!r}: importlib.import_module(m)\n"
            "print('\\n'.join(sorted({f for m in list(sys.modules.values()) for f in "
            "(getattr(m, '__file__', None), getattr(m, '__cached__', None)) if f})))")
    res = run([python, "-c", code], check=False, timeout=120)
    if res.rc != 0:
        raise XenHostError(f"cannot import the agent with {python}: {res.err.strip()[-300:]}")
    return [line for line in res.out.splitlines() if line]


def _tree(root: Path, skip: set[str]) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            if not name.endswith((".pyc", ".pyo")):
                yield Path(dirpath) / name


def _packages(found: list[str], stdlib: Path) -> dict[Path, str]:
    """host path -> dom0 path of every third-party/sanvisor top-level package imported."""
    out: dict[Path, str] = {}
    site = f"{AGENT_HOME[1:]}/lib/python{sys.version_info.major}.{sys.version_info.minor}" \
           "/site-packages"
    roots = sorted({p for p in sys.path if p and Path(p).is_dir()
                    and not Path(p).resolve().is_relative_to(stdlib)}, key=len, reverse=True)
    for name in found:
        path = Path(name)
        if not path.is_file() or path.resolve().is_relative_to(stdlib):
            continue
        root = next((Path(r) for r in roots if path.is_relative_to(r)), None)
        if root is None:
            continue
        top = root / path.relative_to(root).parts[0]
        tree = _tree(top, {"__pycache__", "tests"}) if top.is_dir() else [top]
        for f in [*tree, *([path] if path.suffix == ".pyc" else [])]:
            out[f] = f"{site}/{f.relative_to(root)}"
    return out


def _shared_libs(objects: Iterable[Path]) -> dict[Path, str]:
    out: dict[Path, str] = {}
    for obj in objects:
        res = run(["ldd", str(obj)], check=False)
        for m in re.finditer(r"=> (/\S+) \(", res.out):
            lib = Path(m.group(1))
            if not _CORE_LIBS.match(lib.name) and "libpython" not in lib.name:
                out[lib] = f"{AGENT_HOME[1:]}/libs/{lib.name}"
    return out


def files() -> dict[Path, str]:
    """host file -> dom0 path (relative) of everything the bundle carries."""
    stdlib = Path(sysconfig.get_path("stdlib", vars={"base": sys.base_prefix,
                                                      "installed_base": sys.base_prefix}))
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    out = {f: f"{AGENT_HOME[1:]}/lib/{ver}/{f.relative_to(stdlib)}"
           for f in _tree(stdlib, _SKIP_STDLIB)
           if not (f.parent.name == "lib-dynload" and _SKIP_DYNLOAD.match(f.name))
           and not f.parent.name.startswith("config-")}
    found = _imported(sys.executable)
    out.update({f: f"{AGENT_HOME[1:]}/lib/{ver}/{f.relative_to(stdlib)}"
                for f in map(Path, found) if f.suffix == ".pyc" and f.is_file()
                and f.resolve().is_relative_to(stdlib)})
    out.update(_packages(found, stdlib))
    out.update(_shared_libs(f for f in list(out) if f.suffix == ".so"))
    from sanvisor.storage.engine import engine_binary

    out[engine_binary()] = ENGINE[1:]
    return out


def tarball() -> bytes:
    """The bundle as a .tar.gz, paths relative to dom0's ``/``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar:
        for src, dst in sorted(files().items(), key=lambda kv: kv[1]):
            tar.add(str(src), arcname=dst, recursive=False)
    return buf.getvalue()
