"""The power governor: a closed loop from the board's thermal and battery state to a :class:`Plan`.

Every ``step_s`` the agent calls :meth:`Governor.step`. The governor reads a snapshot, asks the policy
which level it calls for, and applies the timing rules:

* **Escalation is immediate**: a more restrictive level takes effect at once.
* **Relaxation waits**: the governor leaves a level only after ``dwell_s`` at it, and then goes straight to
  the level the board calls for (a board that was critical and is now plugged in returns to
  ``performance`` within one dwell time, not one dwell per level).
* **Thermal trim**: within a level, the frequency cap is lowered one table step at a time while the
  predicted temperature is at or above ``thermal_target_c`` (a second step down waits ``predict_s`` for the
  first to show, unless the temperature itself reached the target), and raised one step at a time (at most every
  ``trim_dwell_s``) once both the temperature and its prediction are ``trim_hysteresis_c`` under it. The
  trim holds a hot board just under its limit at the highest frequency that stays there, so the levels'
  temperature thresholds are a backstop.
* **Override**: an operator forces a level for a TTL (:meth:`Governor.override`); it expires by itself.
  The thermal trim still applies under an override, so an override cannot cook the board.
* **Measured operating point** (with a :class:`power.planner.Planner`): the variant, threads and frequency are
  the planner's, picked by what each point was measured to deliver and cost on this board
  (:mod:`power.planner`): the most weighted windows per second on external power, per joule on battery. The
  levels' temperature thresholds and the thermal trim remain the frequency caps; a ``critical`` level for
  temperature or the power-good line, and an operator's override, run their level as configured.
* **Runtime target**: ``runtime_target_h`` (config) is how long the battery must last each time the board goes
  onto it (a solar board: its longest night); :meth:`Governor.set_target` (the signed ``governor.target``
  command) sets one deadline from now. The planner spends the battery's charge left over the time left, and
  the plan says whether the target will be met.
* **Harvest** (a board with a runtime target whose battery is recharged by day): once a whole day of the
  battery's gain has been observed (:mod:`power.harvest`, from the gauge and the power drawn), the budget is the
  constant power that day's harvest sustains, re-planned every minute from the charge left, instead of the
  target's night guard; a full battery that the harvest covers spends what it is given. An operator's deadline
  still binds. The planner meets a budget between two points by alternating them.

The output is a :class:`Plan`. The governor never touches the runtime, the link or sysfs itself: the agent
applies the plan. Every level change and override is reported through ``on_event(kind, data)``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import deque
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from device.clock import SYSTEM_CLOCK
from power.harvest import HarvestLog
from power.planner import Planner, Point, Work
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
        mode: ``level`` (the level's settings as configured) or the planner's objective in force:
            ``throughput`` (external power), ``efficiency`` (battery) or ``budget`` (a runtime target).
        target: The runtime target and whether it will be met (None without one).
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
    mode: str = "level"
    target: dict | None = None

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
        planner: Picks the operating point by measured cost, or None for the levels alone.
        read_work: Returns the agent's cumulative :class:`power.planner.Work` counters (needed with a planner).
        power_model: ``power_model(khz, busy_cores)`` in watts, used only when the board has no power reading.
        runtime_target_h: How long the battery must last each time the board goes onto it (0: no target).
    """

    def __init__(self, policy: Policy, read: Callable[[], PowerSnapshot], *,
                 frequencies_khz: Sequence[int] = (), cpus: int | None = None, clock=SYSTEM_CLOCK,
                 on_event: EventSink | None = None, planner: Planner | None = None,
                 read_work: Callable[[], Work] | None = None,
                 power_model: Callable[[int, float], float] | None = None, runtime_target_h: float = 0.0):
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
        self._trim_dir = 0  # the trim's last move: -1 down, 1 up
        self._override: tuple[Level, float, str] | None = None  # level, until (monotonic), by
        self.snapshot: PowerSnapshot | None = None
        self.planner, self.read_work, self._power_model = planner, read_work, power_model
        self._point: Point | None = None  # the planner's point in force
        self._unmetered = False
        self._thermal_level = Level.PERFORMANCE
        self._last_work: tuple[float, Work] | None = None
        self._interval_ms = 0  # the planner's duty cycle under a budget below its cheapest point
        self._target: tuple[float, float, str] | None = None  # deadline (monotonic), hours, by
        self.runtime_target_h = float(runtime_target_h or 0.0)
        self._charging_since: float | None = None
        self._learned_w_per_drain: float | None = None
        self._fuel: deque[tuple[float, float, float]] = deque()  # (t, charge Ah or energy Wh left, metered W)
        self.harvest = HarvestLog(full_pct=self._FULL_PCT)
        self.changes = 0
        self.plan = self._make_plan(now)

    # ------------------------------------------------------------------------------------------ control

    def step(self) -> Plan:
        """Reads the board once and returns the plan to apply."""
        now = self.clock.monotonic()
        snap = self._read()
        self.snapshot = snap
        self._expire_override(now)
        called, why = self.policy.called_for(snap, self.level, self._thermal_level)
        # what the temperature (and the throttle flags and the power-good line) alone call for, without the battery
        self._thermal_level = self.policy.called_for(dataclasses.replace(snap, battery_pct=None), self.level,
                                                     self._thermal_level)[0]
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
        if self.planner is not None:
            self._learn(snap, now)
        self.plan = self._make_plan(now)
        return self.plan

    def use_planner(self, planner: Planner | None) -> None:
        """Plans with ``planner`` from the next step on (a new model's variants), forgetting the point in force."""
        self.planner, self._point, self._last_work = planner, None, None

    def set_target(self, hours: float | None, by: str = "operator") -> Plan:
        """Sets how long the battery must last from now (``None`` or 0 clears it) and re-plans.

        Raises:
            ValueError: Not a number of hours in [0, 8760].
        """
        if hours is not None and (not isinstance(hours, (int, float)) or isinstance(hours, bool)
                                  or not 0 <= hours <= 8760):
            raise ValueError(f"the runtime target must be a number of hours in [0, 8760], got {hours!r}")
        now = self.clock.monotonic()
        self._target = (now + float(hours) * 3600.0, float(hours), by) if hours else None
        self._emit("governor_target", {"hours": float(hours or 0), "by": by})
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
        if self.planner is not None:
            d["planner"] = self.planner.status()
        if self.runtime_target_h:
            d["harvest"] = self.harvest.status(self.clock.monotonic())
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
        target = p.thermal_target(snap)
        if predicted >= target:
            # After a step down, the next waits until the prediction has seen its effect (predict_s), unless the
            # temperature itself has reached the target: two steps for one overshoot cost throughput for nothing.
            settled = now - self._trim_changed >= p.predict_s or self._trim_dir >= 0
            if self._trim < top and (settled or snap.temp_c >= target):
                self._trim += 1
                self._trim_changed, self._trim_dir = now, -1
        elif max(snap.temp_c, predicted) <= target - p.trim_hysteresis_c:
            if self._trim > 0 and now - self._trim_changed >= p.trim_dwell_s:
                self._trim -= 1
                self._trim_changed, self._trim_dir = now, 1
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
        planned = self._plan_point(now)
        if planned is None:
            self._point = None
            return Plan(self.level, self.reason, khz, threads, spec.variant, spec.interval_ms, spec.telemetry_s,
                        self._trim, self._override is not None, remaining, "level", self._target_status(now, None))
        point, mode, why, interval_ms, target, base = planned
        self._point = point
        interval_ms = max(interval_ms, self.policy.spec(base).interval_ms)  # the configured duty cycle stays
        return Plan(self.level, f"{self.reason}; {why}", point.khz or None, point.threads, point.variant,
                    interval_ms, spec.telemetry_s, self._trim,
                    False, None, mode, target)

    # ---------------------------------------------------------------------------------- measured planner

    def _learn(self, snap: PowerSnapshot, now: float) -> None:
        """Gives the point that was in force since the last step its sample."""
        work = self.read_work() if self.read_work is not None else None
        last, self._last_work = self._last_work, None if work is None else (now, work)
        if work is None or last is None or self._point is None:
            return
        t0, w0 = last
        seconds = now - t0
        delta = Work(work.done - w0.done, work.late - w0.late, work.busy_s - w0.busy_s)
        power = snap.power_w
        if power is None and self._power_model is not None and self._point.khz:
            busy = min(float(self.cpus), delta.busy_s * self._point.threads / seconds) if seconds > 0 else 0.0
            power = self._power_model(self._point.khz, busy)
        self._unmetered = power is None  # no meter, no gauge, no profile: the levels decide
        self.planner.record(now, self._point, seconds, power, delta)
        fuel = snap.charge_left_ah if snap.charge_left_ah is not None else snap.energy_left_wh
        if power is not None and fuel is not None:
            self._fuel.append((now, fuel, power))
            while len(self._fuel) > 2 and now - self._fuel[1][0] >= self._DRAIN_SPAN_S:
                self._fuel.popleft()
            self._learn_w_per_drain(snap)
            if self.runtime_target_h:
                self.harvest.add(now, fuel, power, self._w_per_drain(snap), snap.battery_pct)

    _DRAIN_SPAN_S = 1200.0  # the battery's drain is measured over the last 20 minutes
    _DRAIN_MIN_S = 300.0  # ... and trusted once it spans 5 minutes
    _DEFAULT_METER_SHARE = 0.85  # metered power / battery power before it was measured (a converter's loss)
    _FULL_PCT = 98.0  # a battery this full is full: a charging board may spend what it is given
    _EPISODE_END_S = 1800.0  # a discharge ends after this long charging without a break (not at a passing cloud)

    def _w_per_drain(self, snap: PowerSnapshot) -> float:
        """Metered watts per unit of battery drain (Ah/s, or Wh/s where the battery reports only energy): learned
        while the battery alone feeds the board, else from the nominal cell voltage through a pessimistic
        converter."""
        if self._learned_w_per_drain is not None:
            return self._learned_w_per_drain
        volts = 3.7 if snap.charge_left_ah is not None else 1.0
        return volts * 3600.0 * self._DEFAULT_METER_SHARE

    def _budget_w(self, now: float) -> float | None:
        """The metered power that spends the battery exactly by the target.

        The drain the target allows (charge left over time left) against the drain measured over the last
        minutes (net: a solar panel's harvest makes it smaller, or negative), turned into metered watts at the
        rate learned while the battery alone fed the board; so the converter's loss and the meter's offset cancel
        out, and a harvest raises the budget by what it brings in.
        """
        snap = self.snapshot
        if self._target is None or snap is None:
            return None
        left_s = self._target[0] - now
        fuel = snap.charge_left_ah if snap.charge_left_ah is not None else snap.energy_left_wh
        if left_s <= 0 or fuel is None:
            return None
        allowed = fuel / left_s
        measured = self._drain()
        if measured is None:
            return allowed * self._w_per_drain(snap)
        drain, metered, _ = measured
        return max(0.0, metered + (allowed * 0.99 - drain) * self._w_per_drain(snap))

    def _learn_w_per_drain(self, snap: PowerSnapshot) -> None:
        measured = self._drain()
        if measured is not None and measured[0] > 0 and snap.charging is False and snap.on_external_power is not True:
            self._learned_w_per_drain = measured[1] / measured[0]  # the battery alone: watts per unit of drain

    def _harvest_budget_w(self, now: float) -> float | None:
        """The constant power the last day's harvest sustains (:mod:`power.harvest`), for a board told to last on
        its battery; None before a whole day was observed or without a harvest."""
        snap = self.snapshot
        fuel = None if snap is None else snap.charge_left_ah if snap.charge_left_ah is not None else snap.energy_left_wh
        if not self.runtime_target_h or fuel is None:
            return None
        most = max((e.power_w for e in self.planner.table.values() if e.samples), default=0.0)
        return self.harvest.budget_w(now, fuel, self._w_per_drain(snap), 2.0 * most)

    def _drain(self) -> tuple[float, float, float] | None:
        """The battery's drain per second over the last minutes (net of any charge), the mean metered power over
        the same minutes and the charge (or energy) left now; None before the samples span ``_DRAIN_MIN_S``."""
        if len(self._fuel) < 2:
            return None
        (t0, f0, _), (t1, f1, _) = self._fuel[0], self._fuel[-1]
        if t1 - t0 < self._DRAIN_MIN_S:
            return None
        return (f0 - f1) / (t1 - t0), sum(p for _, _, p in self._fuel) / len(self._fuel), f1

    def _target_status(self, now: float, budget_w: float | None) -> dict | None:
        if self._target is None:
            return None
        deadline, hours, by = self._target
        out = {"hours": hours, "remaining_h": round(max(0.0, deadline - now) / 3600.0, 2), "by": by,
               "budget_w": None if budget_w is None else round(budget_w, 3), "projected_h": None, "will_meet": None}
        measured = self._drain()
        if measured is not None and measured[0] > 0:
            drain, _, left = measured
            projected_s = left / drain  # at the drain measured over the last minutes
            out["projected_h"] = round(projected_s / 3600.0, 2)
            # Met when the drain now lasts, or when a point measured fits the budget (the planner moves there).
            cheapest = min((e.power_w for e in self.planner.table.values() if e.samples), default=None)
            out["will_meet"] = projected_s >= deadline - now or (
                budget_w is not None and cheapest is not None and cheapest <= budget_w)
        return out

    def _plan_point(self, now: float):
        """The planner's point, objective, reason, interval, target status and the level its caps come from; None
        when the level rules."""
        snap = self.snapshot
        if self.planner is None or snap is None or self._override is not None or self._unmetered:
            return None
        # The levels a battery charge calls for are the planner's business on battery (it spends the energy left
        # by measured cost); temperature, firmware throttling and the power-good line keep their levels.
        thermal_level = self._thermal_level
        if thermal_level == Level.CRITICAL:
            return None
        discharging = snap.battery_pct is not None and (
            snap.charging is False or (snap.charging is None and snap.on_external_power is not True))
        self._track_discharge(discharging, now)
        cap = None
        if self.frequencies:
            top = self._level_index(max(thermal_level, Level.PERFORMANCE))
            cap = self.frequencies[max(0, top - self._trim)]
        budget = self._budget_w(now)
        full = snap.battery_pct is not None and snap.battery_pct >= self._FULL_PCT
        harvest = self._harvest_budget_w(now)
        if harvest is not None and (self._target is None or self._target[2] == "config"):
            # A day of harvest observed: its sustainable power replaces the night guard of the configured target
            # (an operator's deadline still binds); a full battery that the panel covers spends what it is given.
            # Where today falls short of the day learned, the target's night guard binds as well.
            guard = budget if self.harvest.repeat_share() < 1.0 else None
            budget = None if full and not discharging else harvest if guard is None else min(harvest, guard)
            storing = False
        else:
            # A board told to last on its battery (runtime_target_h) stores what it is given: while it charges it
            # runs at its most efficient point until the battery is full, so the next discharge starts full.
            storing = bool(self.runtime_target_h) and snap.battery_pct is not None and not full
        objective = ("budget" if budget is not None else "efficiency" if discharging or storing else "throughput")
        allowed = self.planner.candidates(max_khz=cap)
        current = self._point or Point(self.policy.spec(Level.PERFORMANCE).variant, self.cpus, cap or 0)
        if current.variant not in self.planner.variants:
            current = Point(next(iter(self.planner.variants)), current.threads, current.khz)
        point, why = self.planner.choose(now, current, allowed, objective, budget)
        interval = self._duty_cycle(point, budget) if objective == "budget" else 0
        if interval:
            why += f", one window per {interval} ms to fit the budget"
        return point, objective, why, interval, self._target_status(now, budget), max(thermal_level, Level.PERFORMANCE)

    def _track_discharge(self, discharging: bool, now: float) -> None:
        """The configured target's deadline: set when the board goes onto its battery, kept through a passing
        charge (a cloud, a governor drawing less for a while), dropped after charging without a break."""
        if discharging:
            self._charging_since = None
            if self.runtime_target_h and self._target is None:
                self._target = (now + self.runtime_target_h * 3600.0, self.runtime_target_h, "config")
            return
        if self._charging_since is None:
            self._charging_since = now
        if (self._target is not None and self._target[2] == "config"
                and now - self._charging_since >= self._EPISODE_END_S):
            self._target = None  # charged for a while: the next discharge gets a fresh deadline

    def _duty_cycle(self, point: Point, budget_w: float | None) -> int:
        """Lengthens the interval while even the chosen point draws more than the budget, and shortens it again
        when there is room (a feedback on the measured power, not a model)."""
        est = self.planner.table.get(point)
        if budget_w is None or est is None or est.samples == 0:
            return self._interval_ms
        if est.power_w > budget_w and not self.planner.mixing:  # a mix of two points meets the budget by itself
            floor = int(1000 * (est.service_s or 0.01))
            self._interval_ms = min(60000, max(int(self._interval_ms * 1.25), floor, 10))
        elif est.power_w < 0.95 * budget_w and self._interval_ms:
            self._interval_ms = int(self._interval_ms / 1.25) if self._interval_ms > 12 else 0
        return self._interval_ms

    def _emit(self, kind: str, data: dict) -> None:
        if self._on_event is not None:
            try:
                self._on_event(kind, data)
            except Exception:  # a broken listener must not stop the governor
                log.exception("governor event listener failed on %s", kind)
