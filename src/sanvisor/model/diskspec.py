"""Disk specs of xm/xl configs (xl-disk-configuration(5)), the NBD disk form, and the
``root=`` rewriting drivers need when the guest names a disk otherwise. I/O-free."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from sanvisor.model.domain import DiskSpec

_MODES = {"r": "r", "ro": "r", "w": "w", "rw": "w", "w!": "w"}
_PREFIXES = {"phy": "phy", "file": "file", "tap": "file", "tap2": "file", "tapdisk": "file",
             "aio": "file", "raw": ""}
_FORMATS = ("qcow", "qcow2", "vhd", "qed")
_DISK_KEYS = ("target", "vdev", "access", "format", "devtype", "backendtype")
_DISK_FLAGS = ("discard", "no-discard", "direct-io-safe")  # hints; accepted, ignored
_PREFIX_RE = re.compile(r"([A-Za-z0-9]+):")
NBD_PORT = 10809  # IANA's, and qemu-nbd's default
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})")
_NBD_URI = re.compile(r"nbd://(\[[^]/]*\]|[^:/]*)(?::([^/]*))?(?:/(.*))?")
_NBD_COLON = re.compile(r"(\[[^]]*\]|[^:]+)(?::([0-9]+))?(?::exportname=(.*))?")
_ROOT_ARG = re.compile(r"(?<!\S)root=(\S+)")


def _check_format(fmt: str) -> None:
    if fmt in _FORMATS:
        raise ValueError(f"disk format {fmt!r} is not supported (only raw images)")
    if fmt not in ("", "raw", "empty"):
        raise ValueError(f"unknown disk format {fmt!r}")


def _nbd_host(host: str, spec: str) -> str:
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        if not _HOSTNAME.fullmatch(bare):
            raise ValueError(f"invalid NBD server {host!r} in {spec!r}") from None
        return bare
    return f"[{ip}]" if ip.version == 6 else str(ip)


def _nbd_port(port: str | None, spec: str) -> int:
    if port is None or port == "":
        return NBD_PORT
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 0 < int(port) < 65536:  # ASCII digits
        raise ValueError(f"invalid NBD port {port!r} in {spec!r} (1-65535)")
    return int(port)


def nbd_uri(text: str) -> str:
    """An NBD disk's address in any form a config may give it, as ``nbd://HOST:PORT[/EXPORT]``.

    ``nbd:HOST PORT`` (xm's block-nbd), ``nbd:HOST:PORT[:exportname=NAME]`` (QEMU's
    legacy form), ``nbd://HOST[:PORT][/EXPORT]`` (the NBD URI). The port defaults to
    10809; IPv6 addresses go in brackets except in xm's form."""
    rest = text[4:].strip()  # after "nbd:"
    export = ""
    if text[:6].lower() == "nbd://":
        m = _NBD_URI.fullmatch("nbd://" + text[6:])
        if not m or not m.group(1):
            raise ValueError(f"invalid NBD URI {text!r} (nbd://HOST[:PORT][/EXPORT])")
        host, port, export = m.group(1), m.group(2), m.group(3) or ""
    elif len(parts := rest.split()) == 2:  # xm: "nbd:HOST PORT"
        host, port = parts
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    elif (m := _NBD_COLON.fullmatch(rest)) and " " not in rest:
        host, port, export = m.group(1), m.group(2), m.group(3) or ""
    else:
        raise ValueError(f"invalid NBD disk {text!r} (use nbd:HOST PORT, nbd:HOST:PORT "
                         "or nbd://HOST:PORT/EXPORT)")
    if any(c in export for c in " ?#"):
        raise ValueError(f"invalid NBD export name {export!r} in {text!r}")
    host, num = _nbd_host(host, text), _nbd_port(port, text)
    return f"nbd://{host}:{num}" + (f"/{export}" if export else "")


def nbd_server(uri: str) -> tuple[str, int, str]:
    """(host, port, export) of a canonical ``nbd://HOST:PORT[/EXPORT]`` (IPv6 unbracketed)."""
    m = _NBD_URI.fullmatch(uri)
    if not m or m.group(2) is None:
        raise ValueError(f"not a canonical NBD URI: {uri!r}")
    return m.group(1).strip("[]"), int(m.group(2)), m.group(3) or ""


