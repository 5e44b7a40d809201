"""The agent's typed values: one inference result, and what a plan put in force.

They travel as JSON (MQTT payloads, the control socket, the demo's score), so each has ``to_dict()``; inside
the agent they are values with named fields, not loose dicts whose keys each reader must guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Result:
    """One classified window.

    Attributes:
        model: The model that answered (even if a switch came since the request).
        variant: Its variant.
        label: The winning label. score: Its score, rounded to 5 digits.
        scores: Every label's score.
        latency_ms: From the request to the answer, in the agent (the worker's handoff included).
        time: Wall-clock time of the result (the board's clock).
        simulated: The window came from a virtual board's simulated sensor.
        id: The spool id it was published under, or None without a link.
    """

    model: str
    variant: str
    label: str
    score: float
    scores: dict
    latency_ms: float
    time: float
    simulated: bool
    id: Optional[int] = None

    def to_dict(self) -> dict:
        d = {"model": self.model, "variant": self.variant, "label": self.label, "score": self.score,
             "scores": dict(self.scores), "latency_ms": self.latency_ms, "time": self.time,
             "simulated": self.simulated}
        if self.id is not None:
            d["id"] = self.id
        return d


@dataclass(frozen=True)
class Applied:
    """What one plan put in force (:meth:`device.agent.applier.PlanApplier.apply`).

    Attributes:
        interval_ms: Minimum time between inferences. telemetry_s: The telemetry period.
        swapped: Whether the runtime hot-swapped (variant or threads changed).
        variant: The variant serving after the plan, or None without a runtime.
        threads: Its interpreter threads, or None without a runtime.
        cpu_max_khz: The cap written per cpufreq policy, when one was written.
        cpufreq_problem: Why the cap cannot be written (permissions), when it cannot.
    """

    interval_ms: int
    telemetry_s: float
    swapped: bool = False
    variant: Optional[str] = None
    threads: Optional[int] = None
    cpu_max_khz: Optional[dict] = None
    cpufreq_problem: Optional[str] = None

    def to_dict(self) -> dict:
        d = {"interval_ms": self.interval_ms, "telemetry_s": self.telemetry_s, "swapped": self.swapped}
        if self.cpu_max_khz is not None:
            d["cpu_max_khz"] = self.cpu_max_khz
        if self.cpufreq_problem is not None:
            d["cpufreq_problem"] = self.cpufreq_problem
        if self.variant is not None or self.threads is not None:
            d["variant"], d["threads"] = self.variant, self.threads
        return d
