"""Faults that show where a technician looks: the log, the events topic, ``status`` and the status LED.

A :class:`FaultWatch` follows one condition (the sensor cannot be read, the broker cannot be reached, the
inference worker does not answer). When it starts, one warning names the problem and one event
``<name>_fault`` carries it; while it lasts, a reminder goes to the log at a slow interval (not to the events
topic, which a long outage would flood); when it clears, one line and one event ``<name>_recovered`` say after
how long. :class:`Faults` holds the agent's watches and decides, from what each part reports, when a condition
is a fault: the agent calls its ``check_*`` methods from its loops, shows :meth:`Faults.by_part` in ``status``
and maps the active watches onto the LED's codes (docs/led-codes.md).

When a condition is a fault:

* **sensor**: disconnected or stale, with an error the driver reported;
* **link**: the link says it is unhealthy (the broker stopped acknowledging), or it has not been connected for
  :data:`LINK_GRACE_S` (never connected since the start, or reconnecting after a drop): a short blip is not a
  fault, the spool holds what waits;
* **worker**: a request has waited longer than :data:`LATE_FRACTION` of ``runtime.deadline_ms`` (at least
  :data:`LATE_MIN_S`) for its answer: the worker is hung, or its restart is. The supervisor kills it at the whole
  deadline; an inline interpreter is never killed, so this is the only sign of it.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from device.clock import SYSTEM_CLOCK

log = logging.getLogger("device.agent")

REMIND_S = 600.0
LINK_GRACE_S = 30.0  # a link down for less than this is not a fault (a broker restart, a Wi-Fi hand-over)
LATE_FRACTION = 0.5  # a request waiting longer than this part of its deadline is late...
LATE_MIN_S = 1.0  # ... but never before this (a deadline of a few ms is not a hung worker at 2 ms)


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

    def update(self, problem: str | None, *, since: float | None = None, **details) -> None:
        """Records the current state: ``problem`` says what is wrong, ``None`` that all is well.

        Args:
            problem: One line for a technician, e.g. ``cannot open /dev/ttyUSB9: No such file or directory``.
            since: When the condition began (the clock's ``monotonic``), for one that becomes a fault only after
                a grace: its duration counts from then. Default: now.
            **details: Extra fields of the ``<name>_fault`` event (the port, the state...).
        """
        with self._lock:  # the event is sent under the lock too, so faults and recoveries keep their order
            event = self._update(problem, since, details)
            if event is not None:
                self._on_event(*event)

    def _update(self, problem: str | None, since: float | None, details: dict) -> tuple[str, dict] | None:
        now = self._clock.monotonic()
        if problem is None:
            if self._since is None:
                return None
            after = round(now - self._since, 1)
            log.info("%s recovered after %.0f s (was: %s)", self.name, after, self.problem)
            self._since, self.problem = None, None
            return f"{self.name}_recovered", {"after_s": after}
        if self._since is None:
            self._since = min(now, since) if since is not None else now
            self._said = now
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


def link_unhealthy(link_status: dict) -> str | None:
    """What the link itself says is wrong while it may still be connected: the broker stopped acknowledging
    (``healthy`` False, ``ack_timeout_s``). Read defensively: a link that does not say is healthy as far as this
    goes."""
    if link_status.get("healthy") is not False:
        return None
    timeout = link_status.get("ack_timeout_s")
    within = f" within {timeout:g} s" if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) else ""
    return (f"the broker stopped acknowledging results (none{within}); the link resets its session, results wait "
            f"in the spool")


class Faults:
    """What is wrong with the agent now, by part: a :class:`FaultWatch` each for the sensor, the link and the
    inference worker (the runtime's not-serving state comes from the runtime, which says it itself).

    Args:
        on_event: Called with ``(kind, data)`` for each fault and recovery (the agent's ``event``).
        clock: Time source (``monotonic``) for durations, the link's grace and a request's wait.
        link_grace_s: How long the link may be down before it is a fault.
        late_fraction: The part of ``runtime.deadline_ms`` after which a request is late.
        late_min_s: No request is late before this.
    """

    def __init__(self, on_event: Callable[[str, dict], None], *, clock=SYSTEM_CLOCK,
                 link_grace_s: float = LINK_GRACE_S, late_fraction: float = LATE_FRACTION,
                 late_min_s: float = LATE_MIN_S):
        self._clock = clock
        self.sensor = FaultWatch("sensor", on_event, clock=clock)
        self.link = FaultWatch("link", on_event, clock=clock)
        self.worker = FaultWatch("worker", on_event, clock=clock)
        self.link_grace_s, self.late_fraction, self.late_min_s = link_grace_s, late_fraction, late_min_s
        self._down_since: float | None = None  # when the link was first seen not connected
        self._lock = threading.Lock()  # both loops check

    def check_sensor(self, health, port: str) -> None:
        """The sensor's :class:`drivers.sensor.SensorHealth`: disconnected or stale with an error is a fault."""
        from drivers.sensor import SensorState

        faulty = health.state in (SensorState.DISCONNECTED, SensorState.STALE) and health.last_error is not None
        self.sensor.update(health.last_error if faulty else None, port=port, state=health.state.value)

    def check_link(self, link_status: dict | None) -> None:
        """The link's ``status()`` (None without a broker): unhealthy, or down for longer than the grace."""
        if link_status is None:
            self.link.update(None)
            return
        now = self._clock.monotonic()
        with self._lock:
            if link_status.get("connected"):
                self._down_since = None
            elif self._down_since is None:
                self._down_since = now
            down_since = self._down_since
        broker = link_status.get("broker") or "the broker"
        problem, since = link_unhealthy(link_status), None
        stall = link_status.get("ack_stall_s")
        if problem is not None and isinstance(stall, (int, float)) and not isinstance(stall, bool):
            since = now - stall
        if problem is None and down_since is not None and now - down_since >= self.link_grace_s:
            why = link_status.get("last_error") or ("disconnected" if link_status.get("connects") else
                                                    "no connection yet")
            problem = f"not connected to {broker} ({why}); results wait in the spool"
            since = down_since
        self.link.update(problem, since=since, broker=broker)

    def late_after_s(self, deadline_s: float) -> float:
        """How long a request may wait for its answer before it is late."""
        return max(self.late_min_s, self.late_fraction * deadline_s)

    def check_worker(self, waited_s: float | None, *, deadline_s: float, pid: int | None,
                     isolation: str) -> None:
        """The request in flight longest (``waited_s``, None when none is): late is a fault of the worker."""
        late = self.late_after_s(deadline_s)
        if waited_s is None or waited_s < late:
            self.worker.update(None)
            return
        if isolation == "inline":
            problem = (f"the interpreter (inline isolation: nothing can kill it) has not answered a request "
                       f"within {late:g} s")
        else:
            problem = (f"the inference worker (pid {pid or 'unknown'}) has not answered a request within {late:g} s; "
                       f"it is killed at runtime.deadline_ms ({deadline_s:g} s)")
        self.worker.update(problem, since=self._clock.monotonic() - waited_s, pid=pid, deadline_s=deadline_s)

    def by_part(self, runtime_problem: str | None = None) -> dict:
        """What is wrong now, by part: ``{"sensor": {"problem", "for_s"}, "link": ..., "worker": ...,
        "runtime": {"problem"}}``; empty when all is well."""
        out = {}
        for watch in (self.sensor, self.link, self.worker):
            st = watch.status()
            if st is not None:
                out[watch.name] = st
        if runtime_problem is not None:
            out["runtime"] = {"problem": runtime_problem}
        return out
