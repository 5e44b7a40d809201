"""Thermal zones from ``/sys/class/thermal``: the temperatures the governor plans against.

Workflow: :func:`read_zones` walks ``sys/class/thermal/thermal_zone*`` under a :class:`~drivers.sysfs.Sysfs`
root and returns one frozen :class:`ThermalZone` per zone, with its trip points. :func:`soc_temperature`
then picks the one number the governor needs: the SoC temperature, taken from a zone whose type is known
to sit on the SoC (``cpu-thermal`` on a Pi, ``CPU-therm`` on a Jetson, ``x86_pkg_temp`` on a PC), else
the hottest zone with a believable reading.

Boards differ in what they expose, and zones on the same board misbehave in their own ways (an Orin Nano
lists CV zones for accelerators it does not have and reports -256 °C for them; a zone whose sensor is
powered down answers ENODATA). Such readings become ``None`` ("unknown"), never an error.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Iterable

from drivers.sysfs import Sysfs

log = logging.getLogger(__name__)

THERMAL_DIR = "sys/class/thermal"

# Readings outside this range come from unpopulated or broken sensors, not from silicon.
MIN_PLAUSIBLE_C = -100.0
MAX_PLAUSIBLE_C = 200.0

# Zone types that measure the SoC itself, in order of preference (compared case-insensitively).
SOC_ZONE_TYPES = (
    "cpu-thermal",  # Raspberry Pi, Jetson on JetPack 6, i.MX (Coral Dev Board)
    "CPU-therm",  # Jetson on JetPack 4/5
    "soc_thermal",  # Rockchip and older Jetson device trees
    "x86_pkg_temp",  # Intel package sensor
    "soc-thermal",  # generic device trees
)

# Zone types left out of the "hottest zone" fallback: the Jetson Nano's PMIC-Die zone reports a fixed
# 100 °C whatever the board does, which would make every board without a known SoC zone look on fire.
NOT_SOC_ZONE_TYPES = ("PMIC-Die",)

_ZONE_RE = re.compile(r"thermal_zone(\d+)$")
_TRIP_RE = re.compile(r"trip_point_(\d+)_temp$")


@dataclass(frozen=True)
class TripPoint:
    """One trip point of a zone (``trip_point_N_temp`` and ``trip_point_N_type``).

    Attributes:
        index: N in the node names.
        temp_c: The trip temperature in °C.
        type: The kernel's trip type (``active``, ``passive``, ``hot``, ``critical``), or ``unknown``
            when the type node is missing.
    """

    index: int
    temp_c: float
    type: str


@dataclass(frozen=True)
class ThermalZone:
    """A snapshot of one thermal zone.

    Attributes:
        name: The directory name, e.g. ``thermal_zone0``.
        type: The zone type (``cpu-thermal``, ``GPU-therm``...), or ``None`` when the node is missing.
        temp_c: The temperature in °C, or ``None`` when missing, unparseable or outside -100..200 °C.
        trips: The zone's trip points with believable temperatures, by index.
    """

    name: str
    type: str | None
    temp_c: float | None
    trips: tuple[TripPoint, ...] = ()

    def trip_c(self, kind: str) -> float | None:
        """The lowest trip temperature of a kind (``passive``, ``critical``...), or ``None`` if none.

        Args:
            kind: The trip type to look for (case-insensitive).

        Returns:
            The lowest temperature in °C among the trips of that type, or ``None``.
        """
        temps = [t.temp_c for t in self.trips if t.type.lower() == kind.lower()]
        return min(temps) if temps else None


def _millideg(fs: Sysfs, rel: str) -> float | None:
    """A millidegree node as °C, or ``None`` when absent, not an integer or not believable."""
    text = fs.read_optional(rel)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        log.debug("%s holds %r, expected millidegrees C; treated as unknown", rel, text)
        return None
    temp = value / 1000.0
    if not MIN_PLAUSIBLE_C <= temp <= MAX_PLAUSIBLE_C:
        log.debug("%s reads %.1f C, outside %.0f..%.0f C; treated as unknown",
                  rel, temp, MIN_PLAUSIBLE_C, MAX_PLAUSIBLE_C)
        return None
    return temp


def _read_trips(fs: Sysfs, zone_rel: str) -> tuple[TripPoint, ...]:
    trips = []
    for rel in fs.glob(f"{zone_rel}/trip_point_*_temp"):
        m = _TRIP_RE.search(rel)
        if not m:
            continue  # trip_point_0_hyst and friends
        index = int(m.group(1))
        temp = _millideg(fs, rel)
        if temp is None:
            continue  # disabled trips read as absurd values on some drivers
        kind = fs.read_optional(f"{zone_rel}/trip_point_{index}_type") or "unknown"
        trips.append(TripPoint(index, temp, kind))
    return tuple(sorted(trips, key=lambda t: t.index))


def read_zones(fs: Sysfs) -> tuple[ThermalZone, ...]:
    """Reads every thermal zone under ``sys/class/thermal``.

    Args:
        fs: The sysfs root to read.

    Returns:
        One :class:`ThermalZone` per ``thermal_zoneN`` directory, in natural order (empty when the board
        has no thermal class). Missing or unbelievable readings are ``None``; this never raises.
    """
    zones = []
    for rel in fs.glob(f"{THERMAL_DIR}/thermal_zone*"):
        name = os.path.basename(rel)
        if not _ZONE_RE.fullmatch(name):
            continue
        zones.append(ThermalZone(
            name=name,
            type=fs.read_optional(f"{rel}/type"),
            temp_c=_millideg(fs, f"{rel}/temp"),
            trips=_read_trips(fs, rel),
        ))
    return tuple(zones)


def soc_temperature(zones: Iterable[ThermalZone]) -> tuple[float | None, str | None]:
    """Picks the SoC temperature from a set of zones.

    A zone of a known SoC type (:data:`SOC_ZONE_TYPES`, in that order of preference) wins; otherwise the
    hottest zone with a known temperature (ignoring :data:`NOT_SOC_ZONE_TYPES`) stands in for the SoC,
    since it is the one that will throttle first.

    Args:
        zones: Zones as returned by :func:`read_zones`.

    Returns:
        ``(temp_c, source)``: the temperature and the type of the zone it came from (its directory name
        when the zone has no type), or ``(None, None)`` when no zone has a known temperature.
    """
    known = [z for z in zones if z.temp_c is not None]
    by_type: dict[str, ThermalZone] = {}
    for zone in known:
        if zone.type is not None:
            by_type.setdefault(zone.type.lower(), zone)  # the first zone of a type, in natural order
    for soc_type in SOC_ZONE_TYPES:
        zone = by_type.get(soc_type.lower())
        if zone is not None:
            return zone.temp_c, zone.type
    ignored = {t.lower() for t in NOT_SOC_ZONE_TYPES}
    candidates = [z for z in known if (z.type or "").lower() not in ignored]
    if not candidates:
        return None, None
    hottest = max(candidates, key=lambda z: z.temp_c)  # max keeps the first of equals
    return hottest.temp_c, hottest.type or hottest.name
