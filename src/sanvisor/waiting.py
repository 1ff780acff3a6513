"""The one way sanvisor waits: for a condition, with a deadline, saying what it waited
for when the deadline passes; and retry schedules kept as data where they are tuned.

Polling is for what gives no event to wait on (a file another process writes, a
socket another process binds, a pid that exits); everything with an event (QMP,
asyncio) waits on the event itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from sanvisor.errors import TimeoutError_

T = TypeVar("T")


def wait_until(what: str, predicate: Callable[[], T | None], timeout: float,
               interval: float = 0.05) -> T:
    """Call ``predicate`` until it returns something truthy (returned), every
    ``interval`` seconds; TimeoutError_ naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError_(f"{what}: not within {timeout:g}s", timeout=timeout)
        time.sleep(min(interval, left))


async def wait_until_async(what: str, predicate: Callable[[], Awaitable[T | None]],
                           timeout: float, interval: float = 0.05) -> T:
    """:func:`wait_until` for the event loop (``predicate`` is a coroutine function)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError_(f"{what}: not within {timeout:g}s", timeout=timeout)
        await asyncio.sleep(min(interval, left))


@dataclass(frozen=True)
class Retry:
    """A retry schedule: ``attempts`` tries, ``delay`` seconds before the second, each
    next delay ``backoff`` times the last (capped at ``max_delay``)."""

    attempts: int
    delay: float
    backoff: float = 1.0
    max_delay: float = 60.0

    def delays(self) -> Iterator[float]:
        """The pause before each attempt after the first."""
        d = self.delay
        for _ in range(self.attempts - 1):
            yield d
            d = min(d * self.backoff, self.max_delay)
