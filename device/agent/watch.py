"""Faults that show where a technician looks: the log, the events topic and the status LED.

A :class:`FaultWatch` follows one condition (the sensor cannot be read, the runtime cannot serve). When it
starts, one warning names the problem and one event ``<name>_fault`` carries it; while it lasts, a reminder
goes to the log at a slow interval (not to the events topic, which a long outage would flood); when it clears,
one line and one event ``<name>_recovered`` say after how long. The agent calls :meth:`FaultWatch.update`
from its loops with the current problem (``None`` when all is well) and maps :attr:`FaultWatch.active` onto the
LED's codes.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from device.clock import SYSTEM_CLOCK

log = logging.getLogger("device.agent")

REMIND_S = 600.0


class FaultWatch:
    """One fault condition: said once when it starts, reminded at a slow interval, said once when it clears.

    Args:
        name: What is faulty (``sensor``, ``runtime``): the event kinds are ``<name>_fault`` and
            ``<name>_recovered``.
        on_event: Called with ``(kind, data)`` for each of the two events.
        clock: Time source (``monotonic``) for the reminder interval and the fault's duration.
        remind_s: Seconds between reminders in the log while the fault lasts.
    """

    def __init__(self, name: str, on_event: Callable[[str, dict], None], *, clock=SYSTEM_CLOCK,
                 remind_s: float = REMIND_S):
        self.name = name
        self._on_event = on_event
        self._clock = clock
        self.remind_s = remind_s
        self.problem: str | None = None
        self._since: float | None = None
        self._said: float = 0.0
        self.faults = 0
        self._lock = threading.Lock()  # the inference loop and the governor's thread both update it

    @property
    def active(self) -> bool:
        return self._since is not None

    def update(self, problem: str | None, **details) -> None:
        """Records the current state: ``problem`` says what is wrong, ``None`` that all is well.

        Args:
            problem: One line for a technician, e.g. ``cannot open /dev/ttyUSB9: No such file or directory``.
            **details: Extra fields of the ``<name>_fault`` event (the port, the state...).
        """
        with self._lock:  # the event is sent under the lock too, so faults and recoveries keep their order
            event = self._update(problem, details)
            if event is not None:
                self._on_event(*event)

    def _update(self, problem: str | None, details: dict) -> tuple[str, dict] | None:
        now = self._clock.monotonic()
        if problem is None:
            if self._since is None:
                return None
            after = round(now - self._since, 1)
            log.info("%s recovered after %.0f s (was: %s)", self.name, after, self.problem)
            self._since, self.problem = None, None
            return f"{self.name}_recovered", {"after_s": after}
        if self._since is None:
            self._since = self._said = now
            self.problem = problem
            self.faults += 1
            log.warning("%s fault: %s", self.name, problem)
            return f"{self.name}_fault", {"problem": problem, **details}
        if now - self._said >= self.remind_s:
            self._said = now
            self.problem = problem
            log.warning("%s fault for %.0f s: %s", self.name, now - self._since, problem)
        return None

    def status(self) -> dict | None:
        """``None`` when all is well, else the problem and how long it has lasted."""
        with self._lock:
            if self._since is None:
                return None
            return {"problem": self.problem, "for_s": round(self._clock.monotonic() - self._since, 1)}
