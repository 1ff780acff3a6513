"""Names and sizes as LVM takes them (lvm2 lib/misc/lvm-string.c, tools/lvmcmdline.c).

Names: letters, digits and ``. _ - +``, at most 127 characters, not starting with
'-', not '.' or '..'. LV names also may not start with ``snapshot`` or ``pvmove``
nor contain the suffixes lvm2 keeps for its internal LVs (``_mlog``, ``_rimage``...).
Sizes: ``-L 64``, ``64m``, ``1.5G``, ``+32M``, ``-8M`` (MiB by default; k m g t p e,
either case, are powers of 1024; s sectors, b bytes). Extents: ``-l 10``, ``+5``,
``100%FREE``, ``50%VG``, ``100%ORIGIN``, ``100%PVS``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sanvisor.errors import VolumeNameError

NAME_MAX = 127
_NAME = re.compile(r"[A-Za-z0-9._+-]+\Z")
LV_RESERVED_PREFIXES = ("pvmove", "snapshot")
LV_RESERVED_STRINGS = ("_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_wcorig", "_mimage",
                       "_mlog", "_rimage", "_rmeta", "_tdata", "_tmeta", "_vdata", "_imeta",
                       "_iorig", "_pmspare", "_vorigin")
_TAG = re.compile(r"[A-Za-z0-9._+/=!:&#-]+\Z")
_UNITS = {"b": 1, "s": 512, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "p": 1 << 50, "e": 1 << 60}
_SIZE = re.compile(r"([+-]?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([bBsSkKmMgGtTpPeE]?)\Z")
_EXTENTS = re.compile(r"([+-]?)([0-9]+)(?:%(VG|FREE|ORIGIN|PVS))?\Z", re.IGNORECASE)


def check_name(name: str, what: str) -> str:
    """A VG or PV-independent name check; the message is lvm2's."""
    if not name:
        raise VolumeNameError(f"{what} name must not be empty")
    if name.startswith("-"):
        raise VolumeNameError(f'{what} name "{name}" is invalid: it must not start with "-"')
    if name in (".", ".."):
        raise VolumeNameError(f'{what} name "{name}" is invalid')
    if not _NAME.match(name):
        raise VolumeNameError(f'{what} name "{name}" has invalid characters (allowed: '
                              "letters, digits and . _ - +)")
    if len(name) > NAME_MAX:
        raise VolumeNameError(f"{what} name is too long ({len(name)} characters; at most "
                              f"{NAME_MAX})")
    return name


def check_vg_name(name: str) -> str:
    return check_name(name, "Volume group")


def check_lv_name(name: str) -> str:
    check_name(name, "Logical volume")
    for p in LV_RESERVED_PREFIXES:
        if name.startswith(p):
            raise VolumeNameError(f'Names starting "{p}" are reserved. Please choose a '
                                  "different LV name.")
    for s in LV_RESERVED_STRINGS:
        if s in name:
            raise VolumeNameError(f'Names including "{s}" are reserved. Please choose a '
                                  "different LV name.")
    return name


def check_tag(tag: str) -> str:
    if not _TAG.match(tag) or len(tag) > 1024:
        raise VolumeNameError(f'Tag "{tag}" has invalid characters (allowed: letters, '
                              "digits and . _ + - / = ! : & #)")
    return tag


def split_vg_lv(ref: str, vg: str | None = None) -> tuple[str, str]:
    """'vg/lv', '/dev/vg/lv', '/dev/mapper/vg-lv' or 'lv' (with ``vg``) -> (vg, lv)."""
    text = ref.removeprefix("/dev/")
    if text.startswith("mapper/"):
        text = text.removeprefix("mapper/")
        m = re.match(r"((?:[^-]|--)+)-((?:[^-]|--)+)\Z", text)
        if m is None:
            raise VolumeNameError(f'"{ref}": not a /dev/mapper/VG-LV name')
        return m.group(1).replace("--", "-"), m.group(2).replace("--", "-")
    if "/" in text:
        v, _, lv = text.partition("/")
        if "/" in lv or not v or not lv:
            raise VolumeNameError(f'"{ref}": give an LV as VG/LV')
        return v, lv
    if vg is None:
        raise VolumeNameError(f'"{ref}": give the LV with its VG, as VG/LV')
    return vg, text


@dataclass(frozen=True)
class Amount:
    """A size or extent count as given: sign ('', '+' or '-') and value."""

    sign: str
    value: int  # bytes, or extents (or a percentage with ``percent_of``)
    extents: bool = False
    percent_of: str = ""  # VG, FREE, ORIGIN, PVS


def parse_size(text: str, default_unit: str = "m") -> Amount:
    m = _SIZE.match(text.strip())
    if m is None:
        raise VolumeNameError(f'Size "{text}" is invalid (e.g. 64M, 1.5G, +32M)')
    sign, number, unit = m.groups()
    size = float(number) * _UNITS[(unit or default_unit).lower()]
    value = int(size)
    if value <= 0 and sign != "-":
        raise VolumeNameError(f'Size "{text}" must be more than zero')
    return Amount(sign, value)


def parse_extents(text: str) -> Amount:
    m = _EXTENTS.match(text.strip())
    if m is None:
        raise VolumeNameError(f'Extents "{text}" are invalid (e.g. 10, +5, 100%FREE)')
    sign, number, pct = m.groups()
    value = int(number)
    if pct and not 0 < value <= (100 if pct.upper() != "ORIGIN" else 10**9):
        raise VolumeNameError(f'"{text}": a percentage must be from 1 to 100')
    return Amount(sign, value, extents=True, percent_of=(pct or "").upper())
