"""The simulated GPIO backend: a board whose pins live in memory.

It is a shipped backend (``FIELDNODE_GPIO=sim`` or ``--sim``), used by the virtual board and by tests, not a
mock: the LED, trigger and power-good drivers run through it exactly as through libgpiod.

Outputs record every level change with the clock's ``monotonic`` timestamp (:meth:`SimPinFactory.states`,
:meth:`SimPinFactory.assert_states`), starting with the initial level when the line is requested. Inputs
read a level that the outside world sets with :meth:`SimPinFactory.drive_high` / :meth:`drive_low`; each
change queues an edge for ``wait_edge``/``poll``, as the kernel would. An undriven input reads its pull
(``Pull.UP`` high, otherwise low).

Waiting goes through the clock: with :class:`drivers.sim.clock.SimClock` a wait that sees no edge advances
simulated time by the timeout and returns at once, so tests drive the pin first and then wait. On the system
clock a wait blocks until an edge is driven, its timeout passes or :meth:`SimInputLine.wake` is called.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Sequence

from device.clock import SYSTEM_CLOCK, Clock, SystemClock
from drivers.errors import GpioError
from drivers.gpio import Edge, EdgeEvent, InputLine, OutputLine, PinFactory, Pull, check_pin, check_pull

STEP_S = 0.01  # how often a wait on a clock other than the system's looks for a newly driven edge
MAX_PENDING = 1024  # like the kernel's event buffer: edges nobody reads are dropped, oldest first


class SimOutputLine(OutputLine):
    """An output of the simulated board; level changes are recorded by the factory."""

    def __init__(self, factory: SimPinFactory, pin: int, initial: bool):
        super().__init__(pin)
        self._factory = factory
        self._value = initial

    def _get(self) -> bool:
        return self._value

    def _set(self, value: bool) -> None:
        if value != self._value:
            self._value = value
            self._factory._record(self.pin, value)

    def _release(self) -> None:
        self._factory._forget(self)


class SimInputLine(InputLine):
    """An input of the simulated board; edges come from :meth:`SimPinFactory.drive_high`/``drive_low``.

    Attributes:
        pull: The bias it was requested with.
        dropped: Edges lost because more than ``MAX_PENDING`` were waiting unread.
    """

    can_wake = True

    def __init__(self, factory: SimPinFactory, pin: int, pull: Pull):
        super().__init__(pin)
        self._factory = factory
        self.pull = pull
        self.dropped = 0
        self._events: deque[EdgeEvent] = deque()
        self._woken = False
        self._changed = threading.Condition(factory._lock)  # an edge was driven, or wake()

    def _push(self, event: EdgeEvent) -> None:
        # Called with the factory lock held.
        if len(self._events) >= MAX_PENDING:
            self._events.popleft()
            self.dropped += 1
        self._events.append(event)
        self._changed.notify_all()

    def _wake(self) -> None:
        with self._changed:
            self._woken = True
            self._changed.notify_all()

    def _take(self) -> EdgeEvent | None:
        # With the factory lock held: the next edge, or None (and the wake-up used up) when woken.
        if self._events:
            return self._events.popleft()
        self._woken = False
        return None

    def _get(self) -> bool:
        return self._factory.level(self.pin)

    def _wait(self, timeout: float) -> EdgeEvent | None:
        clock = self._factory.clock
        if isinstance(clock, SystemClock):
            with self._changed:
                self._changed.wait_for(lambda: self._events or self._woken, timeout)
                return self._take()
        deadline = clock.monotonic() + timeout
        while True:
            with self._factory._lock:
                if self._events or self._woken:
                    return self._take()
            remaining = deadline - clock.monotonic()
            if remaining <= 0:
                return None
            # Sleeping on the clock is what lets a SimClock simulation fast-forward through the wait.
            clock.sleep(min(remaining, self._factory.step_s))

    def _poll(self) -> list[EdgeEvent]:
        with self._factory._lock:
            events = list(self._events)
            self._events.clear()
        return events

    def _release(self) -> None:
        self._factory._forget(self)


class SimPinFactory(PinFactory):
    """The simulated board's pins.

    Args:
        clock: Timestamps recorded states and edges; waits sleep on it.
        step_s: How often a wait looks for a new edge (matters only with a real clock).
    """

    name = "sim"

    def __init__(self, clock: Clock = SYSTEM_CLOCK, *, step_s: float = STEP_S):
        super().__init__()
        if not step_s > 0:
            raise GpioError(f"step_s must be > 0 seconds, got {step_s!r}")
        self.clock = clock
        self.step_s = float(step_s)
        self._states: dict[int, list[tuple[float, bool]]] = {}
        self._levels: dict[int, bool] = {}

    def output(self, pin: int, initial: bool = False) -> SimOutputLine:
        """Requests ``pin`` as an output; records ``(now, initial)`` as its first state.

        Raises:
            GpioError: The pin is invalid or already requested.
        """
        pin = check_pin(pin)
        with self._lock:
            self._check_free(pin)
            line = SimOutputLine(self, pin, bool(initial))
            self._lines[pin] = line
            self._record(pin, bool(initial))
        return line

    def input(self, pin: int, pull: Pull = Pull.NONE) -> SimInputLine:
        """Requests ``pin`` as an input; it reads the driven level, or its pull when undriven.

        Raises:
            GpioError: The pin or pull is invalid, or the pin is already requested.
        """
        pin = check_pin(pin)
        pull = check_pull(pull)
        with self._lock:
            self._check_free(pin)
            line = SimInputLine(self, pin, pull)
            self._lines[pin] = line
        return line

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(chip="sim", version=None)
        return info

    # -- the outside world -------------------------------------------------------------------------------

    def drive_high(self, pin: int) -> None:
        """Pulls ``pin`` high from outside (a PIR firing, a button pressed against a pull-down).

        Raises:
            GpioError: The pin is invalid or is an output of the agent.
        """
        self._drive(pin, True)

    def drive_low(self, pin: int) -> None:
        """Pulls ``pin`` low from outside.

        Raises:
            GpioError: The pin is invalid or is an output of the agent.
        """
        self._drive(pin, False)

    def level(self, pin: int) -> bool:
        """The level ``pin`` has: driven from outside, else by the agent, else its input pull (low if none)."""
        pin = check_pin(pin)
        with self._lock:
            line = self._lines.get(pin)
            if isinstance(line, SimOutputLine):
                return line._value
            if pin in self._levels:
                return self._levels[pin]
            return isinstance(line, SimInputLine) and line.pull is Pull.UP

    # -- inspection --------------------------------------------------------------------------------------

    def states(self, pin: int) -> list[tuple[float, bool]]:
        """Every level ``pin`` was driven to as an output, as ``(monotonic time, level)``, oldest first."""
        with self._lock:
            return list(self._states.get(check_pin(pin), ()))

    def assert_states(self, pin: int, values: Sequence[bool]) -> None:
        """Checks the recorded levels of ``pin`` (timestamps ignored).

        Raises:
            AssertionError: The recorded levels differ; the message shows both sequences.
        """
        got = [value for _, value in self.states(pin)]
        want = [bool(v) for v in values]
        if got != want:
            raise AssertionError(f"pin {pin}: expected states {want}, recorded {got}")

    def in_use(self) -> dict[int, str]:
        """The requested pins: ``{pin: "output" | "input"}``."""
        with self._lock:
            return {p: "output" if isinstance(l, SimOutputLine) else "input" for p, l in sorted(self._lines.items())}

    # -- internals ---------------------------------------------------------------------------------------

    def _check_free(self, pin: int) -> None:
        line = self._lines.get(pin)
        if line is not None:
            kind = "an output" if isinstance(line, SimOutputLine) else "an input"
            raise GpioError(f"pin {pin} is already in use (requested as {kind})")

    def _record(self, pin: int, value: bool) -> None:
        with self._lock:
            self._states.setdefault(pin, []).append((self.clock.monotonic(), value))

    def _forget(self, line: SimOutputLine | SimInputLine) -> None:
        with self._lock:
            if self._lines.get(line.pin) is line:
                del self._lines[line.pin]

    def _drive(self, pin: int, level: bool) -> None:
        pin = check_pin(pin)
        with self._lock:
            line = self._lines.get(pin)
            if isinstance(line, SimOutputLine):
                raise GpioError(f"pin {pin} is an output of the agent; the simulation cannot drive it from outside")
            before = self.level(pin)
            self._levels[pin] = level
            if isinstance(line, SimInputLine) and before != level:
                line._push(EdgeEvent(Edge.RISING if level else Edge.FALLING, self.clock.monotonic()))


__all__ = ["SimInputLine", "SimOutputLine", "SimPinFactory"]


def open_factory(chip_label: str = "", clock: Clock = SYSTEM_CLOCK) -> SimPinFactory:
    """The seam's entry point (:data:`drivers.gpio.BACKENDS`); the simulated board has no chip to choose."""
    return SimPinFactory(clock=clock)
