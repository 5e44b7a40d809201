"""The status LED: one pin, blink codes a technician can read without a laptop.

Workflow: parts of the agent raise and clear conditions (``led.raise_code(LedCode.NO_BROKER)`` when the link
drops, ``led.clear_code(...)`` when it is back). Several can be active; the LED shows the most severe one by
the fixed order of :data:`PRIORITY`, and the slow OK heartbeat when none is. :meth:`StatusLed.tick` drives the
pin from the clock: it finds where in the shown code's cycle "now" falls and sets the level, so a test with
:class:`drivers.sim.clock.SimClock` advances the clock, ticks, and reads the simulated pin's recorded states.
:meth:`StatusLed.start` runs the same ticks on a small thread for real use. On the system clock that thread sleeps
until the pattern's next change (a blink's edges; never, for a level that does not change) and is woken at once
when the shown code changes or the LED stops; under a simulated clock, whose sleep is the passage of time, it
sleeps at most :data:`SLICE_S` at a time.

A newly shown code starts its cycle from the beginning, so the technician always sees a whole pattern.
``docs/led-codes.md`` is the printed table; it is generated from :func:`pattern` with :func:`draw`.
"""

from __future__ import annotations

import enum
import logging
import math
import threading

from device.clock import SYSTEM_CLOCK, Clock, SystemClock
from drivers.errors import GpioError
from drivers.gpio import OutputLine

log = logging.getLogger(__name__)

BLINK_ON_S = 0.4  # one counted blink
BLINK_GAP_S = 0.4  # dark between blinks of a group
BLINK_PAUSE_S = 1.6  # dark after a group, so groups can be counted
SLICE_S = 0.05  # the ticking thread's longest sleep under a simulated clock: how fast it sees a new code
_EPS = 1e-9  # a tick landing within a nanosecond of a boundary belongs to the next segment


class LedCode(enum.Enum):
    """What the LED can show. Patterns repeat; see :func:`pattern` for the exact timings.

    Attributes:
        OFF: Dark. Shown after :meth:`StatusLed.stop` (agent not running).
        OK: Slow heartbeat, on 100 ms every 2 s: running, nothing wrong.
        STARTING: Fast blink, 5 Hz: the agent is starting (config, model, first connection).
        NO_BROKER: 1 blink then a pause: the MQTT broker cannot be reached (past the agent's grace) or stopped
            acknowledging.
        SENSOR_FAULT: 2 blinks: the sensor does not answer or sends bad frames.
        RUNTIME_FAULT: 3 blinks: the model was quarantined, the inference worker keeps crashing, or it is hung.
        POWER_CRITICAL: 4 blinks: temperature or battery critical; the governor is shedding load.
        UPDATING: Fast flicker, 10 Hz: a model or agent update is being installed; do not cut power.
    """

    OFF = "off"
    OK = "ok"
    STARTING = "starting"
    NO_BROKER = "no_broker"
    SENSOR_FAULT = "sensor_fault"
    RUNTIME_FAULT = "runtime_fault"
    POWER_CRITICAL = "power_critical"
    UPDATING = "updating"


# Most severe first. POWER_CRITICAL wins because the board may shut down any moment. UPDATING comes next:
# "do not cut power" is the one thing a technician on site must not miss, and a fault seen during an update
# is shown again as soon as the update ends. OK is what shows when nothing here is active.
PRIORITY: tuple[LedCode, ...] = (
    LedCode.POWER_CRITICAL,
    LedCode.UPDATING,
    LedCode.RUNTIME_FAULT,
    LedCode.SENSOR_FAULT,
    LedCode.NO_BROKER,
    LedCode.STARTING,
)


def _blinks(count: int) -> tuple[tuple[bool, float], ...]:
    steps: list[tuple[bool, float]] = []
    for i in range(count):
        steps.append((True, BLINK_ON_S))
        steps.append((False, BLINK_GAP_S if i < count - 1 else BLINK_PAUSE_S))
    return tuple(steps)


_PATTERNS: dict[LedCode, tuple[tuple[bool, float], ...]] = {
    LedCode.OFF: ((False, 1.0),),
    LedCode.OK: ((True, 0.1), (False, 1.9)),
    LedCode.STARTING: ((True, 0.1), (False, 0.1)),
    LedCode.NO_BROKER: _blinks(1),
    LedCode.SENSOR_FAULT: _blinks(2),
    LedCode.RUNTIME_FAULT: _blinks(3),
    LedCode.POWER_CRITICAL: _blinks(4),
    LedCode.UPDATING: ((True, 0.05), (False, 0.05)),
}


def pattern(code: LedCode) -> tuple[tuple[bool, float], ...]:
    """One cycle of a code's pattern.

    Args:
        code: The code.

    Returns:
        ``((level, seconds), ...)``; the cycle repeats.

    Raises:
        ValueError: ``code`` is not a :class:`LedCode`.
    """
    if not isinstance(code, LedCode):
        raise ValueError(f"not an LED code: {code!r}")
    return _PATTERNS[code]


def cycle_s(code: LedCode) -> float:
    """The length of one cycle of ``code``'s pattern in seconds."""
    return sum(duration for _, duration in pattern(code))


