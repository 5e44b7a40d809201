"""Board profiles of the virtual board: frequency tables, power and thermal constants, firmware limits.

The power constants are fitted to published wall power: "idle" is the kernel's default governor at idle (the
lowest table frequency, no busy core: ``power_w(min_khz, 0)``) and "loaded" is every core busy at the highest
frequency (``power_w(max_khz, cpus)``). ``tests/drivers/test_profiles.py`` holds each profile within 10 % of
its figures, and docs/power.md ("Where the profile constants come from") names the source of every constant.
The split between ``base_w`` and ``uncore_w`` and the exponent are assumptions that keep the shape the
governor cares about (power grows faster than frequency, most of an idle board's power is not the CPU).
Thermal constants and firmware limits are round figures for a bare board; they make the loop behave like the
board, not reproduce one unit.

Power model, per step::

    P = base_w + uncore_w * r**exp + core_w * r**exp * busy_cores        (r = f / f_max)

``busy_cores`` is how many cores the inference load keeps busy on average. Temperature follows
``dT/dt = (ambient + R * P - T) / tau``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BoardProfile:
    """Everything the virtual board needs to know about one kind of board."""

    name: str
    model: str  # device-tree model string
    cpus: int
    frequencies_khz: tuple[int, ...]  # scaling_available_frequencies, ascending
    base_w: float  # board without the CPU cluster (RAM, PMIC, USB, Ethernet)
    uncore_w: float  # CPU cluster idling at f_max (scaled by r**exp)
    core_w: float  # one fully busy core at f_max, on top of uncore
    exponent: float  # dynamic power ~ f * V**2, V rising with f
    r_c_per_w: float  # steady-state rise over ambient per watt
    tau_s: float  # thermal time constant
    soft_limit_c: float  # firmware soft throttle
    hard_limit_c: float  # firmware hard throttle
    soft_cap_khz: int  # frequency cap while the soft limit is active
    hard_cap_khz: int  # frequency cap while the hard limit is active
    thermal_zones: tuple[str, ...]  # zone types; the first is the SoC sensor
    firmware_throttle_node: bool  # exposes the Pi firmware get_throttled node
    infer_s_at_max: float  # one cost-1.0 inference on one core at f_max
    parallel_efficiency: float  # speed-up of n threads is n ** parallel_efficiency
    power_budget_w: float | None = None  # the power mode's budget (Jetson nvpmodel), if the board has one

    @property
    def max_khz(self) -> int:
        return self.frequencies_khz[-1]

    @property
    def min_khz(self) -> int:
        return self.frequencies_khz[0]

    def speedup(self, threads: int) -> float:
        """How much faster ``threads`` interpreter threads run one inference than one thread."""
        return max(1, min(threads, self.cpus)) ** self.parallel_efficiency

    def power_w(self, khz: float, busy_cores: float) -> float:
        """Board power at frequency ``khz`` with ``busy_cores`` cores busy on average."""
        r = (khz / self.max_khz) ** self.exponent
        return self.base_w + self.uncore_w * r + self.core_w * r * min(busy_cores, self.cpus)


def _steps(low_mhz: int, high_mhz: int, step_mhz: int) -> tuple[int, ...]:
    return tuple(mhz * 1000 for mhz in range(low_mhz, high_mhz + 1, step_mhz))


PROFILES: dict[str, BoardProfile] = {
    # Pi 4 B: 2.7 W idle and 6.4 W with all four cores loaded (published wall power); fitted: 2.65 W / 6.4 W.
    # A bare board under load passes 80 C with the case closed. Firmware: soft limit 80 C (caps the ARM
    # clock), hard limit 85 C.
    "rpi4": BoardProfile(
        name="rpi4", model="Raspberry Pi 4 Model B Rev 1.5", cpus=4,
        frequencies_khz=_steps(600, 1500, 100),
        base_w=2.6, uncore_w=0.5, core_w=0.825, exponent=2.5, r_c_per_w=9.0, tau_s=150.0,
        soft_limit_c=80.0, hard_limit_c=85.0, soft_cap_khz=1000000, hard_cap_khz=600000,
        thermal_zones=("cpu-thermal",), firmware_throttle_node=True,
        infer_s_at_max=0.050, parallel_efficiency=0.85,
    ),
    # Pi 5: faster and hungrier: 3 W idle, 8-9 W loaded (published wall power); fitted: 2.99 W / 8.5 W.
    # Same firmware limits as the Pi 4.
    "rpi5": BoardProfile(
        name="rpi5", model="Raspberry Pi 5 Model B Rev 1.0", cpus=4,
        frequencies_khz=_steps(1500, 2400, 100),
        base_w=2.7, uncore_w=0.9, core_w=1.225, exponent=2.4, r_c_per_w=7.5, tau_s=120.0,
        soft_limit_c=80.0, hard_limit_c=85.0, soft_cap_khz=1500000, hard_cap_khz=1500000,
        thermal_zones=("cpu-thermal",), firmware_throttle_node=True,
        infer_s_at_max=0.025, parallel_efficiency=0.85,
    ),
    # Jetson Orin Nano 8 GB (15 W mode): 6 Cortex-A78AE cores, a heatsink and fan, throttles near 99 C.
    # Idle 4.5 W is an assumption (a stock developer kit with fan and NVMe; NVIDIA's forum shows 2.6 W only
    # for a board stripped of most peripherals); all six cores loaded, 10.9 W, stays within the 15 W mode.
    "jetson-orin-nano": BoardProfile(
        name="jetson-orin-nano", model="NVIDIA Jetson Orin Nano Developer Kit", cpus=6,
        frequencies_khz=(115200, 422400, 729600, 1036800, 1190400, 1344000, 1497600),
        base_w=4.5, uncore_w=1.0, core_w=0.9, exponent=2.2, r_c_per_w=4.0, tau_s=90.0,
        soft_limit_c=95.0, hard_limit_c=99.0, soft_cap_khz=1036800, hard_cap_khz=729600,
        thermal_zones=("cpu-thermal", "gpu-thermal", "soc0-thermal", "soc1-thermal", "tj-thermal"),
        firmware_throttle_node=False, infer_s_at_max=0.020, parallel_efficiency=0.85, power_budget_w=15.0,
    ),
}


def get_profile(name: str) -> BoardProfile:
    """The profile called ``name``.

    Raises:
        ValueError: No such profile; the message lists the known ones.
    """
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown board profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None


_BOARD_NAMES = (("Raspberry Pi 4", "rpi4"), ("Raspberry Pi 5", "rpi5"), ("Orin Nano", "jetson-orin-nano"))


def for_board(model: str | None) -> BoardProfile | None:
    """The profile of the board whose device-tree model is ``model`` (``Raspberry Pi 4 Model B Rev 1.5``...), or
    None for a board no profile describes. The governor's power model falls back on it only when the board can
    measure neither its input nor its battery."""
    for needle, name in _BOARD_NAMES:
        if model and needle in model:
            return PROFILES[name]
    return None
