"""The credit scheduler's parameters (xm sched-credit): a weight and a cap, checked,
and what they become for Linux's CPU controller (cgroup v2 and v1). I/O-free.

- weight: a share of the CPUs relative to other domains, 1..65535; 256 by default
  (twice the weight, twice the CPU when both want it).
- cap: at most this percent of one CPU (100 = one CPU, 200 = two); 0 = no cap.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_WEIGHT = 256
MAX_WEIGHT = 65535
PERIOD_US = 100_000  # the CFS period cap quotas are counted in (cpu.max, cfs_period_us)
#: cgroup v2 cpu.weight: 1..10000, 100 by default; v1 cpu.shares: 2..262144, 1024.
V2_DEFAULT, V2_MAX = 100, 10000
V1_DEFAULT, V1_MIN, V1_MAX = 1024, 2, 262144


@dataclass(frozen=True)
class Credit:
    weight: int = DEFAULT_WEIGHT
    cap: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"weight": self.weight, "cap": self.cap}

    @classmethod
    def from_dict(cls, d: object, *, maxvcpus: int = 64) -> Credit:
        """From a record or a request: refuses anything but two integers in range."""
        if not isinstance(d, dict) or not set(d) <= {"weight", "cap"}:
            raise ValueError("sched: expected an object with weight and cap, and only them")
        c = cls(weight=d.get("weight", DEFAULT_WEIGHT), cap=d.get("cap", 0))
        c.check(maxvcpus=maxvcpus)
        return c

    def check(self, *, maxvcpus: int) -> None:
        """Raises ValueError naming the field (one line)."""
        for key in ("weight", "cap"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ValueError(f"{key}: expected an integer, got {v!r}")
        if not 1 <= self.weight <= MAX_WEIGHT:
            raise ValueError(f"weight: {self.weight} is outside 1..{MAX_WEIGHT}")
        if not 0 <= self.cap <= 100 * maxvcpus:
            raise ValueError(f"cap: {self.cap} is outside 0..{100 * maxvcpus} (percent of "
                             f"one CPU; the domain has at most {maxvcpus} vCPU(s); 0: no cap)")

    @property
    def is_default(self) -> bool:
        return self.weight == DEFAULT_WEIGHT and self.cap == 0

    # ---- Linux's CPU controller ---------------------------------------------------------
    def v2_weight(self) -> int:
        """cgroup v2 cpu.weight: 256 -> 100 (the defaults match), proportional."""
        return max(1, min(V2_MAX, round(self.weight * V2_DEFAULT / DEFAULT_WEIGHT)))

    def v2_max(self) -> str:
        """cgroup v2 cpu.max: ``QUOTA PERIOD`` or ``max PERIOD``."""
        return f"{self.quota_us()} {PERIOD_US}" if self.cap else f"max {PERIOD_US}"

    def v1_shares(self) -> int:
        """cgroup v1 cpu.shares: 256 -> 1024 (the defaults match), proportional."""
        return max(V1_MIN, min(V1_MAX, self.weight * V1_DEFAULT // DEFAULT_WEIGHT))

    def quota_us(self) -> int:
        """The CPU time allowed per period for the cap (-1: none; v1 cfs_quota_us)."""
        return self.cap * PERIOD_US // 100 if self.cap else -1