def draw(code: LedCode, step: float = 0.1, span: float = 2.0) -> str:
    """Draws a code as text for people: ``█`` lit, ``▁`` dark, ``▒`` flickering within the step.

    Args:
        code: The code to draw.
        step: Seconds per character.
        span: The drawing repeats the cycle until it covers at least this long.

    Returns:
        The drawing of whole cycles.
    """
    steps = pattern(code)
    cycles = max(1, math.ceil(span / cycle_s(code) - _EPS))
    total = cycles * cycle_s(code)
    out = []
    for i in range(round(total / step)):
        t0, t1 = i * step, (i + 1) * step
        levels = set()
        start = 0.0
        for _ in range(cycles):
            for level, duration in steps:
                end = start + duration
                if start < t1 - _EPS and end > t0 + _EPS:
                    levels.add(level)
                start = end
        out.append("▒" if len(levels) > 1 else ("█" if True in levels else "▁"))
    return "".join(out)


class StatusLed:
    """Shows the most severe active code on an output line.

    Args:
        line: The LED's output line; ``None`` for a board without a status LED (every call still works,
            nothing is driven).
        clock: Paces the pattern.
    """

    def __init__(self, line: OutputLine | None, clock: Clock = SYSTEM_CLOCK):
        self._line = line
        self._clock = clock
        self._lock = threading.Lock()
        self._active: set[LedCode] = set()
        self._shown: LedCode | None = None
        self._since = 0.0
        self._written: bool | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # the shown code changed, or stop(): the thread ticks now
        self._thread: threading.Thread | None = None
        self._last_error = ""

    @property
    def wired(self) -> bool:
        """An LED line is attached (without one the codes are still tracked, for status, but nothing blinks)."""
        return self._line is not None

    def raise_code(self, code: LedCode) -> None:
        """Marks a condition active (raising it again is harmless).

        Raises:
            ValueError: ``code`` is ``OK``/``OFF`` (those are what shows when nothing is raised) or not a code.
        """
        self._check(code)
        with self._lock:
            before = self._winner()
            self._active.add(code)
            if self._winner() is not before:
                self._wake.set()

    def clear_code(self, code: LedCode) -> None:
        """Marks a condition over (clearing one that is not active is harmless).

        Raises:
            ValueError: ``code`` is ``OK``/``OFF`` or not a code.
        """
        self._check(code)
        with self._lock:
            before = self._winner()
            self._active.discard(code)
            if self._winner() is not before:
                self._wake.set()

    @staticmethod
    def _check(code: object) -> None:
        if not isinstance(code, LedCode) or code not in PRIORITY:
            allowed = ", ".join(c.name for c in PRIORITY)
            raise ValueError(f"only conditions can be raised or cleared ({allowed}), got {code!r}")

    @property
    def active(self) -> frozenset[LedCode]:
        """The conditions currently raised."""
        with self._lock:
            return frozenset(self._active)

    @property
    def code(self) -> LedCode:
        """The code that wins now: the most severe active one, ``OK`` when none."""
        with self._lock:
            return self._winner()

    def _winner(self) -> LedCode:
        for code in PRIORITY:
            if code in self._active:
                return code
        return LedCode.OK

    def tick(self, now: float | None = None) -> float:
        """Sets the LED to where the shown pattern is at ``now``.

        Args:
            now: Monotonic seconds; the clock's reading when ``None``.

        Returns:
            Seconds until the level next changes (when the next tick is due); ``math.inf`` for a pattern that
            never changes level.

        Raises:
            GpioError: Driving the line failed.
        """
        if now is None:
            now = self._clock.monotonic()
        with self._lock:
            code = self._winner()
            if code is not self._shown:
                self._shown, self._since = code, now
            level, delay = self._position(code, now - self._since)
            changed = level != self._written
            self._written = level
        if changed and self._line is not None:
            try:
                self._line.value = level
            except GpioError:
                with self._lock:
                    self._written = None  # unknown: write again on the next tick
                raise
        return delay

    @staticmethod
    def _position(code: LedCode, elapsed: float) -> tuple[bool, float]:
        steps = pattern(code)
        if all(level == steps[0][0] for level, _ in steps):
            return steps[0][0], math.inf  # a steady level: no tick is ever due
        cycle = sum(duration for _, duration in steps)
        pos = (max(elapsed, 0.0) % cycle) + _EPS
        edge = 0.0
        for level, duration in steps:
            edge += duration
            if pos < edge:
                return level, max(edge - pos + _EPS, 0.0)
        return steps[0][0], steps[0][1]  # only reached through rounding at the very end of the cycle

    def start(self) -> None:
        """Starts the ticking thread (a second call while running does nothing)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._wake.clear()
        self._thread = threading.Thread(target=self._run, name="fieldnode-led", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stops the thread and switches the LED off (dark means the agent is not running).

        Args:
            timeout: How long to wait for the thread to end.
        """
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        with self._lock:
            self._shown = LedCode.OFF
            self._written = False
        if self._line is not None:
            try:
                self._line.value = False
            except GpioError as exc:
                log.warning("status LED: cannot switch off: %s", exc)

    @property
    def running(self) -> bool:
        """Whether the ticking thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        realtime = isinstance(self._clock, SystemClock)
        while not self._stop.is_set():
            self._wake.clear()  # before the tick: a code raised from now on ends the coming sleep
            try:
                delay = self.tick()
            except GpioError as exc:
                # A broken LED must not take the agent down; say it once per distinct problem.
                if str(exc) != self._last_error:
                    self._last_error = str(exc)
                    log.warning("status LED: %s", exc)
                delay = 1.0
            if realtime:
                self._wake.wait(None if math.isinf(delay) else delay)
            else:
                self._clock.sleep(min(delay, SLICE_S))  # a simulated clock's sleep is time passing


__all__ = ["BLINK_GAP_S", "BLINK_ON_S", "BLINK_PAUSE_S", "PRIORITY", "LedCode", "StatusLed", "cycle_s", "draw", "pattern"]
