"""The guest kit: a tiny Linux guest (Debian kernel as a PVH ELF + busybox initramfs)."""

from sanvisor.guestkit.build import GuestKit, build_kit, default_cache_dir

__all__ = ["GuestKit", "build_kit", "default_cache_dir"]
