"""Which Debian packages a nested Xen host needs, fetched with ``apt-get download``.

Nothing is installed on the host: the .debs are kept in ``DEB_DIR`` of the cache and
unpacked with ``dpkg-deb -x``. The package set is the four Xen packages plus, followed
transitively, every ``Depends:`` on a Xen library (``libxen*``) and every library package
(``lib*``) that is *not* installed on the host (e.g. ``libyajl2``); plain system libraries
that are installed (libc6, zlib1g...) are copied from the host's /lib at build time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from sanvisor.command import Result, run
from sanvisor.errors import CommandError
from sanvisor.errors import XenHostError as XenHostError  # re-exported

BASE_PACKAGES: tuple[str, ...] = (
    "xen-hypervisor-4.17-amd64",
    "xen-utils-4.17",
    "xen-utils-common",
    "xenstore-utils",
)

Log = Callable[[str], None]


def parse_depends(text: str) -> list[str]:
    """The ``Depends:`` (and ``|Depends:``) package names in ``apt-cache depends`` output,
    in order, without virtual ``<...>`` names and duplicates."""
    out: list[str] = []
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        value = value.strip()
        if not sep or key.lstrip("|") != "Depends" or not value or value.startswith("<"):
            continue
        name = value.split(":", 1)[0]  # drop an ``:any`` qualifier
        if name not in out:
            out.append(name)
    return out


def wanted_dependency(name: str, installed: Callable[[str], bool]) -> bool:
    """Follow a dependency into the kit: Xen libraries always, other libraries only when
    the host lacks them (their files are then taken from the unpacked package)."""
    if name.startswith("libxen"):
        return True
    return name.startswith("lib") and not installed(name)


def resolve_packages(
    depends_of: Callable[[str], str],
    installed: Callable[[str], bool],
    base: Iterable[str] = BASE_PACKAGES,
) -> list[str]:
    """Base packages plus the transitive closure of :func:`wanted_dependency`.

    ``depends_of(pkg)`` returns the ``apt-cache depends pkg`` text; the result keeps
    discovery order (breadth first) so it is stable for hashing.
    """
    order: list[str] = []
    queue = list(base)
    while queue:
        pkg = queue.pop(0)
        if pkg in order:
            continue
        order.append(pkg)
        for dep in parse_depends(depends_of(pkg)):
            if dep not in order and dep not in queue and wanted_dependency(dep, installed):
                queue.append(dep)
    return order


def _run(cmd: list[str], cwd: Path | None = None) -> Result:
    """The one runner (sanvisor.command), rc kept; a missing program said plainly."""
    try:
        return run(cmd, cwd=cwd, check=False, timeout=600)
    except CommandError as exc:
        if exc.rc != 127:
            raise
        raise XenHostError(f"{cmd[0]} not found: needs a Debian host", command=cmd) from exc


def apt_depends(pkg: str) -> str:
    res = _run(["apt-cache", "depends", pkg])
    if res.rc != 0:
        raise XenHostError(f"apt-cache depends {pkg} failed: {res.err.strip()}", package=pkg)
    return res.out


def host_has(pkg: str) -> bool:
    res = _run(["dpkg-query", "-W", "-f", "${Status}", pkg])
    return res.rc == 0 and res.out.strip().endswith(" installed")


def candidate_version(pkg: str) -> str:
    res = _run(["apt-cache", "policy", pkg])
    m = re.search(r"^\s*Candidate:\s*(\S+)", res.out, re.M)
    if res.rc != 0 or m is None or m.group(1) == "(none)":
        raise XenHostError(f"no candidate version for {pkg} (apt-get update?)", package=pkg)
    return m.group(1)


def deb_name(pkg: str, version: str) -> str:
    """The file name ``apt-get download`` gives (an epoch ``1:`` becomes ``1%3a``)."""
    return f"{pkg}_{version.replace(':', '%3a')}_amd64.deb"


def download(pkgs: list[str], deb_dir: Path, log: Log) -> list[Path]:
    """``apt-get download`` what is not already in ``deb_dir``; return the .deb paths."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    want = {p: deb_dir / deb_name(p, candidate_version(p)) for p in pkgs}
    missing = [p for p, path in want.items() if not path.is_file()]
    if missing:
        log(f"downloading {' '.join(missing)}")
        res = _run(["apt-get", "download", *missing], cwd=deb_dir)
        if res.rc != 0:
            raise XenHostError(f"apt-get download failed: {res.err.strip()[-500:]}")
    absent = [str(p) for p in want.values() if not p.is_file()]
    if absent:
        raise XenHostError(f"downloaded packages missing: {absent}")
    return list(want.values())


def unpack(deb: Path, dest: Path) -> None:
    res = _run(["dpkg-deb", "-x", str(deb), str(dest)])
    if res.rc != 0:
        raise XenHostError(f"dpkg-deb -x {deb} failed: {res.err.strip()}", deb=str(deb))


_LDD_LINE = re.compile(r"^\s*(\S+)\s+=>\s+(\S+)")


def parse_ldd(text: str) -> dict[str, str | None]:
    """``soname -> resolved path`` (None for ``not found``) from ``ldd`` output."""
    out: dict[str, str | None] = {}
    for line in text.splitlines():
        m = _LDD_LINE.match(line)
        if m:
            out[m.group(1)] = None if m.group(2) == "not" else m.group(2)
    return out


def library_closure(binaries: Iterable[Path], lib_dirs: list[Path]) -> dict[str, Path]:
    """Every shared library the binaries need (``ldd`` with ``lib_dirs`` searched first):
    soname -> file on the build host. Raises when one cannot be found."""
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(str(d) for d in lib_dirs))
    libs: dict[str, Path] = {}
    for binary in binaries:
        res = run(["ldd", str(binary)], env=env, check=False)
        if res.rc != 0:
            continue  # scripts, static binaries
        for soname, path in parse_ldd(res.out).items():
            if path is None:
                raise XenHostError(f"{binary.name}: library {soname} not found", lib=soname)
            libs.setdefault(soname, Path(path))
    return libs
