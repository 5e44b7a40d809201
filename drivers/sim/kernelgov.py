"""Kernel cpufreq governor models for the virtual board: what a user gets without fieldnode.

:class:`drivers.sim.board.VirtualBoard` asks a model for the frequency to run at, given how busy the CPUs were.
The models follow the Linux source; what they keep and what they leave out:

* ``performance`` / ``powersave``: ``policy->max`` / ``policy->min`` (``scaling_max_freq`` /
  ``scaling_min_freq``), resolved to the table (highest at or below the maximum, lowest at or above the
  minimum).
* ``userspace``: ``scaling_setspeed`` clamped to ``[scaling_min_freq, scaling_max_freq]``, then the lowest table
  frequency at or above it (``CPUFREQ_RELATION_L``, as ``cpufreq_set`` asks).
* ``ondemand`` (``drivers/cpufreq/cpufreq_ondemand.c`` ``od_update``/``od_dbs_update``, ``cpufreq_governor.c``
  ``dbs_update``): every ``sampling_rate × rate_mult`` the load, in whole percent, is the busy share of the
  busiest CPU of the policy since the previous sample (``100 * (wall - idle) / wall``, integer division).
  ``load > up_threshold``: go to ``policy->max`` (``CPUFREQ_RELATION_H``) and, if the policy was below it, set
  ``rate_mult = sampling_down_factor``. Otherwise ``freq_next = min_f + load * (max_f - min_f) / 100`` with
  ``min_f``/``max_f`` the hardware range (``cpuinfo``, not the scaling limits), ``rate_mult = 1``, and the
  closest table frequency (``CPUFREQ_RELATION_C``, a tie goes to the lower one) within the scaling limits.
  Defaults: ``up_threshold`` 95 (``MICRO_FREQUENCY_UP_THRESHOLD``: idle micro-accounting, every tickless
  kernel; 80 without it), ``sampling_down_factor`` 1, ``sampling_rate`` 10,000 µs (the default transition
  delay, ``min(latency × 1000, 10 ms)`` before Linux 6.9, which made it 2 ms). Left out: ``powersave_bias``,
  ``io_is_busy``, ``ignore_nice_load``, and the reuse of the previous load after a long deferred idle.
* ``schedutil`` (``kernel/sched/cpufreq_schedutil.c`` ``get_next_freq``): ``next_f = 1.25 × max_f × util``
  with ``max_f`` the hardware maximum and ``util`` the frequency-invariant utilisation of the busiest CPU (busy
  share × f_cur / f_max) as PELT tracks it (a geometric average with a 32 ms half-life, exact for a constant
  input over a substep) and UTIL_EST (a waking task brings back the utilisation it had when it last slept,
  an EWMA with weight 1/4 that follows increases at once). The lowest table frequency at or above ``next_f``
  within the scaling limits (``CPUFREQ_RELATION_L``), at most once per ``rate_limit_us`` (default 10,000 µs, as
  ``sampling_rate`` above). Left out: iowait boost, uclamp, RT/DL utilisation, and the "hold the frequency of a
  busy CPU" rule, which applies to single-CPU policies only.
* Arrivals of work are the board's: the models see busy time, never the load's shape.

Tunables are plain dicts (or the name of a preset in :data:`PRESETS`); :func:`resolve_tunables` checks them.
``rpi-os`` is Raspberry Pi OS's raspi-config init script: ``ondemand`` with ``up_threshold`` 50,
``sampling_rate`` 100000 µs and ``sampling_down_factor`` 50 (read from its ``debian/raspi-config.init`` and
``/etc/default/cpu_governor``).
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:
    from drivers.sim.profiles import BoardProfile
    from drivers.sim.workload import Workload

STATIC_GOVERNORS = ("performance", "powersave", "userspace")
SAMPLING_GOVERNORS = ("ondemand", "schedutil")
GOVERNORS = STATIC_GOVERNORS + SAMPLING_GOVERNORS

ONDEMAND_DEFAULTS = {"up_threshold": 95, "sampling_rate": 10000, "sampling_down_factor": 1}
SCHEDUTIL_DEFAULTS = {"rate_limit_us": 10000}
PRESETS: dict[str, dict[str, int]] = {
    # Raspberry Pi OS (raspi-config's init script and its /etc/default/cpu_governor defaults).
    "rpi-os": {"up_threshold": 50, "sampling_rate": 100000, "sampling_down_factor": 50},
}
# The ranges the kernel's store functions accept (sampling_rate: we take 1 ms as the floor, the kernel's
# own floor is two ticks).
_RANGES = {"up_threshold": (1, 100), "sampling_rate": (1000, 10_000_000), "sampling_down_factor": (1, 100000),
           "rate_limit_us": (1000, 10_000_000)}

PELT_HALF_LIFE_S = 0.032
SCHEDUTIL_HEADROOM = 1.25


def resolve_tunables(tunables: Mapping[str, int] | str | None) -> dict[str, int]:
    """The full tunable set (kernel defaults overlaid with ``tunables``), checked.

    Args:
        tunables: ``None``, a preset name from :data:`PRESETS`, or a dict of ondemand/schedutil tunables.

    Returns:
        ``up_threshold``, ``sampling_rate`` (µs), ``sampling_down_factor`` and ``rate_limit_us`` (µs).

    Raises:
        ValueError: An unknown preset or tunable, or a value that is not an integer in the kernel's range.
    """
    if isinstance(tunables, str):
        if tunables not in PRESETS:
            raise ValueError(f"unknown governor tunables preset {tunables!r}; known: {', '.join(sorted(PRESETS))}")
        tunables = PRESETS[tunables]
    merged = {**ONDEMAND_DEFAULTS, **SCHEDUTIL_DEFAULTS}
    for key, value in (tunables or {}).items():
        if key not in _RANGES:
            raise ValueError(f"unknown governor tunable {key!r}; known: {', '.join(sorted(_RANGES))}")
        low, high = _RANGES[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"governor tunable {key} must be an integer in [{low}, {high}], got {value!r}")
        merged[key] = value
    return merged


def check_governor(name: str) -> str:
    """``name`` if it is a modelled governor.

    Raises:
        ValueError: Not one of :data:`GOVERNORS`; the message lists them.
    """
    if name not in GOVERNORS:
        raise ValueError(f"unknown cpufreq governor {name!r}; modelled: {', '.join(GOVERNORS)}")
    return name


class Table:
    """A frequency table (ascending kHz) and the kernel's ways of resolving a target to an entry."""

    def __init__(self, frequencies_khz: Sequence[int]):
        self.f = tuple(frequencies_khz)
        self.min, self.max = self.f[0], self.f[-1]

    def at_most(self, khz: float) -> int:
        """Highest entry at or below ``khz``, else the lowest (``CPUFREQ_RELATION_H``)."""
        i = bisect.bisect_right(self.f, khz)
        return self.f[i - 1] if i else self.f[0]

    def at_least(self, khz: float) -> int:
        """Lowest entry at or above ``khz``, else the highest (``CPUFREQ_RELATION_L``)."""
        i = bisect.bisect_left(self.f, khz)
        return self.f[i] if i < len(self.f) else self.f[-1]

    def closest(self, khz: float) -> int:
        """Closest entry; a tie goes to the lower one (``CPUFREQ_RELATION_C``)."""
        lo, hi = self.at_most(khz), self.at_least(khz)
        return hi if hi - khz < khz - lo else lo


