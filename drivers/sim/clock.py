"""A simulated clock: time moves only when the simulation says so.

It implements :class:`device.clock.Clock`, so the governor and the drivers take it in place of the system
clock and tests run hours of board time in seconds. ``sleep`` advances the clock (a single-threaded
simulation sleeping is the same as time passing); ``advance`` is the explicit form.
"""

from __future__ import annotations

import threading

EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z: wall-clock time of simulated t=0


class SimClock:
    """Monotonic and wall time that advance only through :meth:`advance` or :meth:`sleep`.

    Args:
        start: Initial monotonic reading in seconds.
        epoch: Wall-clock seconds since the Unix epoch at monotonic 0.
    """

    def __init__(self, start: float = 0.0, epoch: float = EPOCH):
        self._now = float(start)
        self._epoch = float(epoch)
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._epoch + self._now

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.advance(seconds)

    def advance(self, seconds: float) -> float:
        """Moves time forward by ``seconds`` (>= 0) and returns the new monotonic reading."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go backwards (advance by {seconds})")
        with self._lock:
            self._now += seconds
            return self._now


class ScaledClock:
    """Real time, sped up: ``factor`` simulated seconds pass per real second (for live demos).

    ``sleep`` waits the real time that corresponds to the simulated duration, so a governor stepping every
    5 simulated seconds at ``factor=60`` steps every 83 ms.
    """

    def __init__(self, factor: float, epoch: float = EPOCH):
        import time

        if factor <= 0:
            raise ValueError(f"a clock speed factor must be positive, got {factor!r}")
        self._time = time
        self.factor = float(factor)
        self._real0 = time.monotonic()
        self._epoch = float(epoch)

    def monotonic(self) -> float:
        return (self._time.monotonic() - self._real0) * self.factor

    def time(self) -> float:
        return self._epoch + self.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._time.sleep(seconds / self.factor)
