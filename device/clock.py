"""The clock seam: everything that waits or timestamps takes a clock, so simulations can run hours of
board time in seconds (the virtual board's simulated clock implements the same interface)."""

from __future__ import annotations

import random
import time
from typing import Protocol

_MAX_DOUBLINGS = 30  # 2**30 times any sane minimum is far past any cap; and no float overflow


class Clock(Protocol):
    """What the agent needs from time."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary start; never goes backwards."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch (for timestamps only, never for intervals)."""

    def sleep(self, seconds: float) -> None:
        """Waits ``seconds``."""


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


def backoff_delay(attempt: int, lo: float, hi: float, rng: random.Random) -> float:
    """The wait before a retry: exponential backoff with "equal jitter".

    The nominal delay doubles from ``lo`` with each attempt up to ``hi``; the wait is drawn uniformly from its upper
    half, so a retry never comes much sooner than planned, and a fleet that lost power together spreads out.

    Args:
        attempt: Failed attempts so far minus one (0 for the first retry); a negative value counts as 0.
        lo: The first nominal delay in seconds.
        hi: The largest nominal delay in seconds.
        rng: The randomness (seed it for reproducible tests).

    Returns:
        Seconds to wait, between ``min(hi, lo * 2**attempt) / 2`` and ``min(hi, lo * 2**attempt)``.
    """
    delay = min(hi, lo * 2.0 ** min(max(attempt, 0), _MAX_DOUBLINGS))
    return rng.uniform(delay / 2.0, delay)
