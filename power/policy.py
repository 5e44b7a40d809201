"""The governor's policy: which level a snapshot calls for, with hysteresis.

A level past ``performance`` is *called for* when any of its conditions holds:

* the SoC temperature, or its prediction ``predict_s`` ahead along the current slope, is at or above the
  level's ``enter_temp_c`` (so the governor acts before a limit is crossed, not after);
* the battery is at or below the level's ``enter_battery_pct`` and the board is not charging;
* (``balanced`` only) the Raspberry Pi firmware reports it is throttling or under-voltage right now;
* (``critical`` only) the board's power-good / low-battery input line signals trouble (a UPS HAT's
  low-battery output fires when the cell is nearly empty, whatever the fuel gauge says).

Hysteresis: a level that is already active (or one below a more severe active level) is only left when the
temperature is ``temp_hysteresis_c`` under its threshold and the battery ``battery_hysteresis_pct`` above
it. Unknown readings are no evidence: a board without a battery never enters a level for its battery.
The temperatures are written for a board that throttles itself at 80 °C (every Raspberry Pi); with
``follow_board_limit`` they move by the difference on a board that says it throttles elsewhere (the passive trip
point of its SoC zone: a Jetson's 95 °C and more).
The dwell time and overrides are the governor's business (:mod:`power.governor`); this module is pure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from device.errors import ConfigError
from power.config import PowerConfig
from power.snapshot import PowerSnapshot


class Level(enum.IntEnum):
    """Governor levels, from least to most restrictive."""

    PERFORMANCE = 0
    BALANCED = 1
    SAVER = 2
    CRITICAL = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, name: str) -> Level:
        """The level called ``name`` (case-insensitive).

        Raises:
            ValueError: Unknown name; the message lists the levels.
        """
        try:
            return cls[str(name).upper()]
        except KeyError:
            raise ValueError(f"unknown level {name!r}; expected one of "
                             f"{', '.join(level.label for level in cls)}") from None


@dataclass(frozen=True)
class LevelSpec:
    """What one level allows, and when it is entered (no thresholds for ``performance``)."""

    level: Level
    enter_temp_c: float | None
    enter_battery_pct: float | None
    freq_pct: float
    threads: int  # 0 = one per CPU
    variant: str  # "auto" (the runtime picks), "cheapest" or a variant name
    interval_ms: int
    telemetry_s: float


@dataclass(frozen=True)
class Policy:
    """A validated policy. Build it with :meth:`from_config`."""

    levels: tuple[LevelSpec, ...]
    step_s: float = 5.0
    dwell_s: float = 60.0
    predict_s: float = 30.0
    slope_window_s: float = 30.0
    temp_hysteresis_c: float = 3.0
    battery_hysteresis_pct: float = 5.0
    thermal_target_c: float = 79.5
    trim_hysteresis_c: float = 0.5
    trim_dwell_s: float = 20.0
    follow_board_limit: bool = True

    REFERENCE_LIMIT_C = 80.0  # the temperatures in [power] are written for a board that throttles here

    def shift_c(self, snap: PowerSnapshot) -> float:
        """How far the temperatures move on this board: its throttle point (``snap.limit_c``) minus the 80 °C
        they are written for, with ``follow_board_limit``; 0 otherwise or when the board does not say."""
        if not self.follow_board_limit or snap.limit_c is None:
            return 0.0
        return snap.limit_c - self.REFERENCE_LIMIT_C

    def thermal_target(self, snap: PowerSnapshot) -> float:
        """The thermal trim's target on this board."""
        return self.thermal_target_c + self.shift_c(snap)

    @classmethod
    def from_config(cls, pc: PowerConfig | None = None) -> Policy:
        """Builds the policy from ``[power]`` and checks the rules no single key can check.

        A config from :mod:`device.config` has passed these checks already; they run again here for a
        :class:`PowerConfig` built in code.

        Raises:
            ConfigError: Thresholds do not grow more severe level by level, or the thermal target is not
                below the first temperature threshold; the message names the keys.
        """
        pc = pc or PowerConfig()
        perf = pc.performance
        specs = [LevelSpec(Level.PERFORMANCE, None, None, perf.freq_pct, perf.threads, perf.variant,
                           perf.interval_ms, perf.telemetry_s)]
        for level in (Level.BALANCED, Level.SAVER, Level.CRITICAL):
            s = getattr(pc, level.label)
            specs.append(LevelSpec(level, s.enter_temp_c, s.enter_battery_pct, s.freq_pct, s.threads,
                                   s.variant, s.interval_ms, s.telemetry_s))
        problems = pc.validate()  # the same rules the config loader checks, for a PowerConfig built in code
        if problems:
            key_path, message = problems[0]
            raise ConfigError(message, key_path)
        return cls(tuple(specs), pc.step_s, pc.dwell_s, pc.predict_s, pc.slope_window_s, pc.temp_hysteresis_c,
                   pc.battery_hysteresis_pct, pc.thermal_target_c, pc.trim_hysteresis_c, pc.trim_dwell_s,
                   pc.follow_board_limit)

    def spec(self, level: Level) -> LevelSpec:
        return self.levels[int(level)]

    def called_for(self, snap: PowerSnapshot, current: Level, thermal: Level | None = None) -> tuple[Level, str]:
        """The most restrictive level ``snap`` calls for, and why.

        Args:
            snap: The board's state.
            current: The level in force, for hysteresis.
            thermal: The level the temperature alone called for last time, for the temperature's hysteresis (so a
                level held for a low battery does not lower the temperature thresholds); ``current`` when None.

        Returns:
            ``(level, reason)``; the reason is one human line naming the reading and the threshold.
        """
        found, reason = Level.PERFORMANCE, "nominal"
        predicted = snap.predicted_temp_c(self.predict_s)
        shift = self.shift_c(snap)
        discharging = snap.battery_pct is not None and snap.charging is not True
        for spec in self.levels[1:]:
            held = spec.level <= current
            held_temp = spec.level <= (current if thermal is None else thermal)
            why = None
            if snap.temp_c is not None:
                limit = spec.enter_temp_c + shift - (self.temp_hysteresis_c if held_temp else 0.0)
                if snap.temp_c >= limit:
                    why = f"temperature {snap.temp_c:.1f} C >= {limit:g} C"
                elif predicted is not None and predicted >= limit:
                    why = (f"temperature {snap.temp_c:.1f} C rising {60 * (snap.temp_slope_c_per_s or 0):.2f} C/min, "
                           f"{predicted:.1f} C within {self.predict_s:g} s >= {limit:g} C")
            if why is None and discharging:
                limit = spec.enter_battery_pct + (self.battery_hysteresis_pct if held else 0.0)
                if snap.battery_pct <= limit:
                    why = f"battery {snap.battery_pct:.0f}% <= {limit:g}% and not charging"
            if why is not None:
                found, reason = spec.level, why
        if snap.power_good is False and found < Level.CRITICAL:
            found, reason = Level.CRITICAL, "the power-good input signals a power problem (low battery)"
        if found < Level.BALANCED and snap.throttle is not None:
            if snap.throttle.throttled or snap.throttle.soft_temp_limit or snap.throttle.freq_capped:
                found, reason = Level.BALANCED, f"firmware throttling ({snap.throttle.describe()})"
            elif snap.throttle.under_voltage:
                found, reason = Level.BALANCED, "under-voltage reported by the firmware"
        return found, reason
