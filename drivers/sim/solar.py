"""A solar panel and charge controller for the virtual board: the harvest over the day.

``P_sun(t) = peak × sin(π (h − sunrise) / (sunset − sunrise))`` while the sun is up, 0 at night, with ``h`` the
hour of day. The controller's output is ``P_sun × efficiency``; the board spends it first and the battery gets
the surplus (:class:`drivers.sim.board.VirtualBoard` does that part). Clouds, panel temperature and MPPT
tracking losses are not modelled beyond the one efficiency.

The board exposes the controller as a power supply of type ``Mains``: the kernel has no solar type, and the
charger ICs solar controllers are built around (bq24650-style DC-input chargers, whose Linux drivers register
their input as ``Mains``) report a DC input that is online while it delivers power.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SolarPanel:
    """A panel's harvest by time of day.

    Attributes:
        peak_w: Panel power at solar noon.
        sunrise_h: Hour of sunrise (0-24).
        sunset_h: Hour of sunset, after sunrise.
        start_hour: Hour of day at simulated time 0.
        efficiency: Share of the panel's power the charge controller delivers.
    """

    peak_w: float
    sunrise_h: float = 6.0
    sunset_h: float = 18.0
    start_hour: float = 0.0
    efficiency: float = 0.85

    def __post_init__(self) -> None:
        if not (math.isfinite(self.peak_w) and self.peak_w >= 0):
            raise ValueError(f"solar_peak_w must be a finite number >= 0, got {self.peak_w!r}")
        if not 0 <= self.sunrise_h < self.sunset_h <= 24:
            raise ValueError(f"need 0 <= sunrise_h < sunset_h <= 24, got {self.sunrise_h!r} and {self.sunset_h!r}")
        if not 0 < self.efficiency <= 1:
            raise ValueError(f"solar efficiency must be in (0, 1], got {self.efficiency!r}")

    def hour(self, t_s: float) -> float:
        """Hour of day at simulated time ``t_s``."""
        return (self.start_hour + t_s / 3600.0) % 24.0

    def panel_w(self, t_s: float) -> float:
        """The panel's power at simulated time ``t_s``."""
        h = self.hour(t_s)
        if not self.sunrise_h < h < self.sunset_h:
            return 0.0
        return self.peak_w * math.sin(math.pi * (h - self.sunrise_h) / (self.sunset_h - self.sunrise_h))

    def harvest_w(self, t0_s: float, t1_s: float) -> float:
        """Average controller output over ``[t0_s, t1_s]`` (Simpson's rule, exact enough for steps of minutes)."""
        if t1_s <= t0_s:
            return self.panel_w(t0_s) * self.efficiency
        mid = (t0_s + t1_s) / 2.0
        avg = (self.panel_w(t0_s) + 4.0 * self.panel_w(mid) + self.panel_w(t1_s)) / 6.0
        return avg * self.efficiency