class Ondemand:
    """The ondemand governor of one policy (see the module docstring)."""

    name = "ondemand"

    def __init__(self, table: Table, tunables: Mapping[str, int]):
        self.table = table
        self.tunables = dict(tunables)
        self.rate_mult = 1

    def period_s(self) -> float:
        """Time to the next sample."""
        return self.tunables["sampling_rate"] * self.rate_mult / 1e6

    def sample(self, busy_share: float, cur_khz: int, lo_khz: int, hi_khz: int) -> int:
        """One ``od_update``: the frequency to request after a sample with ``busy_share`` of the busiest CPU.

        Args:
            busy_share: Busy time / wall time of the busiest CPU since the previous sample.
            cur_khz: The frequency the policy runs at (``policy->cur``).
            lo_khz: ``policy->min`` (scaling_min_freq).
            hi_khz: ``policy->max`` (scaling_max_freq).
        """
        t = self.table
        load = int(100 * min(max(busy_share, 0.0), 1.0) + 1e-9)
        if load > self.tunables["up_threshold"]:
            if cur_khz < hi_khz:
                self.rate_mult = self.tunables["sampling_down_factor"]
            return t.at_most(hi_khz)
        self.rate_mult = 1
        freq_next = t.min + load * (t.max - t.min) // 100
        return t.closest(min(max(freq_next, lo_khz), hi_khz))


