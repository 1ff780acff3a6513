"""Build (once) and cache the Xen kit: Xen 4.17, a Debian dom0 kernel, a dom0 initramfs.

The initramfs holds busybox, the unpacked Xen packages (toolstack, libraries, scripts),
the system libraries their binaries need (copied from the build host), the Xen dom0
kernel modules, our ``/init`` and command server, and the guest kit's ELF
vmlinux and initrd under ``/srv/domu`` so a PV domU can be created without any disk.

Each kit has a key of its own (random, made at build): the command server in dom0
reads it from a root-only file of the initramfs, hosts booted from the kit get a
copy next to their control socket, and the channel authenticates with it (see
:mod:`sanvisor.xenhost.wire`). So the kit's ``dom0.cpio`` and ``ctl.key`` are 0600.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sanvisor.guestkit import build as guestbuild
from sanvisor.guestkit import kernel
from sanvisor.guestkit.cpio import Entry, NewcWriter
from sanvisor.guestkit.modules import ModuleSet, collect_modules
from sanvisor.xenhost import packages, pybundle, scripts
from sanvisor.xenhost.packages import XenHostError

BUILDER_VERSION = "6"
KIT_JSON = "kit.json"
KEY_FILE = "ctl.key"  # the kit's channel key (hex), next to kit.json
DOM0_KEY = "etc/sanvisor/ctl.key"  # where dom0's command server reads it
XEN_GZ = "boot/xen-4.17-amd64.gz"
DOM0_MODULES: tuple[str, ...] = (
    "xen_evtchn", "xen_gntdev", "xen_gntalloc", "xen_privcmd", "xenfs",
    "xen_blkback", "xen_netback", "bridge", "tun",
    "virtio_pci", "virtio_console",  # the command channel's port (sanvisor.ctl)
    "loop",  # file-backed disks for domUs
    "virtio_net",  # the host's NIC on the lab's LAN (migration streams, xenbr0's uplink)
)
#: Binaries whose shared libraries (ldd) are copied into dom0.
LDD_BINARIES = (
    "usr/lib/xen-4.17/bin/xl", "usr/lib/xen-4.17/bin/xenstored",
    "usr/lib/xen-4.17/bin/xenconsoled", "usr/lib/xen-4.17/bin/xen-init-dom0",
    "usr/lib/xen-4.17/bin/libxl-save-helper", "usr/lib/xen-4.17/bin/xenconsole",
    "usr/lib/xen-4.17/bin/xentop", "usr/bin/xenstore",
)
#: Loaded with dlopen (pthread_cancel), so ldd does not list it.
EXTRA_LIBS = ("libgcc_s.so.1",)
HOST_LIB_DIR = Path("/lib/x86_64-linux-gnu")
LOADER = Path("/lib64/ld-linux-x86-64.so.2")
_SKIP_PREFIXES = ("boot", "usr/share/doc", "usr/share/man", "usr/share/lintian", "etc/init.d")
_DIRS = ("bin", "sbin", "dev", "proc", "sys", "run", "tmp", "root", "var/lib/xen",
         "var/log", "lib/modules", "lib/x86_64-linux-gnu", "lib64", "srv/domu", "mnt")
DOMU_DIR = "srv/domu"
#: Where dom0 finds the guest kit for PV domUs (see :func:`sanvisor.xenhost.pv_config`).
DOMU_KERNEL = f"/{DOMU_DIR}/vmlinux"
DOMU_RAMDISK = f"/{DOMU_DIR}/initrd.cpio"

Log = Callable[[str], None]


@dataclass(frozen=True)
class XenKit:
    xen: Path
    dom0_kernel: Path
    dom0_initrd: Path
    version: str

    @property
    def key(self) -> Path:
        """The key dom0's command server holds (a copy goes next to each host's socket)."""
        return self.dom0_initrd.with_name(KEY_FILE)

    def to_dict(self) -> dict[str, str]:
        return {"xen": str(self.xen), "dom0_kernel": str(self.dom0_kernel),
                "dom0_initrd": str(self.dom0_initrd), "version": self.version}


def default_cache_dir() -> Path:
    """Next to the guest kit's cache: ``.../sanvisor/xen-kit``."""
    return guestbuild.default_cache_dir().parent / "xen-kit"


