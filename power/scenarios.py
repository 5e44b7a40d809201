"""The governor's scenarios, each against every baseline a user could choose instead, in the same run.

One function per scenario returns one JSON-ready line (``scenario``, ``profile``, ``ratio_vs_best_static``,
``ratio_vs_best_kernel``, ``best_static``, ``best_kernel``, ``met``, and the figures behind them). The same code
serves ``tests/benchmarks/bench_governor.py`` and ``fieldnode power simulate``.

* **hot**: 40 C ambient, continuous demand, mains, 2 h. Quality-weighted windows against the best static plan
  that stays under the firmware's soft limit; the governed run must stay under it too.
* **rate**: on battery, windows at a fixed rate, each to be classified before the next arrives. The rate keeps
  the board busy half the time at its lowest frequency with the default variant on all cores (``rate``), or
  is the virtual sensor's own rate (1 kHz, 256-sample windows, hop 128: ``rate-light``, where the base power
  dominates and every plan ties; reported with ``met`` null). Runtime against the plans that keep up.
* **target**: on battery, continuous demand, a 12-hour runtime target. The battery is sized so that the
  target is worth planning for (12 hours at 40 % of the way from idle to full power). Weighted windows in the
  target's hours against the best static plan that lasts them.
* **solar**: a daily charge curve (06:00 to 18:00) with a battery, 3 days, continuous demand; the governor is
  configured with the night's length as its runtime target (16 h each time the battery takes over). No
  brown-out where a static plan avoids one; weighted windows against the best such plan.
* **plug**: the battery pushes the governor into ``critical``, mains is plugged in 15 s later; back to
  ``performance`` within one dwell.

Baselines: every static plan (frequency x threads x variant, and duty-cycle intervals of 50 and 200 ms for the
runtime target) and the kernel's own governors (``performance``, ``powersave``, ``ondemand``
with the kernel's defaults and with Raspberry Pi OS's settings, ``schedutil``) with each variant on all cores.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from typing import Callable

from drivers.sim.profiles import get_profile
from drivers.sim.signal import SAMPLE_RATE_HZ
from power.policy import Policy
from power.simulate import DEFAULT_COSTS, KernelPlan, StaticPlan, Trace, kernel_plans, simulate, static_plans

SCENARIOS = ("hot", "rate", "rate-light", "target", "solar", "plug")
TARGET_H = 12.0
SOLAR_DAYS = 3.0
SOLAR_NIGHT_H = 16.0  # the solar board's runtime_target_h: from when the panel falls short to when it covers
LIGHT_HOP = 128  # the virtual sensor's windows: 256 samples, hop 128, at SAMPLE_RATE_HZ


def _baselines(plans: list, **kw) -> list[Trace]:
    """Runs every baseline plan, on every CPU of this machine (they are independent)."""
    workers = min(len(plans), os.cpu_count() or 1)
    if workers <= 1:
        return [simulate(p, **kw) for p in plans]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(partial(_one, kw=kw), plans, chunksize=4))


def _one(plan: StaticPlan | KernelPlan, kw: dict) -> Trace:
    return simulate(plan, **kw)


def _idle_full(profile: str) -> tuple[float, float]:
    p = get_profile(profile)
    return p.power_w(p.min_khz, 0.0), p.power_w(p.max_khz, p.cpus)


def heavy_rate_hz(profile: str) -> float:
    """Windows per second that keep the board busy half the time at its lowest frequency, default variant,
    all cores."""
    p = get_profile(profile)
    service = DEFAULT_COSTS["full"] * p.infer_s_at_max / (p.speedup(p.cpus) * p.min_khz / p.max_khz)
    return round(0.5 / service, 2)


def _mah_for(wh: float) -> float:
    return round(wh / 3.7 * 1000.0 / 0.9)  # through the 0.9 converter of the virtual board


def _best(traces: list[Trace], key: Callable[[Trace], float]) -> Trace | None:
    return max(traces, key=key) if traces else None


def _best_survivors(governed: Trace, statics: list[Trace], kernels: list[Trace],
                    least: float) -> tuple[Trace | None, Trace | None, bool]:
    """The static plan and the kernel governor with the most weighted windows among those whose battery lasted,
    and whether the governed run lasted wherever a static plan did, with at least ``least`` of its windows."""
    best_s = _best([t for t in statics if not t.died], lambda t: t.weighted)
    best_k = _best([t for t in kernels if not t.died], lambda t: t.weighted)
    ratio = _ratio(governed.weighted, best_s.weighted if best_s else None)
    return best_s, best_k, (best_s is None or not governed.died) and (ratio is None or ratio >= least)


def _name(trace: Trace | None) -> str | None:
    return None if trace is None else trace.name


def _ratio(a: float, b: float | None) -> float | None:
    return None if not b else round(a / b, 3)


def os_default(profile: str) -> str:
    """The name of what a board of this profile runs out of the box: Raspberry Pi OS sets ondemand with its own
    tunables; other boards' kernels default to schedutil. The model's default variant on every core."""
    p = get_profile(profile)
    plan = KernelPlan("ondemand", p.cpus, "full", "rpi-os") if p.name.startswith("rpi") else KernelPlan(
        "schedutil", p.cpus, "full")
    return plan.label


def _line(scenario: str, profile: str, governed: Trace, best_static: Trace | None, best_kernel: Trace | None,
          figure: Callable[[Trace], float], unit: str, met: bool | None, kernels: list[Trace] = (), **extra) -> dict:
    default = next((k for k in kernels if k.name == os_default(profile)), None)
    if default is not None:
        extra = {"os_default": default.name, "ratio_vs_os_default": _ratio(figure(governed), figure(default)),
                 "os_default_kept_up": round(default.kept_up, 4), **extra}
    return {
        "scenario": scenario, "profile": profile,
        "ratio_vs_best_static": None if best_static is None else _ratio(figure(governed), figure(best_static)),
        "ratio_vs_best_kernel": None if best_kernel is None else _ratio(figure(governed), figure(best_kernel)),
        "best_static": _name(best_static), "best_kernel": _name(best_kernel), "figure": unit,
        "governed": round(figure(governed), 3),
        "best_static_value": None if best_static is None else round(figure(best_static), 3),
        "best_kernel_value": None if best_kernel is None else round(figure(best_kernel), 3),
        **extra, "met": met,
    }


def hot(policy: Policy, profile: str, quick: bool = False) -> tuple[dict, list[Trace]]:
    p = get_profile(profile)
    kw = dict(profile=profile, hours=1.0 if quick else 2.0, ambient_c=40.0, dt=2.0)
    governed = simulate(policy, name="governed", **kw)
    statics = _baselines(static_plans(profile), **kw)
    under = [s for s in statics if s.max_temp_c < p.soft_limit_c]
    kernels = _baselines(kernel_plans(profile), **kw)
    best_s = _best(under, lambda t: t.weighted)
    best_k = _best(kernels, lambda t: t.weighted)
    ratio = _ratio(governed.weighted, best_s.weighted if best_s else None)
    met = governed.max_temp_c < p.soft_limit_c and ratio is not None and ratio >= 1.0
    return _line("hot", profile, governed, best_s, best_k, lambda t: t.weighted, "weighted windows", met, kernels,
                 max_temp_c=round(governed.max_temp_c, 2), soft_limit_c=p.soft_limit_c,
                 best_static_max_temp_c=None if best_s is None else round(best_s.max_temp_c, 2),
                 best_kernel_max_temp_c=None if best_k is None else round(best_k.max_temp_c, 2),
                 target_max_temp_c=f"< {p.soft_limit_c:g}", target_ratio_vs_best_static=">= 1.0"), [governed, best_s, best_k]


def rate(policy: Policy, profile: str, light: bool = False, quick: bool = False) -> tuple[dict, list[Trace]]:
    hz = round(SAMPLE_RATE_HZ / LIGHT_HOP, 3) if light else heavy_rate_hz(profile)
    idle, full = _idle_full(profile)
    hours = 2.0 if quick else 48.0
    mah = _mah_for(idle * (1.0 if quick else 6.0))  # about six hours at idle
    kw = dict(profile=profile, hours=hours, ambient_c=20.0, battery_mah=mah, mains=False, windows_hz=hz)
    governed = simulate(policy, name="governed", dt=5.0, **kw)
    keep = 0.99
    statics = _baselines(static_plans(profile), dt=20.0, **kw)
    kernels = _baselines(kernel_plans(profile), dt=5.0, **kw)
    keeping = [t for t in statics if t.kept_up >= keep]
    keeping_k = [t for t in kernels if t.kept_up >= keep]
    best_s = _best(keeping, lambda t: t.runtime_s)
    best_k = _best(keeping_k, lambda t: t.runtime_s)
    r_s = _ratio(governed.runtime_s, best_s.runtime_s if best_s else None)
    r_k = _ratio(governed.runtime_s, best_k.runtime_s if best_k else None)
    busy_at_min = round(hz / heavy_rate_hz(profile) * 0.5, 3)
    if light:
        met = None  # the base power dominates: every plan that keeps up ties
    else:
        met = governed.kept_up >= keep and r_s is not None and r_s >= 1.0 and r_k is not None and r_k >= 1.2
    return _line("rate-light" if light else "rate", profile, governed, best_s, best_k, lambda t: t.runtime_s / 3600,
                 "runtime h", met, kernels, windows_hz=hz, busy_at_min_freq=busy_at_min, battery_mah=mah,
                 kept_up=round(governed.kept_up, 4), weighted=round(governed.weighted),
                 idle_w=round(idle, 2), full_w=round(full, 2),
                 target_ratio_vs_best_static=">= 1.0", target_ratio_vs_best_kernel=">= 1.2"), [governed, best_s, best_k]


def target(policy: Policy, profile: str, quick: bool = False) -> tuple[dict, list[Trace]]:
    hours = 3.0 if quick else TARGET_H
    idle, full = _idle_full(profile)
    mah = _mah_for((idle + 0.4 * (full - idle)) * hours)
    kw = dict(profile=profile, hours=hours, ambient_c=20.0, battery_mah=mah, mains=False)
    governed = simulate(policy, name="governed", target_h=hours, dt=5.0, **kw)
    statics = _baselines(static_plans(profile, intervals_ms=(0, 50, 200)), dt=20.0, **kw)
    kernels = _baselines(kernel_plans(profile), dt=5.0, **kw)
    best_s, best_k, met = _best_survivors(governed, statics, kernels, 0.95)
    told = governed.governor.plan.target if governed.governor is not None else None
    return _line("target", profile, governed, best_s, best_k, lambda t: t.weighted, "weighted windows", met, kernels,
                 runtime_target_h=hours, battery_mah=mah, lasted=not governed.died,
                 runtime_h=round(governed.runtime_s / 3600, 3), last_target_status=told,
                 target_ratio_vs_best_static=">= 0.95"), [governed, best_s, best_k]


def solar(policy: Policy, profile: str, quick: bool = False) -> tuple[dict, list[Trace]]:
    days = 1.0 if quick else SOLAR_DAYS
    idle, full = _idle_full(profile)
    # A panel whose day yields 1.5 days of idle power (through a 0.85 charger), and a battery for 20 idle hours:
    # a night (the panel falls short of the board from late afternoon to mid-morning) with a margin. The
    # governor is told the night's length: runtime_target_h = 16, how long the battery must last each time.
    peak = round(1.5 * idle * 24.0 / (12.0 * 0.6366 * 0.85), 1)
    mah = _mah_for(idle * 20.0)
    kw = dict(profile=profile, hours=24.0 * days, ambient_c=20.0, battery_mah=mah, soc_pct=60.0, mains=False,
              board_options=dict(solar_peak_w=peak, sunrise_h=6.0, sunset_h=18.0, start_hour=6.0))
    governed = simulate(policy, name="governed", dt=5.0, target_h=SOLAR_NIGHT_H, **kw)
    statics = _baselines(static_plans(profile), dt=20.0, **kw)  # duty cycles only waste base power over days
    kernels = _baselines(kernel_plans(profile), dt=5.0, **kw)
    best_s, best_k, met = _best_survivors(governed, statics, kernels, 1.0)
    line = _line("solar", profile, governed, best_s, best_k, lambda t: t.weighted, "weighted windows", met, kernels,
                 days=days, solar_peak_w=peak, battery_mah=mah, runtime_target_h=SOLAR_NIGHT_H,
                 brownout=governed.died, static_plans_without_brownout=sum(1 for t in statics if not t.died),
                 target_ratio_vs_best_static=">= 1.0")
    return line, [governed, best_s, best_k]


def plug(policy: Policy, profile: str, quick: bool = False) -> tuple[dict, list[Trace]]:
    kw = dict(profile=profile, hours=1.0, ambient_c=25.0, battery_mah=5000.0, soc_pct=11.4, mains=False,
              record_every_s=5.0)
    # A first run finds when the battery pushes the governor into critical; the real run plugs mains in
    # 15 s later, so the governor is inside its dwell time when the reason to stay goes away.
    probe = simulate(policy, name="probe", **kw)
    entered = next((t for t, kind, d in probe.events if kind == "governor_level" and d["to"] == "critical"), None)
    if entered is None:
        return {"scenario": "plug", "profile": profile, "error": "the battery never called for critical",
                "met": False}, [probe]
    plug_at = entered + 15.0
    governed = simulate(policy, plug_at_s=plug_at, name="governed", **kw)
    back = next((t for t, kind, d in governed.events
                 if kind == "governor_level" and d["to"] == "performance" and t >= plug_at), None)
    return_s = None if back is None else round(back - plug_at, 1)
    return {"scenario": "plug", "profile": profile, "critical_at_s": round(entered, 1),
            "plugged_at_s": round(plug_at, 1), "return_s": return_s, "target_return_s": f"<= {policy.dwell_s:g}",
            "ratio_vs_best_static": None, "ratio_vs_best_kernel": None, "best_static": None, "best_kernel": None,
            "met": return_s is not None and return_s <= policy.dwell_s}, [governed]


def run(name: str, policy: Policy, profile: str, quick: bool = False) -> tuple[dict, list[Trace]]:
    """Runs scenario ``name`` on ``profile``.

    Raises:
        ValueError: Unknown scenario (the message lists them).
    """
    if name == "hot":
        return hot(policy, profile, quick)
    if name in ("rate", "rate-light"):
        return rate(policy, profile, light=name == "rate-light", quick=quick)
    if name == "target":
        return target(policy, profile, quick)
    if name == "solar":
        return solar(policy, profile, quick)
    if name == "plug":
        return plug(policy, profile, quick)
    raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")


__all__ = ["SCENARIOS", "KernelPlan", "StaticPlan", "run"]
