"""Build (once) and cache the guest kit: a PVH-bootable vmlinux and a busybox initramfs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import BinaryIO

from sanvisor.command import run
from sanvisor.errors import GuestKitError
from sanvisor.guestkit import kernel
from sanvisor.guestkit.cpio import Entry, NewcWriter
from sanvisor.guestkit.modules import FS_MODULES, WANTED_MODULES, ModuleSet, collect_modules

#: Bump when the builder's output changes for the same inputs.
BUILDER_VERSION = "1"
BUSYBOX = Path("/bin/busybox")
KIT_JSON = "kit.json"
#: Kernel arguments measured to boot this kit fastest under TCG with ``-M pc`` (the
#: driver adds ``sv.ip0=``/``sv.gw=``/``sv.hostname=``). ``acpi=noirq`` saves ~0.35 s of
#: ACPI PCI-link setup; ``swiotlb=noforce`` returns 32 MiB that maxmem>4G would reserve.
KERNEL_ARGS = (
    "console=ttyS0 quiet swiotlb=noforce acpi=noirq cryptomgr.notests tsc=reliable"
    " no_timer_check i8042.noaux i8042.nokbd i8042.nopnp init_on_alloc=0"
    " page_alloc.shuffle=0 mitigations=off audit=0 nowatchdog memhp_default_state=online_movable"
)

#: Package data shipped next to this module -> (path in the guest, permissions).
SCRIPTS: dict[str, tuple[str, int]] = {
    "init.sh": ("init", 0o755),
    "hotplug.sh": ("sbin/hotplug", 0o755),
    "sv-counter.sh": ("sbin/sv-counter", 0o755),
    "sv-status.sh": ("sbin/sv-status", 0o755),
    "sv-ctl.sh": ("sbin/sv-ctl", 0o755),
    "sv-root.sh": ("sbin/sv-root", 0o755),
    "halt.sh": ("sbin/poweroff", 0o755),
    "acpi-power.sh": ("etc/acpi/PWRF/00000080", 0o755),
    "profile.sh": ("etc/profile", 0o644),
}
#: Applets replaced by our scripts or deliberately absent (no modprobe: the kernel's
#: request_module would call it and fail slowly without modules.dep).
_SKIP_APPLETS = {"poweroff", "reboot", "halt", "modprobe", "init", "linuxrc"}
_DIRS = ("bin", "sbin", "dev", "etc", "etc/acpi", "etc/acpi/PWRF", "lib", "lib/modules",
         "proc", "sys", "run", "tmp", "root", "var", "mnt")


@dataclass(frozen=True)
class GuestKit:
    kernel: Path
    initrd: Path
    version: str

    def to_dict(self) -> dict[str, str]:
        return {"kernel": str(self.kernel), "initrd": str(self.initrd), "version": self.version}


def default_cache_dir() -> Path:
    """``$SANVISOR_CACHE`` (or /var/cache/sanvisor as root, ~/.cache/sanvisor otherwise)
    plus ``guest-kit``."""
    env = os.environ.get("SANVISOR_CACHE")
    if env:
        base = Path(env)
    elif os.geteuid() == 0:
        base = Path("/var/cache/sanvisor")
    else:
        base = Path.home() / ".cache" / "sanvisor"
    return base / "guest-kit"


def script_text(name: str) -> str:
    return (resources.files("sanvisor.guestkit") / name).read_text()


def _busybox_applets(busybox: Path) -> list[str]:
    res = run([str(busybox), "--list"], check=False)
    if res.rc != 0:
        raise GuestKitError(f"{busybox} --list failed: {res.err.strip()}")
    return sorted(a for a in res.out.split() if a and "/" not in a)


def input_hash(package_version: str, busybox_sha: str) -> str:
    h = hashlib.sha256()
    parts = [BUILDER_VERSION, package_version, busybox_sha, ",".join(WANTED_MODULES),
             ",".join(FS_MODULES)]
    parts += [f"{name}\0{script_text(name)}" for name in sorted(SCRIPTS)]
    for part in parts:
        h.update(part.encode() + b"\0\0")
    return h.hexdigest()[:16]


def write_initrd(out: BinaryIO, busybox: bytes, applets: list[str],
                 mods: ModuleSet, on_demand: tuple[str, ...] = ()) -> None:
    """The newc initramfs: busybox + applet symlinks, our scripts, ordered modules.
    ``on_demand``: modules of ``mods`` that /init does not load (``fs.order``, for
    sv-root), in their order."""
    w = NewcWriter(out)
    for d in _DIRS:
        w.directory(d, 0o700 if d == "root" else 0o755)
    w.add(Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    w.add(Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)))
    w.file("bin/busybox", busybox, 0o755)
    for applet in applets:
        if applet not in _SKIP_APPLETS and applet != "busybox":
            w.symlink(f"bin/{applet}", "busybox")
    for name, (dest, perm) in SCRIPTS.items():
        w.file(dest, script_text(name).encode(), perm)
    w.symlink("sbin/reboot", "poweroff")
    w.symlink("sbin/halt", "poweroff")
    w.symlink("usr", ".")
    for name in mods.order:
        w.file(f"lib/modules/{name}.ko", mods.blobs[name], 0o644)
    boot = [m for m in mods.order if m not in on_demand]
    w.file("lib/modules/load.order", "".join(f"{m}\n" for m in boot).encode())
    w.file("lib/modules/fs.order", "".join(f"{m}\n" for m in on_demand).encode())
    w.close()


def _load(kit_dir: Path) -> GuestKit | None:
    try:
        meta = json.loads((kit_dir / KIT_JSON).read_text())
        kit = GuestKit(kit_dir / meta["kernel"], kit_dir / meta["initrd"], meta["version"])
    except (OSError, ValueError, KeyError):
        return None
    return kit if kit.kernel.is_file() and kit.initrd.is_file() else None


def build_kit(cache_dir: Path | None = None, *, force: bool = False,
              log: Callable[[str], None] | None = None) -> GuestKit:
    """Return the cached guest kit, building it first when missing (or ``force``)."""
    say: Callable[[str], None] = log or (lambda _msg: None)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not BUSYBOX.is_file():
        raise GuestKitError(
            f"{BUSYBOX} not found: apt-get install busybox-static", path=str(BUSYBOX)
        )
    busybox = BUSYBOX.read_bytes()
    deb_dir = cache / "debs"
    deb = kernel.cached_deb(deb_dir) or kernel.download_package(deb_dir, say)
    pkg_version = deb.name.removesuffix(".deb")  # name_version_arch
    key = input_hash(pkg_version, hashlib.sha256(busybox).hexdigest())
    kit_dir = cache / key
    if not force:
        kit = _load(kit_dir)
        if kit is not None:
            return kit
    say(f"building guest kit {key} from {deb.name}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache))
    try:
        root = tmp / "pkg"
        kernel.unpack(deb, root)
        release = kernel.kernel_release(root)
        out = tmp / "kit"
        out.mkdir()
        say("extracting vmlinux from the bzImage")
        vmlinux = kernel.extract_vmlinux((root / "boot" / f"vmlinuz-{release}").read_bytes())
        (out / "vmlinux").write_bytes(vmlinux)
        moddir = root / "lib" / "modules" / release
        boot = collect_modules(moddir).order
        mods = collect_modules(moddir, WANTED_MODULES + FS_MODULES)
        on_demand = tuple(m for m in mods.order if m not in boot)
        say(f"modules: {' '.join(boot)} (on demand: {' '.join(on_demand)})")
        with (out / "initrd.cpio").open("wb") as f:
            write_initrd(f, busybox, _busybox_applets(BUSYBOX), mods, on_demand)
        config = kernel.read_config(root, release)
        meta = {"kernel": "vmlinux", "initrd": "initrd.cpio", "version": release,
                "package": pkg_version, "modules": list(boot),
                "modules_on_demand": list(on_demand),
                "config": {k: config.get(k, "n") for k in _CONFIG_FACTS}}
        (out / KIT_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        if kit_dir.exists():  # force: move the old kit aside, then swap in the new one
            old = tmp / "old"
            kit_dir.rename(old)
        out.rename(kit_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kit = _load(kit_dir)
    if kit is None:
        raise GuestKitError(f"guest kit in {kit_dir} is incomplete", path=str(kit_dir))
    say(f"guest kit ready: {kit_dir}")
    return kit


_CONFIG_FACTS = (
    "CONFIG_UEVENT_HELPER", "CONFIG_ACPI_BUTTON", "CONFIG_MEMORY_HOTPLUG",
    "CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE", "CONFIG_ACPI_HOTPLUG_MEMORY",
    "CONFIG_HOTPLUG_CPU", "CONFIG_ACPI_HOTPLUG_CPU", "CONFIG_HOTPLUG_PCI_ACPI",
    "CONFIG_PVH", "CONFIG_PVPANIC",
)