class _Tree:
    """A newc writer that creates each directory once, parents first."""

    def __init__(self, writer: NewcWriter) -> None:
        self.w = writer
        self.dirs: set[str] = {""}

    def mkdir(self, path: str, perm: int = 0o755) -> None:
        path = path.strip("/")
        if path in self.dirs:
            return
        self.mkdir(path.rpartition("/")[0])
        self.w.directory(path, perm)
        self.dirs.add(path)

    def file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        self.mkdir(path.rpartition("/")[0])
        self.w.file(path, data, perm)

    def symlink(self, path: str, target: str) -> None:
        self.mkdir(path.rpartition("/")[0])
        self.w.symlink(path, target)

    def copy_tree(self, root: Path) -> None:
        """Add an unpacked package tree (files, symlinks, directories)."""
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            rel_dir = "" if rel_dir == "." else rel_dir
            dirnames[:] = sorted(d for d in dirnames
                                 if not os.path.join(rel_dir, d).startswith(_SKIP_PREFIXES))
            for name in sorted(dirnames + filenames):
                rel = os.path.join(rel_dir, name)
                if rel in scripts.OVERRIDES:
                    continue  # ours, written by write_dom0_initrd
                full = Path(dirpath) / name
                st = full.lstat()
                if stat.S_ISLNK(st.st_mode):
                    self.symlink(rel, os.readlink(full))
                elif stat.S_ISDIR(st.st_mode):
                    self.mkdir(rel, stat.S_IMODE(st.st_mode))
                elif stat.S_ISREG(st.st_mode):
                    self.file(rel, full.read_bytes(), stat.S_IMODE(st.st_mode))


