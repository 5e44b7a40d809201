"""Digital inputs: a trigger (PIR sensor or wake button) and a power-good / low-battery signal.

:class:`TriggerInput` turns a debounced rising edge into a call ``on_trigger(timestamp)``. Debouncing waits
for the line to settle: after the last edge of a burst, the line must stay unchanged for ``debounce_s``; if
it settled high, the burst was a press (or a PIR firing) and the callback gets the time of the burst's first
rising edge. Contact bounce on press and on release, and spikes shorter than ``debounce_s``, therefore
trigger nothing extra. Edges carry their own timestamps, so a late :meth:`TriggerInput.check` (a loop that
looks once a second) still debounces correctly. :meth:`TriggerInput.start` runs the same processing on a
thread that blocks on the line's edge wait until an edge comes or a pending burst is due to settle; stop()
ends the wait with :meth:`drivers.gpio.InputLine.wake`. A backend that cannot be woken is waited on at most
:data:`SLICE_S` at a time instead.

:class:`PowerGoodInput` reads a level that says whether the supply is fine: a UPS HAT's low-battery pin or a
PMIC's power-good output. Both take any backend's lines, so the virtual board drives them through the
simulated backend.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable

from device.clock import SYSTEM_CLOCK, Clock
from drivers.errors import GpioError
from drivers.gpio import Edge, EdgeEvent, InputLine

log = logging.getLogger(__name__)

SLICE_S = 0.1  # the longest wait on a line that cannot be woken: how fast the thread notices stop()
IDLE_S = 3600.0  # the longest wait on a line that can be woken (a wait needs a finite timeout)
_EPS = 1e-9  # float slack: 100.05 - 100.0 is a hair under 0.05, and that still counts as settled


class TriggerInput:
    """Calls ``on_trigger`` once per debounced rising edge.

    Args:
        line: The input (request it with the pull the wiring needs, e.g. ``Pull.DOWN`` for a button to 3V3).
        on_trigger: Called with the wall-clock time (seconds since the epoch, on ``clock``) of the trigger.
            Exceptions from it are logged and counted, never raised into the input's loop.
        debounce_s: How long the line must stay unchanged to count; 0 triggers on every rising edge.
        clock: Stamps triggers and paces :meth:`check` when no time is given.

    Raises:
        ValueError: ``debounce_s`` is negative or not a number.

    Attributes:
        triggers: How many times ``on_trigger`` was called.
        callback_errors: How many of those calls raised.
    """

    def __init__(
        self,
        line: InputLine,
        on_trigger: Callable[[float], None],
        debounce_s: float = 0.05,
        clock: Clock = SYSTEM_CLOCK,
    ):
        if isinstance(debounce_s, bool) or not isinstance(debounce_s, (int, float)) or not debounce_s >= 0:
            raise ValueError(f"debounce_s must be a number of seconds >= 0, got {debounce_s!r}")
        self._line = line
        self._on_trigger = on_trigger
        self.debounce_s = float(debounce_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._last_edge: Edge | None = None
        self._last_t = 0.0
        self._burst_rise: float | None = None  # first rising edge of the burst not yet settled
        self.triggers = 0
        self.callback_errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self, now: float | None = None) -> int:
        """Processes the edges that arrived since the last call and fires settled triggers.

        Args:
            now: Monotonic seconds; the clock's reading when ``None``.

        Returns:
            How many triggers fired.

        Raises:
            GpioError: Reading the line failed.
        """
        events = self._line.poll()
        return self._handle(events, self._clock.monotonic() if now is None else now)

    def _handle(self, events: Iterable[EdgeEvent], now: float) -> int:
        fired: list[float] = []
        with self._lock:
            for event in events:
                self._settle(event.timestamp, fired)
                if self._last_edge is None or event.timestamp - self._last_t >= self.debounce_s - _EPS:
                    self._burst_rise = None  # quiet long enough before this edge: a new burst starts
                if event.edge is Edge.RISING and self._burst_rise is None:
                    self._burst_rise = event.timestamp
                self._last_edge, self._last_t = event.edge, event.timestamp
                if self.debounce_s == 0:
                    self._settle(event.timestamp, fired)
            self._settle(now, fired)
        offset = self._clock.time() - self._clock.monotonic()  # monotonic edge time -> wall-clock time
        for stamp in fired:
            self._fire(stamp + offset)
        return len(fired)

    def _settle(self, now: float, fired: list[float]) -> None:
        # With the lock held: a burst that ended high and stayed so for debounce_s is a trigger.
        if (
            self._burst_rise is not None
            and self._last_edge is Edge.RISING
            and now - self._last_t >= self.debounce_s - _EPS
        ):
            fired.append(self._burst_rise)
            self._burst_rise = None

    def _fire(self, stamp: float) -> None:
        self.triggers += 1
        try:
            self._on_trigger(stamp)
        except Exception:  # the callback belongs to someone else; the input must keep working
            self.callback_errors += 1
            log.exception("trigger callback failed")

    def _due(self) -> float | None:
        # When the pending burst settles (monotonic seconds), if one is pending.
        with self._lock:
            if self._burst_rise is None or self._last_edge is not Edge.RISING:
                return None
            return self._last_t + self.debounce_s

    def start(self) -> None:
        """Starts a thread that waits for edges and fires triggers (a second call while running does nothing)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fieldnode-trigger", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stops the thread.

        Args:
            timeout: How long to wait for it to end.
        """
        self._stop.set()
        self._line.wake()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether the thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        last_error = ""
        while not self._stop.is_set():
            # Edges carry their own timestamps, so the wait only has to end for a burst due to settle (or stop).
            wait = IDLE_S if self._line.can_wake else SLICE_S
            due = self._due()
            if due is not None:
                wait = min(wait, max(due - self._clock.monotonic(), 0.0))
            try:
                first = self._line.wait_event(wait)
                events = ([first] if first is not None else []) + self._line.poll()
            except GpioError as exc:
                if str(exc) != last_error:
                    last_error = str(exc)
                    log.warning("trigger input: %s", exc)
                self._clock.sleep(SLICE_S)
                continue
            self._handle(events, self._clock.monotonic())


class PowerGoodInput:
    """A pin that says whether the supply is fine.

    Args:
        line: The input; request it with ``Pull.UP`` for the usual open-drain alert output.
        active_low: ``True`` (the default) when the pin is pulled low on trouble: a UPS HAT's low-battery
            alert or a PMIC's power-good that drops when the supply fails. ``False`` when the pin goes high
            on trouble.
    """

    def __init__(self, line: InputLine, active_low: bool = True):
        self._line = line
        self.active_low = bool(active_low)

    @property
    def power_good(self) -> bool:
        """``True`` while the supply is fine.

        Raises:
            GpioError: Reading the line failed.
        """
        level = self._line.value
        return level if self.active_low else not level

    @property
    def fault(self) -> bool:
        """``True`` while the supply is in trouble (the opposite of :attr:`power_good`)."""
        return not self.power_good


__all__ = ["PowerGoodInput", "TriggerInput"]
