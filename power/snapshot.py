"""What the governor sees: a frozen :class:`PowerSnapshot` of the board, read through the sysfs drivers.

:class:`BoardReader` reads the SoC temperature, the power supplies, the measured power draw and the firmware
throttle flags through a :class:`drivers.sysfs.Sysfs` root (``/`` on a board, the virtual board's tree in
simulation), and keeps a short history of temperatures to estimate the slope, so the policy can act on where
the temperature is going rather than where it is. The power draw comes from a hwmon power monitor when the
board has one, else from a discharging battery's gauge (:mod:`drivers.powermeter`); the reader finds the
monitor once and looks again only every ``rediscover_every`` reads or when it disappears, since it runs
every governor step. Any reading can be unknown (``None``): boards differ in what they expose,
and the policy treats unknown as "no evidence", never as zero.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
import logging
from typing import Callable, Sequence

from device.clock import SYSTEM_CLOCK
from drivers import power_supply, powermeter, thermal, throttle
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
        power_w: Power the board draws, in watts, when measured (see ``power_source``); None when nothing
            measures it (no monitor, and no battery or one that is charging).
        throttle: Raspberry Pi firmware throttle flags, or None off a Pi.
        temp_source: The thermal zone type the temperature came from.
        power_good: The power-good / low-battery input line (False: it signals trouble), or None without one.
        power_source: Where ``power_w`` came from (``hwmon0:ina260``, ``battery:power_now``...), or None.
        energy_left_wh: The energy left in the battery, in watt-hours, or None when unknown.
        energy_basis: What ``energy_left_wh`` rests on (``energy_now``, ``charge_now*voltage_now``, or a
            basis starting with ``estimate:``), or None.
        charge_left_ah: The charge left in the battery (``charge_now``, else the capacity share of
            ``charge_full``), or None: it falls in step with the current drawn, where the energy figure also
            follows the cell's voltage curve, so the governor measures its drain in charge when it can.
        limit_c: Where the board starts throttling itself: the lowest passive trip point of the SoC's thermal
            zone, else 80 °C on a Raspberry Pi (its firmware's soft limit, which no trip point shows), else None.
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
    power_source: str | None = None
    energy_left_wh: float | None = None
    energy_basis: str | None = None
    charge_left_ah: float | None = None
    limit_c: float | None = None

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
            "power_source": self.power_source, "energy_left_wh": _round(self.energy_left_wh, 3),
            "energy_basis": self.energy_basis, "limit_c": self.limit_c,
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
        meter: A configured power monitor: chip name, hwmon directory or channel label
            (:func:`drivers.powermeter.discover_meters`), or None to take the best one found.
        rediscover_every: Look for the power monitor again after this many reads (a monitor that
            disappears is looked for at once).
    """

    def __init__(self, fs: Sysfs, clock=SYSTEM_CLOCK, slope_window_s: float = 30.0,
                 power_good: Callable[[], bool] | None = None, meter: str | None = None,
                 rediscover_every: int = 60):
        self.fs = fs
        self._power_good = power_good
        self.clock = clock
        self.slope_window_s = slope_window_s
        self._history: deque[tuple[float, float]] = deque()
        self._prefer = meter
        self.rediscover_every = max(1, rediscover_every)
        self._meter: powermeter.HwmonMeter | None = None
        self._reads_left = 0  # reads before the monitor is looked for again
        self._meter_note = ""
        self.power_reason: str | None = None  # why power_w is None, for status and diag

    def read(self) -> PowerSnapshot:
        """Reads the board now and returns the snapshot (never raises for absent or garbage nodes)."""
        now = self.clock.monotonic()
        zones = thermal.read_zones(self.fs)
        temp, source = thermal.soc_temperature(zones)
        if temp is not None:
            self._history.append((now, temp))
        while self._history and self._history[0][0] < now - self.slope_window_s:
            self._history.popleft()
        supplies = power_supply.read_power(self.fs)
        battery = supplies.battery
        reading, why = powermeter.choose_reading(self._read_meter(), supplies)
        if why != self.power_reason:
            log.info("power draw: %s", why or f"measured by {reading.source}")
            self.power_reason = why
        energy, basis = battery.remaining_energy() if battery is not None else (None, None)
        flags = throttle.read_throttled(self.fs)
        return PowerSnapshot(
            t=now, temp_c=temp,
            temp_slope_c_per_s=temperature_slope(self._history, self.slope_window_s / 3) if temp is not None else None,
            battery_pct=supplies.battery_pct, charging=supplies.charging,
            on_external_power=supplies.on_external_power,
            power_w=None if reading is None else reading.watts,
            throttle=flags, temp_source=source, power_good=self._read_power_good(),
            limit_c=_throttle_limit(zones, source, flags),
            power_source=None if reading is None else reading.source,
            energy_left_wh=energy, energy_basis=basis, charge_left_ah=_charge_left(battery),
        )

    @property
    def meter(self) -> powermeter.HwmonMeter | None:
        """The power monitor in use, or None (none found, or not looked for yet)."""
        return self._meter

    def _read_meter(self) -> powermeter.PowerReading | None:
        if self._reads_left > 0:
            self._reads_left -= 1
            if self._meter is None:
                return None
            reading = powermeter.read_meter(self.fs, self._meter)
            if reading is not None or self._meter.present(self.fs):
                return reading
            # unbound, or its hwmon number now belongs to another chip: look again now
        found = powermeter.find_meter(self.fs, self._prefer)
        note = "none" if found is None else found.source
        if note != self._meter_note:  # logged when it changes, not at every rediscovery
            self._meter_note = note
            if self._prefer is not None and (found is None or not found.matches(self._prefer)):
                log.warning("power monitor %r not found; using %s", self._prefer, note)
            else:
                log.info("power monitor: %s", note)
        self._meter, self._reads_left = found, self.rediscover_every - 1
        return None if found is None else powermeter.read_meter(self.fs, found)

    def _read_power_good(self) -> bool | None:
        if self._power_good is None:
            return None
        try:
            return bool(self._power_good())
        except Exception as exc:  # a GPIO read failing is "unknown", never a dead governor
            log.warning("power-good input unreadable: %s", exc)
            return None


def _charge_left(battery) -> float | None:
    if battery is None:
        return None
    if battery.charge_now_ah is not None:
        return battery.charge_now_ah
    full = battery.charge_full_ah or battery.charge_full_design_ah
    if full and battery.capacity_pct is not None:
        return full * battery.capacity_pct / 100.0
    return None


PI_FIRMWARE_SOFT_LIMIT_C = 80.0  # the Pi firmware caps the ARM clock from here, whatever the thermal zone says


def _throttle_limit(zones, source: str | None, flags) -> float | None:
    zone = next((z for z in zones if z.type == source), None)
    passive = zone.trip_c("passive") if zone is not None else None
    if passive is not None:
        return passive
    return PI_FIRMWARE_SOFT_LIMIT_C if flags is not None else None