class Schedutil:
    """The schedutil governor of one policy, with the PELT utilisation it reads (see the module docstring)."""

    name = "schedutil"

    def __init__(self, table: Table, tunables: Mapping[str, int]):
        self.table = table
        self.tunables = dict(tunables)
        self.util = 0.0  # PELT util_avg of the busiest CPU, 0..1 of the biggest CPU at f_max
        self.util_est = 0.0
        self._was_busy = False
        self._decay: tuple[float, float] = (-1.0, 1.0)

    def period_s(self) -> float:
        return self.tunables["rate_limit_us"] / 1e6

    def account(self, busy_share: float, speed: float, seconds: float) -> None:
        """Folds ``seconds`` with ``busy_share`` busy at ``speed`` (f / f_max) into PELT and UTIL_EST."""
        if self._decay[0] != seconds:
            self._decay = (seconds, 0.5 ** (seconds / PELT_HALF_LIFE_S))
        d = self._decay[1]
        self.util = self.util * d + min(busy_share, 1.0) * speed * (1.0 - d)
        busy = busy_share > 0.0
        if self._was_busy and busy_share < 1.0:
            # the task went to sleep: UTIL_EST samples util_avg (fast ramp-up, slow EWMA decay, weight 1/4)
            self.util_est = self.util if self.util > self.util_est else self.util_est + (self.util - self.util_est) / 4
        self._was_busy = busy

    def sample(self, busy_share: float, cur_khz: int, lo_khz: int, hi_khz: int) -> int:
        """One ``get_next_freq``: 1.25 × f_max × util, the lowest table entry at or above, within the limits."""
        util = max(self.util, self.util_est) if self._was_busy else self.util
        next_f = SCHEDUTIL_HEADROOM * self.table.max * min(util, 1.0)
        return self.table.at_least(min(max(next_f, lo_khz), hi_khz))


def make_governor(name: str, table: Table, tunables: Mapping[str, int]) -> Ondemand | Schedutil | None:
    """The sampling model for ``name``, or ``None`` for a static governor."""
    if name == "ondemand":
        return Ondemand(table, tunables)
    if name == "schedutil":
        return Schedutil(table, tunables)
    return None


def static_khz(name: str, table: Table, lo_khz: int, hi_khz: int, setspeed_khz: int | None) -> int:
    """The frequency a static governor asks for, within the scaling limits."""
    if name == "powersave":
        return table.at_least(lo_khz)
    if name == "userspace" and setspeed_khz is not None:
        return table.at_least(min(max(setspeed_khz, lo_khz), hi_khz))
    return table.at_most(hi_khz)


class SampledPolicy:
    """A sampling governor driving one policy through a board step, in substeps of its sampling period.

    Within a substep the frequency is constant: the load is served at it (discrete windows), the busy share of
    the busiest CPU goes to the governor, and at each sample the governor picks the frequency of the next
    substeps. ``scaling_max_freq``/``scaling_min_freq`` and the firmware cap apply at once, as the kernel
    re-applies the limits when they change.

    Args:
        gov: The governor model.
        khz: The frequency the policy runs at when the governor starts.
        now: The time of its first sample.
    """

    def __init__(self, gov: Ondemand | Schedutil, khz: int, now: float):
        self.gov = gov
        self.target = khz
        self.due = now
        self._busy = self._wall = 0.0  # ondemand: busy and wall time since its last sample

    def run(self, load: Workload, profile: BoardProfile, t0: float, dt: float, lo: int, hi: int, fw: int,
            recorded: float) -> tuple[int, float, float, float]:
        """Runs ``[t0, t0 + dt]``.

        Args:
            load: The board's workload.
            profile: The board profile (power model).
            t0: Start of the step.
            dt: Its length.
            lo: ``scaling_min_freq``.
            hi: ``scaling_max_freq``.
            fw: The firmware's cap.
            recorded: Cores kept busy by work the agent reported.

        Returns:
            The frequency at the end of the step, the mean busy cores, the mean power and the mean frequency.
        """
        gov, table = self.gov, self.gov.table
        schedutil = isinstance(gov, Schedutil)
        fmax, cores, cpus = float(profile.max_khz), load.cores, float(profile.cpus)
        power_w = profile.power_w
        t, end = t0, t0 + dt
        energy = busy_cs = khz_s = 0.0
        self.due = max(self.due, t0)
        rec_share = min(recorded, 1.0)
        while end - t > 1e-12:
            t1 = min(end, self.due) if self.due > t + 1e-12 else min(end, t + gov.period_s())
            h = t1 - t
            khz = table.at_most(min(max(self.target, lo), hi, fw))
            speed = khz / fmax
            share = load.serve(t, t1, speed) / h
            busy = min(cores * share + recorded, cpus)
            energy += power_w(khz, busy) * h
            busy_cs += busy * h
            khz_s += khz * h
            top = share if share > rec_share else rec_share  # the busiest CPU
            if schedutil:
                gov.account(top, speed, h)
            else:
                self._busy += top * h
                self._wall += h
            if t1 >= self.due - 1e-12:
                if not schedutil:
                    top = self._busy / self._wall if self._wall > 0 else 0.0
                    self._busy = self._wall = 0.0
                self.target = gov.sample(top, khz, lo, hi)
                self.due = t1 + gov.period_s()
            t = t1
        khz = table.at_most(min(max(self.target, lo), hi, fw))
        return khz, busy_cs / dt, energy / dt, round(khz_s / dt, 3)
