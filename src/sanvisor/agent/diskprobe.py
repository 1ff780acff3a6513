"""Recognise disk image formats that are not raw, so that a ``file:`` image is never
handed to a guest as raw when it is a qcow2 (or another container) file.

Refused, not opened in that format: choosing the format from bytes a guest can write
is QEMU's old format-probing hole (a raw disk whose guest wrote a qcow2 header would
come back as a qcow2 with a backing file of the guest's choosing on the host).
"""

from __future__ import annotations

from pathlib import Path

#: (offset, magic, format): the header magics of the image formats QEMU knows.
_MAGICS: tuple[tuple[int, bytes, str], ...] = (
    (0, b"QFI\xfb", "qcow2"),  # qcow (version 1) and qcow2 share it
    (0, b"QED\x00", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),  # a dynamic VHD's header copy (a fixed VHD is raw + footer)
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),
)
_HEAD = max(off + len(magic) for off, magic, _ in _MAGICS)


def image_format(head: bytes) -> str | None:
    """The container format whose header ``head`` (an image's first bytes) starts with,
    or None for raw (anything else)."""
    for off, magic, fmt in _MAGICS:
        if head[off:off + len(magic)] == magic:
            if fmt == "qcow2" and head[4:8] == b"\x00\x00\x00\x01":
                return "qcow"
            return fmt
    return None


def probe_file(path: Path) -> str | None:
    """The format of the image file at ``path`` (None: raw, or unreadable: the
    caller's other checks or QEMU will say why)."""
    try:
        with path.open("rb") as f:
            return image_format(f.read(_HEAD))
    except OSError:
        return None
