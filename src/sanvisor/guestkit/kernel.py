"""Get Debian's kernel package (never installed on the host) and the ELF inside its bzImage.

Under TCG a bzImage spends ~2 s decompressing itself; the uncompressed ELF vmlinux boots
straight through its PVH entry, so we pull the xz payload out of the bzImage here.
"""

from __future__ import annotations

import lzma
from collections.abc import Callable
from pathlib import Path

from sanvisor.command import Result, run
from sanvisor.errors import CommandError, GuestKitError

XZ_MAGIC = b"\xfd7zXZ\x00"
ELF_MAGIC = b"\x7fELF"
META_PACKAGE = "linux-image-amd64"

Log = Callable[[str], None]


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the uncompressed ELF kernel found as an xz stream inside ``bzimage``.

    Tries each xz magic in turn; the decompressor stops at the end of the stream, so
    trailing bytes after the payload are ignored.
    """
    start = bzimage.find(XZ_MAGIC)
    while start >= 0:
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            out = dec.decompress(bzimage[start:])
        except lzma.LZMAError:
            out = b""
        if out.startswith(ELF_MAGIC):
            return out
        start = bzimage.find(XZ_MAGIC, start + 1)
    raise GuestKitError("no xz-compressed ELF kernel found in the bzImage")


def _run(cmd: list[str], cwd: Path | None = None) -> Result:
    """The one runner (sanvisor.command), rc kept; a missing program said plainly."""
    try:
        return run(cmd, cwd=cwd, check=False, timeout=600)
    except CommandError as exc:
        if exc.rc != 127:
            raise
        raise GuestKitError(
            f"{cmd[0]} not found: the guest kit needs a Debian host (apt, dpkg-deb)",
            command=cmd,
        ) from exc


def parse_depends(text: str) -> str | None:
    """The first ``Depends: linux-image-...`` package in ``apt-cache depends`` output."""
    for line in text.splitlines():
        key, _, value = line.strip().partition(":")
        value = value.strip()
        if key.strip().lstrip("|") == "Depends" and value.startswith("linux-image-"):
            return value
    return None


def resolve_package(log: Log) -> str:
    """The concrete kernel package ``linux-image-amd64`` depends on (``apt-get update``
    only when the first lookup fails)."""
    for attempt in range(2):
        res = _run(["apt-cache", "depends", META_PACKAGE])
        pkg = parse_depends(res.out) if res.rc == 0 else None
        if pkg:
            return pkg
        if attempt == 0:
            log("apt-cache lookup failed; running apt-get update")
            _run(["apt-get", "update"])
    raise GuestKitError(
        f"cannot resolve the kernel package behind {META_PACKAGE} (apt-cache depends)",
        package=META_PACKAGE,
    )


def cached_deb(deb_dir: Path) -> Path | None:
    """The newest kernel .deb already downloaded into ``deb_dir``, if any."""
    debs = sorted(deb_dir.glob("linux-image-*.deb"), key=lambda p: p.stat().st_mtime)
    return debs[-1] if debs else None


def download_package(deb_dir: Path, log: Log) -> Path:
    """``apt-get download`` the concrete kernel package into ``deb_dir``."""
    pkg = resolve_package(log)
    deb_dir.mkdir(parents=True, exist_ok=True)
    log(f"downloading {pkg}")
    res = _run(["apt-get", "download", pkg], cwd=deb_dir)
    found = sorted(deb_dir.glob(f"{pkg}_*.deb"))
    if res.rc != 0 or not found:
        raise GuestKitError(
            f"apt-get download {pkg} failed: {res.err.strip()[-500:]}", package=pkg
        )
    return found[-1]


def deb_field(deb: Path, field: str) -> str:
    res = _run(["dpkg-deb", "-f", str(deb), field])
    if res.rc != 0:
        raise GuestKitError(f"dpkg-deb -f {deb} failed: {res.err.strip()}", deb=str(deb))
    return res.out.strip()


def unpack(deb: Path, dest: Path) -> None:
    res = _run(["dpkg-deb", "-x", str(deb), str(dest)])
    if res.rc != 0:
        raise GuestKitError(f"dpkg-deb -x {deb} failed: {res.err.strip()}", deb=str(deb))


def kernel_release(root: Path) -> str:
    """The release (e.g. ``6.1.0-56-amd64``) of the single kernel in an unpacked package."""
    releases = sorted(p.name for p in (root / "lib" / "modules").iterdir() if p.is_dir())
    if len(releases) != 1:
        raise GuestKitError(f"expected one kernel in the package, found {releases}")
    return releases[0]


def read_config(root: Path, release: str) -> dict[str, str]:
    """``/boot/config-REL`` as a dict (``CONFIG_X`` -> ``y``/``m``/value; unset omitted)."""
    path = root / "boot" / f"config-{release}"
    config: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("CONFIG_") and "=" in line:
                key, value = line.split("=", 1)
                config[key] = value
    return config