def write_dom0_initrd(path: Path, xen_root: Path, mods: ModuleSet, libs: dict[str, Path],
                      domu: dict[str, Path], py: tuple[Path, dict[str, Path],
                                                       dict[str, bytes]],
                      key: bytes) -> None:
    """The dom0 initramfs, with the channel's ``key`` in it: only its owner may read it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        t = _Tree(NewcWriter(f))
        for d in _DIRS:
            t.mkdir(d, 0o700 if d == "root" else 0o755)
        t.mkdir(DOM0_KEY.rpartition("/")[0], 0o700)
        t.file(DOM0_KEY, key, 0o400)
        t.w.add(Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
        t.w.add(Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)))
        t.file("bin/busybox", guestbuild.BUSYBOX.read_bytes(), 0o755)
        for applet in guestbuild._busybox_applets(guestbuild.BUSYBOX):
            if applet not in ("busybox", "init", "linuxrc"):
                t.symlink(f"bin/{applet}", "busybox")
        t.symlink("var/run", "../run")
        t.symlink("var/lock", "../run/lock")  # xenconsole (xl console) locks there
        t.copy_tree(xen_root)
        for soname, src in sorted(libs.items()):
            if not src.resolve().is_relative_to(xen_root.resolve()):
                t.file(f"lib/x86_64-linux-gnu/{soname}", src.resolve().read_bytes(), 0o755)
        t.file(f"lib64/{LOADER.name}", LOADER.resolve().read_bytes(), 0o755)
        for name in mods.order:
            t.file(f"lib/modules/{name}.ko", mods.blobs[name])
        t.file("lib/modules/load.order", "".join(f"{m}\n" for m in mods.order).encode())
        for name, src in domu.items():
            t.file(f"{DOMU_DIR}/{name}", src.read_bytes())
        python, stdlib, server = py
        t.file(f"{pybundle.PYTHON_HOME[1:]}/bin/python3", python.read_bytes(), 0o755)
        for rel, src in sorted(stdlib.items()):
            t.file(rel, src.read_bytes(), 0o755 if rel.endswith(".so") else 0o644)
        for rel, data in sorted(server.items()):
            t.file(rel, data)
        t.file("init", scripts.init_script().encode(), 0o755)
        for rel, text in sorted(scripts.OVERRIDES.items()):
            t.file(rel, text.encode(), 0o755)
        t.w.close()


def input_hash(parts: list[str]) -> str:
    h = hashlib.sha256()
    server = pybundle.server_files()
    for part in [BUILDER_VERSION, *parts, ",".join(DOM0_MODULES), scripts.init_script(),
                 *scripts.OVERRIDES.values(),
                 str(pybundle.interpreter()), *sorted(server),
                 *[d.decode() for _k, d in sorted(server.items())]]:
        h.update(part.encode() + b"\0\0")
    return h.hexdigest()[:16]


def _load(kit_dir: Path) -> XenKit | None:
    try:
        meta = json.loads((kit_dir / KIT_JSON).read_text())
        kit = XenKit(kit_dir / meta["xen"], kit_dir / meta["dom0_kernel"],
                     kit_dir / meta["dom0_initrd"], meta["version"])
    except (OSError, ValueError, KeyError):
        return None
    files = (kit.xen, kit.dom0_kernel, kit.dom0_initrd, kit.key)
    return kit if all(p.is_file() for p in files) else None


def _package_debs(cache: Path, force: bool, say: Log) -> list[Path]:
    """The .debs to unpack: from ``debs/resolved.json`` when all are present (apt-cache
    is slow: ~0.3 s a call, ~50 calls), else resolved and downloaded afresh."""
    manifest = cache / "debs" / "resolved.json"
    if not force:
        try:
            debs = [cache / "debs" / n for n in json.loads(manifest.read_text())]
        except (OSError, ValueError):
            debs = []
        if debs and all(d.is_file() for d in debs):
            return debs
    pkgs = packages.resolve_packages(packages.apt_depends, packages.host_has)
    debs = packages.download(pkgs, cache / "debs", say)
    manifest.write_text(json.dumps([d.name for d in debs]) + "\n")
    return debs


def build_xen_kit(cache_dir: Path | None = None, *, force: bool = False,
                  log: Log | None = None) -> XenKit:
    """Return the cached Xen kit, building it first when missing (or ``force``)."""
    say: Log = log or (lambda _msg: None)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    guest = guestbuild.build_kit(log=say)  # its own cache; also fetches the kernel .deb
    kdeb = kernel.cached_deb(guestbuild.default_cache_dir() / "debs")
    if kdeb is None:
        raise XenHostError("the guest kit's kernel package is missing")
    debs = _package_debs(cache, force, say)
    busybox_sha = hashlib.sha256(guestbuild.BUSYBOX.read_bytes()).hexdigest()
    key = input_hash([kdeb.name, *[d.name for d in debs], busybox_sha, guest.initrd.parent.name])
    kit_dir = cache / key
    if not force and (kit := _load(kit_dir)) is not None:
        return kit
    say(f"building xen kit {key}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache))
    try:
        xen_root, kroot, out = tmp / "xen", tmp / "kernel", tmp / "kit"
        for deb in debs:
            packages.unpack(deb, xen_root)
        kernel.unpack(kdeb, kroot)
        release = kernel.kernel_release(kroot)
        out.mkdir()
        (out / "xen").write_bytes(gzip.decompress((xen_root / XEN_GZ).read_bytes()))
        # dom0 boots the guest kit's ELF vmlinux (the same kernel, already extracted):
        # Xen then has no bzImage to decompress under TCG (~1.5 s of the host's boot)
        shutil.copyfile(guest.kernel, out / "vmlinux")
        mods = collect_modules(kroot / "lib" / "modules" / release, DOM0_MODULES)
        say(f"dom0 modules: {' '.join(mods.order)}")
        lib_dirs = [xen_root / "usr/lib/x86_64-linux-gnu", xen_root / "lib/x86_64-linux-gnu"]
        py = pybundle.bundle()
        py_bins = [py[0], *[p for p in py[1].values() if p.suffix == ".so"]]
        libs = packages.library_closure([xen_root / b for b in LDD_BINARIES] + py_bins,
                                        lib_dirs)
        for extra in EXTRA_LIBS:
            libs.setdefault(extra, HOST_LIB_DIR / extra)
        # The ELF vmlinux boots as a PV domU ~4 s faster than the bzImage under TCG.
        domu = {"vmlinux": guest.kernel, "initrd.cpio": guest.initrd}
        secret = secrets.token_hex(32).encode() + b"\n"
        write_dom0_initrd(out / "dom0.cpio", xen_root, mods, libs, domu, py, secret)
        fd = os.open(out / KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secret)
        version = debs[0].name.split("_")[1].replace("%3a", ":")
        meta = {"xen": "xen", "dom0_kernel": "vmlinux", "dom0_initrd": "dom0.cpio",
                "version": version, "kernel": release, "packages": [d.name for d in debs],
                "modules": list(mods.order), "libs": sorted(libs)}
        (out / KIT_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        if kit_dir.exists():
            kit_dir.rename(tmp / "old")
        out.rename(kit_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kit = _load(kit_dir)
    if kit is None:
        raise XenHostError(f"xen kit in {kit_dir} is incomplete", path=str(kit_dir))
    say(f"xen kit ready: {kit_dir}")
    return kit
