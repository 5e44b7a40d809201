"""Applies the power governor's :class:`power.governor.Plan` to the board and the runtime.

The governor only decides; this is the agent's side of the loop. For each plan it:

* caps every cpufreq policy at ``plan.cpu_max_khz`` through :class:`drivers.cpufreq.CpuFreq` (a refused write
  is reported once with its remedy by CpuFreq, and the other knobs are still applied);
* resolves the plan's variant (``auto``: what the runtime picks by itself; ``cheapest``: the lowest-cost
  variant this board can run; or a name) and its thread count, and hot-swaps the runtime in one swap when
  either changed (no request is dropped, see :meth:`device.runtime.runtime.Runtime.reconfigure`);
* returns the inference interval and telemetry period for the agent's loops.

Plans arrive from two threads (the governor's loop and operators' commands); :meth:`PlanApplier.apply` runs
one plan at a time, so the frequency cap and the model knobs in force always come from the same plan.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from device.errors import FieldnodeError
from device.results import Applied
from drivers.cpufreq import CpuFreq
from drivers.errors import SysfsError

log = logging.getLogger(__name__)


class PlanApplier:
    """Turns plans into writes and hot swaps.

    Args:
        cpufreq: The board's cpufreq, or None when the agent must not touch the CPU frequency.
        runtime: The agent's :class:`device.runtime.runtime.Runtime`, or None (no model to adjust).
        on_event: ``on_event(kind, data)`` for problems applying a plan.
    """

    def __init__(self, cpufreq: CpuFreq | None, runtime=None, on_event: Callable[[str, dict], None] | None = None):
        self.cpufreq = cpufreq
        self.runtime = runtime
        self._on_event = on_event
        self._lock = threading.Lock()  # one plan at a time: the governor's thread and the command thread
        self._warned: set[str] = set()
        self.applied: Applied | None = None  # what the last plan put in force
        self.pinned_variant: str | None = None  # set by the operator's `variant` command; None: the plan decides

    def resolve_variant(self, name: str) -> str:
        """The runtime variant (or ``auto``) a plan's variant name stands for on this board."""
        manifest = self.runtime.manifest
        if name == "auto":
            return "auto"
        if name == "cheapest":
            accel = (self.runtime.status().get("delegate") or "") == "edgetpu"
            usable = [v for v in manifest.variants.values() if v.requires is None or accel]
            return min(usable, key=lambda v: (v.cost, v.name)).name if usable else "auto"
        if name in manifest.variants:
            return name
        self._problem(f"variant:{name}", f"the plan asks for variant {name!r}, which model {manifest.name} does not "
                                         f"have ({', '.join(manifest.variants)}); using its default")
        return "auto"

    def apply(self, plan) -> Applied:
        """Applies ``plan``; never raises for a board or model that cannot do what it asks.

        Args:
            plan: The plan, or a function returning it (the governor's current plan), called under the lock: the
                governor's thread and the command thread then always apply the latest plan, never an older one
                read before waiting for the other.

        Returns:
            What is in force: the cap written per policy, the variant and threads serving, the interval and
            telemetry period, and whether the runtime swapped.
        """
        with self._lock:
            return self._apply(plan() if callable(plan) else plan)

    def pin(self, variant: str | None, plan) -> Applied:
        """Pins a variant (``None``: the plan decides again) and applies ``plan`` (as for :meth:`apply`), in one
        step under the lock."""
        with self._lock:
            self.pinned_variant = variant
            return self._apply(plan() if callable(plan) else plan)

    def _apply(self, plan) -> Applied:
        cap = problem = variant = threads = None
        swapped = False
        if self.cpufreq is not None and plan.cpu_max_khz is not None:
            try:
                cap = self.cpufreq.set_max_khz(plan.cpu_max_khz)
            except (SysfsError, ValueError) as exc:
                self._problem("cpufreq", f"cannot cap the CPU frequency: {exc}")
            problem = self.cpufreq.permission_problem
        if self.runtime is not None:
            wanted = self.pinned_variant or self.resolve_variant(plan.variant)
            try:
                swapped = self.runtime.reconfigure(variant=wanted, threads=plan.threads)
            except (FieldnodeError, ValueError) as exc:
                self._problem(f"swap:{wanted}:{plan.threads}", f"cannot switch to variant {wanted} with "
                                                               f"{plan.threads} threads: {exc}")
            variant, threads = self.runtime.variant, self.runtime.status()["threads"]
        self.applied = Applied(interval_ms=plan.interval_ms, telemetry_s=plan.telemetry_s, swapped=bool(swapped),
                               variant=variant, threads=threads, cpu_max_khz=cap, cpufreq_problem=problem)
        return self.applied

    def _problem(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning("%s", message)
        if self._on_event is not None:
            self._on_event("plan_problem", {"message": message})
