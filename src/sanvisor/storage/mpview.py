"""How a map is shown: the `multipath -ll` lines of the seed's multipath-tools.

The engine's maps (enginemap.py) as `multipath -ll` shows them: a map, its paths
and its settings.
"""

from __future__ import annotations

from typing import Protocol

from sanvisor.storage.mpconf import Settings
from sanvisor.storage.scsi import ScsiPath


class PathView(Protocol):
    scsi: ScsiPath

    @property
    def ready(self) -> bool: ...


class MapView(Protocol):
    name: str
    wwid: str
    dm: int
    vendor: str
    model: str
    size: int
    settings: Settings

    @property
    def path_views(self) -> list[PathView]: ...

    def choose_view(self) -> PathView | None: ...


def render_ll(m: MapView) -> str:
    size = human(m.size)
    lines = [f"{m.name} ({m.wwid}) dm-{m.dm} {m.vendor},{m.model}",
             f"[size={size}][features={m.settings.features()}][hwhandler=0][rw]"]
    sel = m.settings.path_selector
    paths = m.path_views
    groups = [paths] if m.settings.path_grouping_policy == "multibus" else [[p] for p in paths]
    active = m.choose_view()
    for group in groups:
        state = "active" if any(p is active or (p.ready and len(group) > 1)
                                for p in group) else "enabled"
        lines.append(f"\\_ {sel} [prio={len(group)}][{state}]")
        for p in group:
            dm_state, check = ("active", "ready") if p.ready else ("failed", "faulty")
            lines.append(f" \\_ {p.scsi.hctl} {p.scsi.dev} 8:{p.scsi.minor:<3} "
                         f"[{dm_state}][{check}]")
    return "\n".join(lines)


def human(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return str(n)
