"""Live migration as data: the convergence policy (a schedule, VDSM's idea: tuned
here, not buried in code) and the report a migration ends with. I/O-free."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ConvergencePolicy:
    """How a live pre-copy is made to converge, and when it is given up.

    Measured here (QEMU 7.2, TCG, PLATFORM.md): an idle 128 MiB guest moves in ~0.2 s
    with 2-5 ms of downtime at a 50 ms limit, bandwidth uncapped; a guest rewriting
    32 MiB at ~270 MiB/s never converges at QEMU's default 128 MiB/s cap, and
    post-copy finishes it in ~1.1 s with ~2 ms of downtime; auto-converge took 8-12 s
    and once in six runs delivered a corrupted guest: never used."""

    bandwidth_mib_s: int = 0  # 0: uncapped (QEMU's own default caps it at 128 MiB/s)
    downtime_steps_ms: tuple[int, ...] = (50, 100, 200, 400)  # the pause allowed
    step_every_s: float = 1.0  # raise the allowed pause after this long unconverged
    postcopy_after_s: float | None = 4.0  # then switch to post-copy (None: never)
    abort_after_s: float = 120.0  # give up: the guest runs on where it was

    def downtime_at(self, elapsed: float) -> int:
        step = min(int(elapsed / self.step_every_s), len(self.downtime_steps_ms) - 1)
        return self.downtime_steps_ms[max(step, 0)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ConvergencePolicy:
        """A policy from a request; ValueError (one line) for what is not one."""
        if not data:
            return cls()
        d = dict(data)
        unknown = set(d) - {"bandwidth_mib_s", "downtime_steps_ms", "step_every_s",
                            "postcopy_after_s", "abort_after_s"}
        if unknown:
            raise ValueError(f"unknown policy settings: {', '.join(sorted(unknown))}")
        try:
            policy = cls(
                bandwidth_mib_s=int(d.get("bandwidth_mib_s", 0)),
                downtime_steps_ms=tuple(int(x) for x in d.get("downtime_steps_ms",
                                                               (50, 100, 200, 400))),
                step_every_s=float(d.get("step_every_s", 1.0)),
                postcopy_after_s=(None if d.get("postcopy_after_s", 4.0) is None
                                  else float(d.get("postcopy_after_s", 4.0))),
                abort_after_s=float(d.get("abort_after_s", 120.0)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"malformed migration policy: {exc}") from None
        numbers = [policy.step_every_s, policy.abort_after_s, policy.postcopy_after_s or 0.0]
        if (policy.bandwidth_mib_s < 0 or not policy.downtime_steps_ms
                or any(x <= 0 for x in policy.downtime_steps_ms)
                or any(not 0 <= x < 1e6 for x in numbers) or policy.step_every_s <= 0):
            raise ValueError("malformed migration policy: values out of range")
        return policy


@dataclass
class MigrationReport:
    """What a migration did, as `migrate` prints it (and --json)."""

    live: bool
    status: str = "pending"  # pending | active | postcopy-active | completed | failed
    total_ms: float = 0.0
    downtime_ms: float = 0.0  # the guest stopped (the hypervisor's own measure)
    setup_ms: float = 0.0
    transferred_bytes: int = 0
    remaining_bytes: int = 0
    total_bytes: int = 0
    passes: int = 0  # memory passes (dirty-sync rounds)
    mbps: float = 0.0
    postcopy: bool = False
    policy: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
