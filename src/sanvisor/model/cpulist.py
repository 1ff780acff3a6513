"""Host CPU lists as xm and xl write them: ``0-3,^2``, ``1,3``, ``all``. I/O-free.

Terms are read left to right: ``N`` or ``N-M`` adds CPUs, ``^N`` or ``^N-M`` takes
them away again, ``all`` adds every CPU of the host. ``0-3,^2`` is {0, 1, 3}. A
list that ends up empty, or names a CPU the host does not have, is refused in one
line naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: No host has more (a range such as 0-999999999 must not build a huge set).
MAX_CPUS = 4096
_TERM = re.compile(r"^(\^?)(\d{1,5})(?:-(\d{1,5}))?\Z")


def parse_cpus(text: str, ncpus: int, *, what: str = "cpus") -> frozenset[int]:
    """The set of host CPUs ``text`` names, on a host of ``ncpus`` CPUs (0..ncpus-1).
    Raises ValueError with a one-line message starting with ``what``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{what}: empty CPU list")
    chosen: set[int] = set()
    for raw in text.split(","):
        term = raw.strip()
        if term in ("all", "any"):
            chosen.update(range(ncpus))
            continue
        m = _TERM.match(term)
        if m is None:
            raise ValueError(f"{what}: {term!r} is not a CPU, a range N-M or ^N "
                             f"(in {text!r})")
        lo = int(m.group(2))
        hi = int(m.group(3)) if m.group(3) is not None else lo
        if hi < lo:
            raise ValueError(f"{what}: range {term!r} goes backwards")
        if hi >= MAX_CPUS:
            raise ValueError(f"{what}: CPU {hi} is out of range (0..{MAX_CPUS - 1})")
        if m.group(1):
            chosen.difference_update(range(lo, hi + 1))
            continue
        if hi >= ncpus:
            raise ValueError(f"{what}: CPU {hi} does not exist on this host (it has "
                             f"{ncpus}: {format_cpus(range(ncpus))})")
        chosen.update(range(lo, hi + 1))
    if not chosen:
        raise ValueError(f"{what}: {text!r} leaves no CPU")
    return frozenset(chosen)


def format_cpus(cpus: Iterable[int]) -> str:
    """The shortest list: ``{0, 1, 2, 5}`` -> ``0-2,5``; empty -> ``""``."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def affinity_text(cpus: Iterable[int], ncpus: int) -> str:
    """xm vcpu-list's CPU Affinity column: ``any cpu`` when every CPU is allowed."""
    got = set(cpus)
    return "any cpu" if got >= set(range(ncpus)) else format_cpus(got)
