"""Closed-loop simulation: the governor (or a static plan) against the virtual board, in simulated time.

This is how the governor is proven without sensors, and how an operator tries a policy on a board profile
before flashing it (``fieldnode power simulate``). The loop is the real one: the governor reads the board's
sysfs tree through :class:`power.snapshot.BoardReader`, its plan's frequency cap is written to
``scaling_max_freq`` through :class:`drivers.cpufreq.CpuFreq`, and the board's physics react to what was
written. Only the inference load is simulated (:meth:`drivers.sim.board.VirtualBoard.set_demand`): a
continuous demand served at the rate the plan's threads, variant, interval and the board's frequency allow.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Mapping

from drivers.cpufreq import CpuFreq
from drivers.sim.board import VirtualBoard
from drivers.sim.clock import SimClock
from power.governor import Governor, Plan
from power.policy import Level, Policy
from power.snapshot import BoardReader

DEFAULT_COSTS = {"full": 1.0, "lite": 0.25}


@dataclass(frozen=True)
class StaticPlan:
    """A fixed operating point, for baselines: a frequency cap, threads and variant, never changed."""

    cpu_max_khz: int
    threads: int
    variant: str = "auto"
    interval_ms: int = 0


@dataclass
class Trace:
    """What happened in one simulated run."""

    name: str
    t: list[float] = field(default_factory=list)
    temp_c: list[float] = field(default_factory=list)
    freq_mhz: list[float] = field(default_factory=list)
    level: list[int] = field(default_factory=list)
    soc_pct: list[float] = field(default_factory=list)
    events: list[tuple[float, str, dict]] = field(default_factory=list)
    max_temp_c: float = float("-inf")
    inferences: float = 0.0
    cheap_inferences: float = 0.0  # inferences served by a variant cheaper than the default
    runtime_s: float = 0.0  # until the battery died, or the whole run
    died: bool = False
    firmware_throttled: bool = False

    def summary(self) -> dict:
        return {"name": self.name, "max_temp_c": round(self.max_temp_c, 2), "inferences": round(self.inferences),
                "cheap_share": round(self.cheap_inferences / self.inferences, 3) if self.inferences else 0.0,
                "runtime_h": round(self.runtime_s / 3600.0, 3), "died": self.died,
                "firmware_throttled": self.firmware_throttled}


def _variant_cost(name: str, costs: Mapping[str, float], default: str) -> tuple[float, bool]:
    """Cost of a plan variant name and whether it is cheaper than the default."""
    if name == "auto":
        name = default
    elif name == "cheapest":
        name = min(costs, key=costs.get)
    cost = costs.get(name, costs[default])
    return cost, cost < costs[default]


def simulate(plan: Policy | StaticPlan, *, profile: str = "rpi4", hours: float = 2.0, ambient_c: float = 25.0,
             battery_mah: float | None = None, soc_pct: float = 100.0, mains: bool = True,
             plug_at_s: float | None = None, dt: float = 1.0, costs: Mapping[str, float] = DEFAULT_COSTS,
             default_variant: str = "full", record_every_s: float = 10.0, name: str = "",
             root: str | None = None) -> Trace:
    """Runs one closed-loop simulation and returns its trace.

    Args:
        plan: A :class:`Policy` (the governed run) or a :class:`StaticPlan` (a baseline).
        profile: Board profile name.
        hours: Simulated duration (a battery run also ends when the battery dies).
        ambient_c: Ambient temperature.
        battery_mah: Battery capacity, or None for a mains-only board.
        soc_pct: Initial battery charge.
        mains: Whether mains is plugged in at the start.
        plug_at_s: Simulated time at which mains is plugged in.
        dt: Physics step.
        costs: Relative cost per model variant.
        default_variant: The model's default variant.
        record_every_s: Trace sampling period.
        name: Trace name.
        root: Directory for the board's sysfs tree (a temporary one by default).

    Returns:
        The :class:`Trace`.
    """
    with tempfile.TemporaryDirectory(prefix="fieldnode-board-") as tmp:
        clock = SimClock()
        board = VirtualBoard(root or tmp, profile, clock=clock, ambient_c=ambient_c, battery_mah=battery_mah,
                             soc_pct=soc_pct, mains=mains)
        cpufreq = CpuFreq(board.fs)
        trace = Trace(name or (type(plan).__name__ if isinstance(plan, StaticPlan) else "governed"))
        governor = None
        if isinstance(plan, Policy):
            reader = BoardReader(board.fs, clock=clock, slope_window_s=plan.slope_window_s)
            governor = Governor(plan, reader.read, frequencies_khz=board.profile.frequencies_khz,
                                cpus=board.profile.cpus, clock=clock,
                                on_event=lambda kind, data: trace.events.append((clock.monotonic(), kind, data)))
            step_s = plan.step_s
            current: Plan | StaticPlan = governor.step()
        else:
            step_s = float("inf")
            current = plan
        _apply(current, board, cpufreq, costs, default_variant)
        end = hours * 3600.0
        next_step, next_record = step_s, 0.0
        cheap = _variant_cost(current.variant, costs, default_variant)[1]
        while clock.monotonic() < end - 1e-9:
            before = board.inferences
            st = board.advance(min(dt, end - clock.monotonic()), dt)
            if cheap:
                trace.cheap_inferences += board.inferences - before
            trace.max_temp_c = max(trace.max_temp_c, st.temp_c)
            trace.firmware_throttled |= bool(st.throttled & 0xE)  # temperature bits, not under-voltage
            if plug_at_s is not None and not st.mains and st.t >= plug_at_s:
                board.plug(True)
            if not st.alive:
                trace.died = True
                break
            if governor is not None and st.t >= next_step - 1e-9:
                next_step += step_s
                current = governor.step()
                cheap = _apply(current, board, cpufreq, costs, default_variant)
            if st.t >= next_record - 1e-9:
                next_record += record_every_s
                trace.t.append(st.t)
                trace.temp_c.append(st.temp_c)
                trace.freq_mhz.append(st.freq_khz / 1000.0)
                trace.level.append(int(governor.level) if governor is not None else -1)
                trace.soc_pct.append(st.soc_pct if st.soc_pct is not None else float("nan"))
        trace.inferences = board.inferences
        trace.runtime_s = clock.monotonic()
        return trace


def _apply(plan: Plan | StaticPlan, board: VirtualBoard, cpufreq: CpuFreq, costs, default_variant) -> bool:
    """What the agent does with a plan, minus the runtime: cap the CPU through sysfs, set the load."""
    if plan.cpu_max_khz is not None:
        cpufreq.set_max_khz(plan.cpu_max_khz)
    cost, cheap = _variant_cost(plan.variant, costs, default_variant)
    board.set_demand(plan.threads, cost, plan.interval_ms / 1000.0)
    return cheap


def level_names() -> list[str]:
    return [level.label for level in Level]
