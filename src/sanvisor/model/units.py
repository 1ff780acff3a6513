"""Amounts as users write them, parsed exactly (no floats: 'inf', 'nan' and 1e999
are not amounts), and the rounding the hypervisors need. I/O-free."""

from __future__ import annotations

import re
from fractions import Fraction

_AMOUNT = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)
_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}
MAX_BYTES = 1 << 50  # 1 PiB: more is a typo, not a disk or a guest's memory


def align_up(value: int, step: int) -> int:
    """The smallest multiple of ``step`` that is >= ``value``."""
    return -(-value // step) * step


def _bytes(text: str, default_unit: str) -> Fraction | None:
    m = _AMOUNT.fullmatch(text)
    if not m:
        return None
    unit = (m.group(2) or default_unit).lower()
    return Fraction(m.group(1)) * (1 << _SHIFT[unit])


def parse_mib(text: str) -> int:
    """xl memory amounts: 256, 256m, 262144k, 1g, 1.5g (default unit: MiB) -> MiB.
    Raises ValueError (one line) for anything else, or a part of a MiB."""
    amount = _bytes(text, "m")
    if amount is None or amount <= 0 or amount > MAX_BYTES:
        raise ValueError(f"invalid memory amount {text!r} (e.g. 256, 256m, 1g)")
    mib = amount / (1 << 20)
    if mib.denominator != 1:
        raise ValueError(f"invalid memory amount {text!r}: not a whole number of MiB")
    return int(mib)


def parse_size(text: str, *, multiple: int = 512) -> int:
    """Disk sizes: 512M, 1G, 1.5G, 4096 (bytes by default) -> bytes, a positive
    multiple of ``multiple``. Raises ValueError (one line)."""
    amount = _bytes(text, "")
    if amount is None or amount <= 0 or amount > MAX_BYTES:
        raise ValueError(f"invalid size {text!r} (e.g. 512M, 1G)")
    if amount.denominator != 1 or int(amount) % multiple:
        raise ValueError(f"invalid size {text!r}: a positive multiple of {multiple} bytes")
    return int(amount)
