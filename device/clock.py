"""The clock seam: everything that waits or timestamps takes a clock, so simulations can run hours of
board time in seconds (the virtual board's simulated clock implements the same interface)."""

from __future__ import annotations

import time
from typing import Protocol


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
