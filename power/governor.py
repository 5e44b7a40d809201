"""The power governor: a closed loop from the board's thermal and battery state to a :class:`Plan`.

Every ``step_s`` the agent calls :meth:`Governor.step`. The governor reads a snapshot, asks the policy
which level it calls for, and applies the timing rules:

* **Escalation is immediate**: a more restrictive level takes effect at once.
* **Relaxation waits**: the governor leaves a level only after ``dwell_s`` at it, and then goes straight to
  the level the board calls for (a board that was critical and is now plugged in returns to
  ``performance`` within one dwell time, not one dwell per level).
* **Thermal trim**: within a level, the frequency cap is lowered one table step at a time while the
  predicted temperature is at or above ``thermal_target_c``, and raised one step at a time (at most every
  ``trim_dwell_s``) once both the temperature and its prediction are ``trim_hysteresis_c`` under it. The
  trim holds a hot board just under its limit at the highest frequency that stays there, so the levels'
  temperature thresholds are a backstop.
* **Override**: an operator forces a level for a TTL (:meth:`Governor.override`); it expires by itself.
  The thermal trim still applies under an override, so an override cannot cook the board.

The output is a :class:`Plan`. The governor never touches the runtime, the link or sysfs itself: the agent
applies the plan. Every level change and override is reported through ``on_event(kind, data)``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from device.clock import SYSTEM_CLOCK
from power.policy import Level, Policy
from power.snapshot import PowerSnapshot

log = logging.getLogger(__name__)

EventSink = Callable[[str, dict], None]


@dataclass(frozen=True)
class Plan:
    """What the agent should do now.

    Attributes:
        level: The level in force.
        reason: Why (one human line).
        cpu_max_khz: Frequency cap for every cpufreq policy, or None when the board has no cpufreq table.
        threads: Interpreter threads.
        variant: ``auto`` (what the runtime picks by itself), ``cheapest`` or a variant name (the agent
            resolves it against the model).
        interval_ms: Minimum time between inferences (0: as often as windows arrive).
        telemetry_s: Telemetry period.
        trim_steps: How many frequency steps the thermal trim has taken off the level's cap.
        override: True while an operator override is in force.
        override_remaining_s: Seconds left on the override.
    """

    level: Level
    reason: str
    cpu_max_khz: int | None
    threads: int
    variant: str
    interval_ms: int
    telemetry_s: float
    trim_steps: int = 0
    override: bool = False
    override_remaining_s: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["level"] = self.level.label
        return d


class Governor:
    """Turns snapshots into plans.

    Args:
        policy: The validated policy.
        read: Returns the current :class:`PowerSnapshot` (normally ``BoardReader.read``).
        frequencies_khz: The board's allowed frequencies (ascending), or empty when there is no cpufreq.
        cpus: CPUs on the board (for ``threads = 0``).
        clock: Time source (a SimClock in simulation).
        on_event: ``on_event(kind, data)`` for level changes and overrides.
    """

    def __init__(self, policy: Policy, read: Callable[[], PowerSnapshot], *,
                 frequencies_khz: Sequence[int] = (), cpus: int | None = None, clock=SYSTEM_CLOCK,
                 on_event: EventSink | None = None):
        self.policy = policy
        self._read = read
        self.frequencies = tuple(sorted(set(int(f) for f in frequencies_khz)))
        self.cpus = max(1, cpus or os.cpu_count() or 1)
        self.clock = clock
        self._on_event = on_event
        now = clock.monotonic()
        self.level = Level.PERFORMANCE
        self.reason = "start"
        self._since = now - policy.dwell_s  # a fresh governor may relax at once
        self._trim = 0
        self._trim_changed = now - policy.trim_dwell_s
        self._override: tuple[Level, float, str] | None = None  # level, until (monotonic), by
        self.snapshot: PowerSnapshot | None = None
        self.plan = self._make_plan(now)
        self.changes = 0

    # ------------------------------------------------------------------------------------------ control

    def step(self) -> Plan:
        """Reads the board once and returns the plan to apply."""
        now = self.clock.monotonic()
        snap = self._read()
        self.snapshot = snap
        self._expire_override(now)
        called, why = self.policy.called_for(snap, self.level)
        if self._override is not None:
            level, until, by = self._override
            self._set_level(level, f"override by {by} ({until - now:.0f} s left); board calls for "
                                   f"{called.label}: {why}", now)
        elif called > self.level:
            self._set_level(called, why, now)
        elif called < self.level:
            held = now - self._since
            if held >= self.policy.dwell_s:
                self._set_level(called, why, now)
            else:
                self.reason = (f"holding {self.level.label} for the dwell time ({held:.0f}/{self.policy.dwell_s:g} s); "
                               f"board calls for {called.label}: {why}")
        else:
            self.reason = why
        self._update_trim(snap, now)
        self.plan = self._make_plan(now)
        return self.plan

    def override(self, level: Level | str, ttl_s: float, by: str = "operator") -> Plan:
        """Forces ``level`` for ``ttl_s`` seconds (the thermal trim still applies).

        Raises:
            ValueError: Unknown level or a TTL that is not a positive number.
        """
        level = Level.parse(level) if isinstance(level, str) else Level(level)
        if not isinstance(ttl_s, (int, float)) or isinstance(ttl_s, bool) or not 0 < ttl_s <= 7 * 86400:
            raise ValueError(f"ttl_s must be a number of seconds in (0, 604800], got {ttl_s!r}")
        now = self.clock.monotonic()
        self._override = (level, now + float(ttl_s), by)
        self._emit("governor_override", {"level": level.label, "ttl_s": float(ttl_s), "by": by})
        self._set_level(level, f"override by {by} ({ttl_s:g} s)", now)
        self.plan = self._make_plan(now)
        return self.plan

    def clear_override(self, by: str = "operator") -> Plan:
        """Ends an override now; the next step returns to what the board calls for."""
        if self._override is not None:
            self._override = None
            self._since = self.clock.monotonic() - self.policy.dwell_s  # as on expiry: no dwell to serve
            self._emit("governor_override_cleared", {"by": by})
        return self.step()

    def status(self) -> dict:
        """The governor's state for status replies and telemetry."""
        d = {"level": self.level.label, "reason": self.reason, "plan": self.plan.to_dict(), "changes": self.changes,
             "snapshot": None if self.snapshot is None else self.snapshot.to_dict()}
        if self._override is not None:
            level, until, by = self._override
            d["override"] = {"level": level.label, "by": by,
                             "remaining_s": round(max(0.0, until - self.clock.monotonic()), 1)}
        return d

    # --------------------------------------------------------------------------------------- internals

    def _expire_override(self, now: float) -> None:
        if self._override is not None and now >= self._override[1]:
            level, _, by = self._override
            self._override = None
            self._since = now - self.policy.dwell_s  # the override's level was not the board's choice
            self._emit("governor_override_expired", {"level": level.label, "by": by})

    def _set_level(self, level: Level, why: str, now: float) -> None:
        self.reason = why
        if level == self.level:
            return
        old, self.level, self._since = self.level, level, now
        self.changes += 1
        log.info("power level %s -> %s: %s", old.label, level.label, why)
        self._emit("governor_level", {"from": old.label, "to": level.label, "reason": why,
                                      "override": self._override is not None})

    def _update_trim(self, snap: PowerSnapshot, now: float) -> None:
        if snap.temp_c is None or not self.frequencies:
            return  # no evidence: keep the trim where it is
        p = self.policy
        predicted = snap.predicted_temp_c(p.predict_s)
        top = self._level_index(self.level)
        if predicted >= p.thermal_target_c:
            if self._trim < top:
                self._trim += 1
                self._trim_changed = now
        elif max(snap.temp_c, predicted) <= p.thermal_target_c - p.trim_hysteresis_c:
            if self._trim > 0 and now - self._trim_changed >= p.trim_dwell_s:
                self._trim -= 1
                self._trim_changed = now
        self._trim = min(self._trim, top)

    def _level_index(self, level: Level) -> int:
        """Index in the frequency table of ``level``'s cap (the highest frequency under its percentage)."""
        cap = self.frequencies[-1] * self.policy.spec(level).freq_pct / 100.0
        idx = 0
        for i, f in enumerate(self.frequencies):
            if f <= cap + 0.5:
                idx = i
        return idx

    def _make_plan(self, now: float) -> Plan:
        spec = self.policy.spec(self.level)
        khz = None
        if self.frequencies:
            khz = self.frequencies[max(0, self._level_index(self.level) - self._trim)]
        threads = self.cpus if spec.threads == 0 else min(spec.threads, self.cpus)
        remaining = None if self._override is None else round(max(0.0, self._override[1] - now), 1)
        return Plan(self.level, self.reason, khz, threads, spec.variant, spec.interval_ms, spec.telemetry_s,
                    self._trim, self._override is not None, remaining)

    def _emit(self, kind: str, data: dict) -> None:
        if self._on_event is not None:
            try:
                self._on_event(kind, data)
            except Exception:  # a broken listener must not stop the governor
                log.exception("governor event listener failed on %s", kind)
