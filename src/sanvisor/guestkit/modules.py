"""Pick kernel modules out of an unpacked kernel package and order them for ``insmod``.

Debian's package ships no ``modules.dep`` (depmod runs at install time), so dependencies
are read from each module's ``.modinfo`` section (``depends=a,b``); a ``modules.dep``
is used when present. Modules listed in ``modules.builtin`` are skipped.
"""

from __future__ import annotations

import lzma
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sanvisor.errors import GuestKitError

#: What the guest needs (names as the kernel spells them, ``-`` and ``_`` are equivalent).
WANTED_MODULES: tuple[str, ...] = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "virtio_net",
    "virtio_balloon",
    "virtio_console",
    "pvpanic_mmio",
    "pvpanic_pci",
    "button",  # ACPI power button -> input event for acpid
    "evdev",  # /dev/input/event* for acpid
    "xen_blkfront",  # as a Xen PV domU (init loads xen_* only under Xen)
    "xen_netfront",
)
#: Loaded by /sbin/sv-root only when the command line names a root= to mount (ext4 is
#: 2 MB of module: no boot pays for it otherwise). crc32c: ext4's metadata checksums
#: ask the crypto API for it, which would modprobe (absent) to find it.
FS_MODULES: tuple[str, ...] = ("crc32c_generic", "ext4")

_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")


def norm(name: str) -> str:
    """Canonical module name: no directory, no suffix, ``-`` replaced by ``_``."""
    base = name.rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def read_module(path: Path) -> bytes:
    """The ELF bytes of a module file, decompressing ``.ko.xz`` (``.ko.gz`` too)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        import gzip

        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise GuestKitError(f"zstd-compressed module not supported: {path}", path=str(path))
    return data


def modinfo_section(elf: bytes) -> bytes:
    """The raw ``.modinfo`` section of an ELF64 little-endian module."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise GuestKitError("not an ELF64 little-endian kernel module")
    shoff = int.from_bytes(elf[0x28:0x30], "little")
    shentsize = int.from_bytes(elf[0x3A:0x3C], "little")
    shnum = int.from_bytes(elf[0x3C:0x3E], "little")
    shstrndx = int.from_bytes(elf[0x3E:0x40], "little")

    def section(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        name = int.from_bytes(elf[base : base + 4], "little")
        off = int.from_bytes(elf[base + 0x18 : base + 0x20], "little")
        size = int.from_bytes(elf[base + 0x20 : base + 0x28], "little")
        return name, off, size

    _, str_off, str_size = section(shstrndx)
    names = elf[str_off : str_off + str_size]
    for i in range(shnum):
        name, off, size = section(i)
        if names[name : names.index(b"\0", name)] == b".modinfo":
            return elf[off : off + size]
    return b""


def modinfo_depends(elf: bytes) -> list[str]:
    """The ``depends=`` list from a module's .modinfo (empty when none)."""
    for item in modinfo_section(elf).split(b"\0"):
        if item.startswith(b"depends="):
            return [norm(d) for d in item[8:].decode().split(",") if d]
    return []


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """Parse ``modules.dep`` (``path: dep-path dep-path``) into name -> direct deps."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        deps[norm(mod)] = [norm(d) for d in rest.split()]
    return deps


def parse_builtin(text: str) -> set[str]:
    return {norm(line.strip()) for line in text.splitlines() if line.strip()}


def dependency_order(
    wanted: Iterable[str],
    deps_of: Callable[[str], list[str]],
    builtin: set[str] | frozenset[str] = frozenset(),
) -> list[str]:
    """Wanted modules plus their transitive deps, each after all of its deps (DFS order).

    Built-in modules are dropped (and not followed). Raises on a dependency cycle.
    """
    order: list[str] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str) -> None:
        name = norm(name)
        if name in done or name in builtin:
            return
        if name in visiting:
            raise GuestKitError(f"module dependency cycle at {name}", module=name)
        visiting.add(name)
        for dep in deps_of(name):
            visit(dep)
        visiting.discard(name)
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


@dataclass(frozen=True)
class ModuleSet:
    """Ordered modules with their (decompressed) ELF bytes."""

    order: tuple[str, ...]
    blobs: Mapping[str, bytes]


def collect_modules(moddir: Path, wanted: Iterable[str] = WANTED_MODULES) -> ModuleSet:
    """Resolve, order and read the modules from ``lib/modules/VER`` of an unpacked package."""
    files: dict[str, Path] = {}
    for path in (moddir / "kernel").rglob("*.ko*"):
        if path.name.endswith(_SUFFIXES):
            files.setdefault(norm(path.name), path)
    builtin_file = moddir / "modules.builtin"
    builtin = parse_builtin(builtin_file.read_text()) if builtin_file.exists() else set()
    dep_file = moddir / "modules.dep"
    table = parse_modules_dep(dep_file.read_text()) if dep_file.exists() else None
    blobs: dict[str, bytes] = {}

    def blob(name: str) -> bytes:
        if name not in blobs:
            if name not in files:
                raise GuestKitError(
                    f"kernel module {name} not found under {moddir}", module=name
                )
            blobs[name] = read_module(files[name])
        return blobs[name]

    def deps_of(name: str) -> list[str]:
        if table is not None and name in table:
            return table[name]
        return modinfo_depends(blob(name))

    wanted_list = [norm(w) for w in wanted]
    order = dependency_order(wanted_list, deps_of, builtin)
    return ModuleSet(tuple(order), {name: blob(name) for name in order})
