"""The health gate: whether a model on trial stays (commit) or goes (rollback), from what the agent saw.

:class:`Trial` is pure: no threads, no I/O, a clock passed in. The agent feeds it each result of the new model
(:meth:`Trial.observe`), each worker crash or failed request (:meth:`Trial.crashed`) and, when the previous
model classifies the same window as a *shadow*, both labels (:meth:`Trial.shadow`); it asks
:meth:`Trial.verdict` after each window. The rules, in the order they are judged:

1. **At once**: a worker crash, hang or quarantine of the new model, or a non-finite output, fails the trial.
2. **Latency**, from ``min_windows`` windows on: the new model's median latency above ``latency_factor`` times
   the previous model's fails it. The previous model's median is the one measured on this board before the
   switch (the runtime's histogram); when there is none (a trial resumed after a reboot) the shadow's median on
   the same windows stands in, once it has ``min_windows`` of them; with neither, latency is not judged (the
   verdict says ``baseline_ms: null``).
3. **Agreement**, from ``min_windows`` shadowed windows on: the share of windows where both models give the same
   label below ``min_agreement`` fails it. A trial whose shadow could not run enough windows (it could not
   start, or the governor's saver and critical levels paused it) is decided without it, and says so
   (``agreement: null`` and the count of ``shadowed`` windows).
4. **Pass** once ``trial_s`` has passed since the start *and* the new model classified ``min_windows`` windows.
   An idle board (no windows) stays on trial until the windows come: a model is committed on evidence, never on
   time alone (the new model serves meanwhile, and the store refuses another install until the verdict).

A verdict is final: later observations do not change it. A trial resumed after a reboot starts again from zero
windows (the store counts the restarts and rolls back a model that keeps taking the board down).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from device.clock import SYSTEM_CLOCK
from device.runtime.histogram import LatencyHistogram
from device.update.errors import HealthGateFailed


@dataclass(frozen=True)
class TrialSettings:
    """The gate's thresholds (``[update]``: ``trial_s``, ``trial_min_windows``, ``latency_factor``,
    ``min_agreement``)."""

    trial_s: float = 600.0
    min_windows: int = 50
    latency_factor: float = 1.5
    min_agreement: float = 0.9

    @classmethod
    def from_config(cls, update) -> TrialSettings:
        """From the ``[update]`` section (:class:`device.update.config.UpdateConfig`)."""
        return cls(update.trial_s, update.trial_min_windows, update.latency_factor, update.min_agreement)


@dataclass(frozen=True)
class Pass:
    """The model stays: the figures it passed with."""

    figures: dict
    passed = True
    code = None
    reason = None

    def as_json(self) -> dict:
        return {"verdict": "pass", **self.figures}


@dataclass(frozen=True)
class Fail:
    """The model goes: why (one sentence with the figures), the code (``trial_failed``) and the figures."""

    reason: str
    figures: dict
    code: str = HealthGateFailed.code
    passed = False

    def error(self) -> HealthGateFailed:
        return HealthGateFailed(self.reason)

    def as_json(self) -> dict:
        return {"verdict": "fail", "reason": self.reason, "code": self.code, **self.figures}


class Trial:
    """The watch over one model on trial (see the module docstring for the rules).

    Args:
        version: the release version on trial (for the figures and the reason).
        settings: the thresholds.
        baseline_p50_ms: the previous model's median latency on this board, or None when unknown.
        name: the model's name, for messages.
        clock: its ``monotonic()`` times the trial.
    """

    def __init__(self, version: int, settings: TrialSettings | None = None, baseline_p50_ms: float | None = None,
                 *, name: str = "model", clock=SYSTEM_CLOCK) -> None:
        self.version, self.name = version, name
        self.settings = settings or TrialSettings()
        self.baseline_ms = baseline_p50_ms if baseline_p50_ms and baseline_p50_ms > 0 else None
        self._clock = clock
        self.started = clock.monotonic()
        self._mu = threading.Lock()  # the inference loop feeds it; the runtime's events may come from others
        self._latency = LatencyHistogram()
        self._shadow_latency = LatencyHistogram()
        self.windows = 0
        self.shadowed = 0
        self.agreed = 0
        self._verdict: Pass | Fail | None = None

    # --- what the agent feeds it ----------------------------------------------------------------------

    def observe(self, scores, latency_ms: float, label: str) -> None:
        """One result of the new model: its scores (any array-like), its latency and its label."""
        finite = bool(np.all(np.isfinite(np.asarray(scores, dtype=np.float64))))
        with self._mu:
            if self._verdict is not None:
                return
            self.windows += 1
            if math.isfinite(latency_ms) and latency_ms >= 0:
                self._latency.record(int(latency_ms * 1e6))
            if not finite:
                self._fail(f"{self._what()} gave a non-finite output (window {self.windows}, label {label!r})")

    def crashed(self, reason: str) -> None:
        """The new model's worker crashed, hung or was quarantined, or a request to it failed: fails at once."""
        with self._mu:
            if self._verdict is None:
                self._fail(f"{self._what()} failed its trial: {reason}")

    def shadow(self, label_new: str, label_old: str, latency_ms: float | None = None) -> None:
        """The previous model's label for the window the new model labelled ``label_new`` (and, optionally, the
        previous model's latency on it: the baseline when none was measured before the switch)."""
        with self._mu:
            if self._verdict is not None:
                return
            self.shadowed += 1
            self.agreed += label_new == label_old
            if latency_ms is not None and math.isfinite(latency_ms) and latency_ms >= 0:
                self._shadow_latency.record(int(latency_ms * 1e6))

    # --- the verdict ----------------------------------------------------------------------------------

    def verdict(self) -> Pass | Fail | None:
        """None while undecided, else the (final) :class:`Pass` or :class:`Fail`."""
        with self._mu:
            if self._verdict is not None:
                return self._verdict
            s = self.settings
            if self.windows >= s.min_windows:
                p50, base = self._latency.percentile_ms(50), self._baseline()
                if p50 is not None and base is not None and p50 > s.latency_factor * base:
                    return self._fail(f"{self._what()} is too slow: median {p50:.3f} ms over {self.windows} windows, "
                                      f"more than {s.latency_factor:g} x the previous model's {base:.3f} ms")
            if self.shadowed >= s.min_windows and self.agreed / self.shadowed < s.min_agreement:
                return self._fail(f"{self._what()} disagrees with the previous model: same label on "
                                  f"{self.agreed} of {self.shadowed} windows ({self.agreed / self.shadowed:.0%}), "
                                  f"below the {s.min_agreement:.0%} required")
            if self.windows >= s.min_windows and self.elapsed_s() >= s.trial_s:
                self._verdict = Pass(self._figures())
            return self._verdict

    def elapsed_s(self) -> float:
        return max(0.0, self._clock.monotonic() - self.started)

    def status(self) -> dict:
        """The trial's figures so far, and its verdict once there is one."""
        with self._mu:
            out = {"version": self.version, **self._figures()}
            v = self._verdict
        out["verdict"] = None if v is None else v.as_json()["verdict"]
        out["reason"] = None if v is None else v.reason
        return out

    # --- internals (lock held) ------------------------------------------------------------------------

    def _baseline(self) -> float | None:
        if self.baseline_ms is not None:
            return self.baseline_ms
        if self._shadow_latency.count >= self.settings.min_windows:
            return self._shadow_latency.percentile_ms(50)
        return None

    def _figures(self) -> dict:
        agreement = self.agreed / self.shadowed if self.shadowed >= self.settings.min_windows else None
        p50, base = self._latency.percentile_ms(50), self._baseline()
        return {"windows": self.windows, "elapsed_s": round(self.elapsed_s(), 3),
                "p50_ms": None if p50 is None else round(p50, 4),
                "baseline_ms": None if base is None else round(base, 4),
                "shadowed": self.shadowed, "agreement": None if agreement is None else round(agreement, 4)}

    def _fail(self, reason: str) -> Fail:
        self._verdict = Fail(reason, self._figures())
        return self._verdict

    def _what(self) -> str:
        return f"{self.name} v{self.version}"
