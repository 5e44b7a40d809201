"""Closed-loop simulation: the governor, a static plan or a kernel cpufreq governor against the virtual board.

This is how the governor is proven without sensors, and how an operator tries a policy on a board profile
before flashing it (``fieldnode power simulate``). The loop is the real one: the governor reads the board's
sysfs tree through :class:`power.snapshot.BoardReader`, its plan's frequency cap is written to
``scaling_max_freq`` through :class:`drivers.cpufreq.CpuFreq`, and the board's physics react to what was
written. Only the inference load is simulated: a continuous demand (``windows_hz`` None: the board classifies
as many windows as it can) or windows arriving at a fixed rate, each of which must be classified before the next
arrives (:meth:`drivers.sim.board.VirtualBoard.set_windows`).

Every run counts windows classified in time, windows late, and **quality-weighted windows**: a window classified
by a cheaper variant counts as that variant's accuracy relative to the default variant's (``model.json``), a late
or dropped window counts zero.

Three kinds of plan run here, all on the same board in the same way:

* :class:`power.policy.Policy`: the governor (with the measured planner unless ``planner=False``);
* :class:`StaticPlan`: one fixed operating point (frequency, threads, variant, interval), the board's kernel
  governor ``performance`` under the cap;
* :class:`KernelPlan`: what a user gets without fieldnode: a kernel cpufreq governor (``performance``,
  ``powersave``, ``ondemand``, ``schedutil``) choosing the frequency, one variant, all threads.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Mapping

from drivers.cpufreq import CpuFreq
from drivers.sim.board import VirtualBoard
from drivers.sim.clock import SimClock
from drivers.sim.profiles import get_profile
from power.governor import Governor, Plan
from power.planner import Planner, Variant, Work, quality_of
from power.policy import Level, Policy
from power.snapshot import BoardReader

# The bundled vibration model's variants (device/models/vibration/model.json): relative cost and held-out
# int8 accuracy.
DEFAULT_COSTS = {"full": 1.0, "lite": 0.28}
# The board's tree is rewritten every step: in memory where the system has a tmpfs for it, else the default.
_FAST_TMP = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
DEFAULT_ACCURACY = {"full": 0.9702, "lite": 0.955}


@dataclass(frozen=True)
class StaticPlan:
    """A fixed operating point, for baselines: a frequency cap, threads and variant, never changed."""

    cpu_max_khz: int
    threads: int
    variant: str = "auto"
    interval_ms: int = 0

    @property
    def label(self) -> str:
        variant = "default" if self.variant == "auto" else self.variant
        duty = f", 1 per {self.interval_ms} ms" if self.interval_ms else ""
        return f"static {self.cpu_max_khz // 1000} MHz {self.threads}t {variant}{duty}"


@dataclass(frozen=True)
class KernelPlan:
    """A kernel cpufreq governor choosing the frequency, with one variant on all threads: what a user gets
    without fieldnode. ``tunables`` are the governor's (``up_threshold``, ``sampling_rate``, ...) or a preset
    name the virtual board knows (``rpi-os``)."""

    governor: str
    threads: int
    variant: str = "auto"
    tunables: str | Mapping[str, float] | None = None

    @property
    def label(self) -> str:
        variant = "default" if self.variant == "auto" else self.variant
        tun = f" ({self.tunables})" if isinstance(self.tunables, str) else ""
        return f"kernel {self.governor}{tun} {self.threads}t {variant}"


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
    weighted: float = 0.0  # quality-weighted windows classified in time
    windows_arrived: float = 0.0
    windows_late: float = 0.0  # late or dropped (skipped by a duty cycle included)
    runtime_s: float = 0.0  # until the battery died, or the whole run
    died: bool = False
    firmware_throttled: bool = False
    energy_wh: float = 0.0
    governor: Governor | None = None

    @property
    def kept_up(self) -> float:
        """Share of the arrived windows classified in time (1.0 for a continuous demand)."""
        return 1.0 - self.windows_late / self.windows_arrived if self.windows_arrived else 1.0

    def summary(self) -> dict:
        return {"name": self.name, "max_temp_c": round(self.max_temp_c, 2), "inferences": round(self.inferences),
                "weighted": round(self.weighted),
                "cheap_share": round(self.cheap_inferences / self.inferences, 3) if self.inferences else 0.0,
                "kept_up": round(self.kept_up, 4), "runtime_h": round(self.runtime_s / 3600.0, 3),
                "died": self.died, "firmware_throttled": self.firmware_throttled}


def _resolve(name: str, costs: Mapping[str, float], default: str) -> str:
    if name == "auto":
        return default
    if name == "cheapest":
        return min(costs, key=costs.get)
    return name if name in costs else default


def simulate(plan: Policy | StaticPlan | KernelPlan, *, profile: str = "rpi4", hours: float = 2.0,
             ambient_c: float = 25.0, battery_mah: float | None = None, soc_pct: float = 100.0, mains: bool = True,
             plug_at_s: float | None = None, dt: float = 1.0, costs: Mapping[str, float] = DEFAULT_COSTS,
             accuracy: Mapping[str, float] | None = DEFAULT_ACCURACY, default_variant: str = "full",
             windows_hz: float | None = None, planner: bool = True, target_h: float | None = None,
             board_options: Mapping | None = None, record_every_s: float = 10.0, name: str = "",
             root: str | None = None) -> Trace:
    """Runs one closed-loop simulation and returns its trace.

    Args:
        plan: A :class:`Policy` (the governed run), a :class:`StaticPlan` or a :class:`KernelPlan` (baselines).
        profile: Board profile name.
        hours: Simulated duration (a battery run also ends when the battery dies).
        ambient_c: Ambient temperature.
        battery_mah: Battery capacity, or None for a mains-only board.
        soc_pct: Initial battery charge.
        mains: Whether mains is plugged in at the start.
        plug_at_s: Simulated time at which mains is plugged in.
        dt: Physics step.
        costs: Relative cost per model variant.
        accuracy: Accuracy per variant, for the quality weights (None: every variant counts 1.0).
        default_variant: The model's default variant.
        windows_hz: Windows arriving per second, each to be classified before the next; None for a continuous
            demand.
        planner: Give the governor the measured planner (a Policy only).
        target_h: The governor's ``runtime_target_h``: how long the battery must last each time the board goes
            onto it (a Policy with the planner only).
        board_options: More :class:`VirtualBoard` arguments (``solar_peak_w``, ``meter``, ``gauge``, ...).
        record_every_s: Trace sampling period.
        name: Trace name.
        root: Directory for the board's sysfs tree (a temporary one by default).

    Returns:
        The :class:`Trace`.
    """
    quality = quality_of(accuracy, costs, default_variant)
    with tempfile.TemporaryDirectory(prefix="fieldnode-board-", dir=_FAST_TMP) as tmp:
        clock = SimClock()
        opts = dict(board_options or {})
        if isinstance(plan, KernelPlan):
            opts.update(cpu_governor=plan.governor, governor_tunables=plan.tunables)
        board = VirtualBoard(root or tmp, profile, clock=clock, ambient_c=ambient_c, battery_mah=battery_mah,
                             soc_pct=soc_pct, mains=mains, **opts)
        cpufreq = CpuFreq(board.fs)
        trace = Trace(name or getattr(plan, "label", "governed"))
        p = board.profile
        busy = [0.0]  # inference seconds spent on classified windows (what the agent measures per window)

        def work() -> Work:
            return Work(board.windows_done, board.windows_late, busy[0])

        governor = None
        if isinstance(plan, Policy):
            reader = BoardReader(board.fs, clock=clock, slope_window_s=plan.slope_window_s)
            planner_ = None
            if planner:
                planner_ = Planner([Variant(v, c, quality[v]) for v, c in costs.items()], p.frequencies_khz, p.cpus)
            governor = Governor(plan, reader.read, frequencies_khz=p.frequencies_khz, cpus=p.cpus, clock=clock,
                                on_event=lambda kind, data: trace.events.append((clock.monotonic(), kind, data)),
                                planner=planner_, read_work=work, power_model=p.power_w,
                                runtime_target_h=target_h or 0.0)
            trace.governor = governor
            step_s = plan.step_s
            current: Plan | StaticPlan | KernelPlan = governor.step()
        else:
            step_s = float("inf")
            current = plan
        variant = _apply(current, board, cpufreq, costs, default_variant, windows_hz)
        end = hours * 3600.0
        next_step, next_record = step_s, 0.0
        cheap_cost = costs[default_variant]
        while clock.monotonic() < end - 1e-9:
            done0 = board.windows_done
            st = board.advance(min(dt, end - clock.monotonic()), dt)
            done = board.windows_done - done0
            khz = getattr(st, "mean_freq_khz", None) or st.freq_khz  # a kernel governor moves within a step
            service = costs[variant] * p.infer_s_at_max / (p.speedup(current.threads) * khz / p.max_khz)
            busy[0] += done * service
            trace.weighted += done * quality[variant]
            if costs[variant] < cheap_cost:
                trace.cheap_inferences += done
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
                variant = _apply(current, board, cpufreq, costs, default_variant, windows_hz)
            if st.t >= next_record - 1e-9:
                next_record += record_every_s
                trace.t.append(st.t)
                trace.temp_c.append(st.temp_c)
                trace.freq_mhz.append(st.freq_khz / 1000.0)
                trace.level.append(int(governor.level) if governor is not None else -1)
                trace.soc_pct.append(st.soc_pct if st.soc_pct is not None else float("nan"))
        trace.inferences = board.windows_done
        trace.windows_arrived = board.windows_arrived if windows_hz else board.windows_done
        trace.windows_late = (board.windows_late + board.windows_skipped) if windows_hz else 0.0
        trace.runtime_s = clock.monotonic()
        trace.energy_wh = board.energy_wh
        return trace


def _apply(plan, board: VirtualBoard, cpufreq: CpuFreq, costs, default_variant, windows_hz) -> str:
    """What the agent does with a plan, minus the runtime: cap the CPU through sysfs, set the load. Returns the
    variant serving."""
    if getattr(plan, "cpu_max_khz", None) is not None:
        cpufreq.set_max_khz(plan.cpu_max_khz)
    variant = _resolve(plan.variant, costs, default_variant)
    interval_s = getattr(plan, "interval_ms", 0) / 1000.0
    if windows_hz:
        board.set_windows(windows_hz, plan.threads, costs[variant], interval_s=interval_s)
    else:
        board.set_demand(plan.threads, costs[variant], interval_s)
    return variant


def static_plans(profile: str, costs: Mapping[str, float] = DEFAULT_COSTS,
                 intervals_ms: tuple[int, ...] = (0,)) -> list[StaticPlan]:
    """Every static plan on ``profile``: frequency x threads x variant x interval."""
    p = get_profile(profile)
    return [StaticPlan(f, n, v, i) for f in p.frequencies_khz for n in range(1, p.cpus + 1) for v in costs
            for i in intervals_ms]


def kernel_plans(profile: str, costs: Mapping[str, float] = DEFAULT_COSTS) -> list[KernelPlan]:
    """The kernel's own cpufreq governors, each with every variant on all cores (a user without fieldnode runs
    one model; the best of them is the baseline)."""
    p = get_profile(profile)
    govs: list[tuple[str, str | None]] = [("performance", None), ("powersave", None), ("ondemand", None),
                                          ("schedutil", None)]
    if p.name.startswith("rpi"):
        govs.append(("ondemand", "rpi-os"))  # what Raspberry Pi OS sets at boot
    return [KernelPlan(g, p.cpus, v, t) for g, t in govs for v in costs]


def level_names() -> list[str]:
    return [level.label for level in Level]