def parse_disk(spec: str) -> DiskSpec:
    """``[prefix:]path,vdev[:devtype|:mode],mode`` or ``key=value`` (xl-disk-configuration)."""
    pos: list[str] = []
    kv: dict[str, str] = {}
    head = spec
    # xl: target= comes last and takes the rest of the spec, commas included
    # (when key=value items follow it, it was not meant that way: parse as items)
    m = re.search(r"(?:^|,)\s*target\s*=", spec)
    if m and not re.search(r",\s*[a-z][a-z-]*\s*=", spec[m.end():]):
        head, kv["target"] = spec[: m.start()], spec[m.end():].strip()
    for item in (raw.strip() for raw in head.split(",") if head.strip()):
        key, sep, val = (s.strip() for s in item.partition("="))
        if sep and key in _DISK_KEYS:
            if key in kv:
                raise ValueError(f"{key}= given twice in disk {spec!r}")
            kv[key] = val
        elif item == "cdrom":
            kv["devtype"] = "cdrom"
        elif sep and re.fullmatch(r"[a-z][a-z-]*", key):
            raise ValueError(f"unknown disk setting {key!r} in {spec!r}")
        elif item not in _DISK_FLAGS:
            pos.append(item)
    while pos and not pos[-1]:
        pos.pop()  # trailing comma
    if len(pos) > 4:
        raise ValueError(f"too many fields in disk {spec!r} (expected path,vdev,mode)")
    path, fmt, vdev, access = pos if len(pos) == 4 else [*pos[:1], "", *pos[1:], "", "", ""][:4]
    if "target" in kv and path:
        raise ValueError(f"disk {spec!r} gives the path twice (positional and target=)")
    path, vdev = kv.get("target", path), kv.get("vdev", vdev).removeprefix("ioemu:")
    access, fmt = kv.get("access", access).lower(), kv.get("format", fmt).lower()
    _check_format(fmt)
    backend = {"phy": "phy", "qdisk": "", "tap": "", "": ""}.get(kv.get("backendtype", ""))
    if backend is None:
        raise ValueError(f"unknown backendtype {kv['backendtype']!r} (use phy, qdisk or tap)")
    if path[:4].lower() == "nbd:":
        if backend:
            raise ValueError(f"backendtype= does not apply to an NBD disk in {spec!r}")
        backend, path = "nbd", nbd_uri(path)
    while backend != "nbd" and (m := _PREFIX_RE.match(path)):
        if (prefix := m.group(1).lower()) in _FORMATS:
            _check_format(prefix)
        if prefix not in _PREFIXES:
            raise ValueError(f"unknown disk type prefix {prefix + ':'!r} in {spec!r} "
                             "(use phy:, file:, tap:aio: or nbd:)")
        backend, path = backend or _PREFIXES[prefix], path[m.end():]
    if backend == "phy" and path and not path.startswith("/"):
        path = "/dev/" + path  # xm: phy:sda1 means /dev/sda1
    devtype = kv.get("devtype", "disk")
    vdev, _, suffix = vdev.partition(":")
    if suffix in ("cdrom", "disk"):
        devtype = suffix
    elif suffix in _MODES:
        access = access or suffix
    elif suffix:
        raise ValueError(f"invalid suffix {suffix!r} on disk target in {spec!r}")
    if devtype not in ("disk", "cdrom"):
        raise ValueError(f"invalid devtype {devtype!r} (use disk or cdrom)")
    if not vdev:
        raise ValueError(f"disk {spec!r} has no guest device (vdev), e.g. 'xvda'")
    if access and access not in _MODES:
        raise ValueError(f"invalid access mode {access!r} in {spec!r} (use r, ro, w or rw)")
    if not path and devtype != "cdrom":
        raise ValueError(f"disk {spec!r} has no host path")
    mode = "r" if devtype == "cdrom" else _MODES[access or "w"]
    backend = backend or ("phy" if path.startswith("/dev/") else "file")
    target = DiskSpec.normalise_target(vdev)
    if devtype == "cdrom" and target_has_partition(target):
        raise ValueError(f"a CD-ROM cannot be a partition ({target}) in {spec!r}")
    return DiskSpec(target, backend, path, mode, devtype)


def target_has_partition(target: str) -> bool:
    return target[-1].isdigit()


def rewrite_root(cmdline: str, rename: Callable[[str], str | None]) -> str:
    """The kernel command line with each ``root=DEV`` replaced by ``rename(DEV)`` when
    that gives a name (``root=`` may come from the ``root`` key and from ``extra``)."""
    def sub(m: re.Match[str]) -> str:
        new = rename(m.group(1))
        return m.group(0) if new is None else f"root={new}"

    return _ROOT_ARG.sub(sub, cmdline)


def sd_name(index: int) -> str:
    """The kernel's name of the ``index``-th SCSI disk: 0 -> sda, 25 -> sdz, 26 -> sdaa."""
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return "sd" + letters
