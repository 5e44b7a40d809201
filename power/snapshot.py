"""What the governor sees: a frozen :class:`PowerSnapshot` of the board, read through the sysfs drivers.

:class:`BoardReader` reads the SoC temperature, the power supplies and the firmware throttle flags through a
:class:`drivers.sysfs.Sysfs` root (``/`` on a board, the virtual board's tree in simulation), and keeps a
short history of temperatures to estimate the slope, so the policy can act on where the temperature is
going rather than where it is. Any reading can be unknown (``None``): boards differ in what they expose,
and the policy treats unknown as "no evidence", never as zero.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
import logging
from typing import Callable, Sequence

from device.clock import SYSTEM_CLOCK
from drivers import power_supply, thermal, throttle
from drivers.sysfs import Sysfs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PowerSnapshot:
    """One reading of the board's power and thermal state.

    Attributes:
        t: Monotonic time of the reading.
        temp_c: SoC temperature, or None when unknown.
        temp_slope_c_per_s: Least-squares slope of the recent temperatures, or None until there are two.
        battery_pct: Battery charge, or None (no battery, or unknown).
        charging: Whether the battery is charging or on external power, or None when unknown.
        on_external_power: Whether mains/USB power is present, or None when unknown.
        power_w: Power drawn from the battery when known.
        throttle: Raspberry Pi firmware throttle flags, or None off a Pi.
        temp_source: The thermal zone type the temperature came from.
        power_good: The power-good / low-battery input line (False: it signals trouble), or None without one.
    """

    t: float
    temp_c: float | None = None
    temp_slope_c_per_s: float | None = None
    battery_pct: float | None = None
    charging: bool | None = None
    on_external_power: bool | None = None
    power_w: float | None = None
    throttle: throttle.ThrottleFlags | None = None
    temp_source: str | None = None
    power_good: bool | None = None

    def predicted_temp_c(self, horizon_s: float) -> float | None:
        """The temperature ``horizon_s`` ahead if the current slope holds (only ever above the reading when
        rising; a falling slope predicts the current temperature, so cooling never hides a hot reading)."""
        if self.temp_c is None:
            return None
        slope = self.temp_slope_c_per_s or 0.0
        return self.temp_c + max(slope, 0.0) * horizon_s

    def to_dict(self) -> dict:
        return {
            "temp_c": _round(self.temp_c, 2), "temp_slope_c_per_min": _round(
                None if self.temp_slope_c_per_s is None else self.temp_slope_c_per_s * 60.0, 3),
            "battery_pct": _round(self.battery_pct, 1), "charging": self.charging,
            "on_external_power": self.on_external_power, "power_w": _round(self.power_w, 3),
            "throttle": None if self.throttle is None else list(self.throttle.active),
            "temp_source": self.temp_source, "power_good": self.power_good,
        }


def _round(value, digits):
    return None if value is None else round(value, digits)


def temperature_slope(samples: Sequence[tuple[float, float]], min_span_s: float = 0.0) -> float | None:
    """Least-squares slope (degrees per second) of ``(t, temp)`` samples.

    None with fewer than two samples or when they span less than ``min_span_s``: two readings a moment apart
    across one sensor update would otherwise make a step look like an enormous slope.
    """
    if len(samples) < 2 or samples[-1][0] - samples[0][0] < min_span_s:
        return None
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    my = sum(y for _, y in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    if var <= 0:
        return None
    return sum((t - mt) * (y - my) for t, y in samples) / var


class BoardReader:
    """Reads :class:`PowerSnapshot` objects from a sysfs root.

    Args:
        fs: The sysfs root to read.
        clock: Time source for the snapshot time and the slope history.
        slope_window_s: How much temperature history the slope is fitted over.
        power_good: Reads the power-good / low-battery input (``drivers.inputs.PowerGoodInput.power_good``),
            or None when the board has none.
    """

    def __init__(self, fs: Sysfs, clock=SYSTEM_CLOCK, slope_window_s: float = 30.0,
                 power_good: Callable[[], bool] | None = None):
        self.fs = fs
        self._power_good = power_good
        self.clock = clock
        self.slope_window_s = slope_window_s
        self._history: deque[tuple[float, float]] = deque()

    def read(self) -> PowerSnapshot:
        """Reads the board now and returns the snapshot (never raises for absent or garbage nodes)."""
        now = self.clock.monotonic()
        temp, source = thermal.soc_temperature(thermal.read_zones(self.fs))
        if temp is not None:
            self._history.append((now, temp))
        while self._history and self._history[0][0] < now - self.slope_window_s:
            self._history.popleft()
        supplies = power_supply.read_power(self.fs)
        battery = supplies.battery
        return PowerSnapshot(
            t=now, temp_c=temp,
            temp_slope_c_per_s=temperature_slope(self._history, self.slope_window_s / 3) if temp is not None else None,
            battery_pct=supplies.battery_pct, charging=supplies.charging,
            on_external_power=supplies.on_external_power,
            power_w=None if battery is None else battery.power_w,
            throttle=throttle.read_throttled(self.fs), temp_source=source, power_good=self._read_power_good(),
        )

    def _read_power_good(self) -> bool | None:
        if self._power_good is None:
            return None
        try:
            return bool(self._power_good())
        except Exception as exc:  # a GPIO read failing is "unknown", never a dead governor
            log.warning("power-good input unreadable: %s", exc)
            return None
