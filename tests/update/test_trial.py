"""The health gate's verdicts, with a hand-wound clock: crash and non-finite output at once, latency and shadow
agreement from the minimum windows on, pass only on time *and* windows, and a verdict that never changes."""

from __future__ import annotations

import math

import pytest

from device.update.trial import Fail, Pass, Trial, TrialSettings
from drivers.sim.clock import SimClock

S = TrialSettings(trial_s=10.0, min_windows=5, latency_factor=1.5, min_agreement=0.8)
SCORES = [0.7, 0.1, 0.1, 0.1]


def feed(trial: Trial, n: int, latency_ms: float = 1.0, label: str = "normal") -> None:
    for _ in range(n):
        trial.observe(SCORES, latency_ms, label)


def test_passes_when_the_time_has_passed_and_the_windows_were_seen():
    clock = SimClock()
    t = Trial(7, S, baseline_p50_ms=1.0, clock=clock, name="vibration")
    feed(t, 5)
    assert t.verdict() is None  # enough windows, not enough time
    clock.advance(10.0)
    v = t.verdict()
    assert isinstance(v, Pass) and v.passed and v.code is None
    assert v.figures["windows"] == 5 and v.figures["p50_ms"] == pytest.approx(1.0, rel=0.02)
    assert v.as_json()["verdict"] == "pass" and t.status()["verdict"] == "pass"


def test_an_idle_board_stays_on_trial_until_the_windows_come():
    clock = SimClock()
    t = Trial(7, S, clock=clock)
    clock.advance(1000.0)
    feed(t, 4)
    assert t.verdict() is None  # time alone never commits a model
    feed(t, 1)
    assert isinstance(t.verdict(), Pass)


@pytest.mark.parametrize("how", ["crash", "nan", "inf"])
def test_a_crash_or_a_non_finite_output_fails_at_once(how):
    clock = SimClock()
    t = Trial(3, S, clock=clock, name="vibration")
    feed(t, 1)
    if how == "crash":
        t.crashed("worker_crashed: the worker died (SIGSEGV)")
    else:
        t.observe([0.5, float(how), 0.1, 0.1], 1.0, "imbalance")
    v = t.verdict()
    assert isinstance(v, Fail) and v.code == "trial_failed" and not v.passed
    assert "vibration v3" in v.reason
    assert ("SIGSEGV" in v.reason) if how == "crash" else ("non-finite" in v.reason and "window 2" in v.reason)
    assert v.error().code == "trial_failed" and str(v.error()) == v.reason


def test_too_slow_fails_only_from_the_minimum_windows_on():
    clock = SimClock()
    t = Trial(4, S, baseline_p50_ms=1.0, clock=clock)
    feed(t, 4, latency_ms=2.0)
    assert t.verdict() is None  # 2x slower, but too few windows to judge
    feed(t, 1, latency_ms=2.0)
    v = t.verdict()
    assert isinstance(v, Fail) and "too slow" in v.reason and "1.5 x" in v.reason
    assert v.figures["p50_ms"] == pytest.approx(2.0, rel=0.02) and v.figures["baseline_ms"] == 1.0


def test_within_the_latency_factor_passes():
    clock = SimClock()
    t = Trial(4, S, baseline_p50_ms=1.0, clock=clock)
    feed(t, 5, latency_ms=1.4)
    clock.advance(10.0)
    assert isinstance(t.verdict(), Pass)


def test_without_a_baseline_the_shadows_latency_stands_in():
    clock = SimClock()
    t = Trial(4, S, baseline_p50_ms=None, clock=clock)
    for _ in range(5):
        t.observe(SCORES, 3.0, "normal")
        assert t.verdict() is None  # no baseline yet: the shadow has fewer than the minimum windows
        t.shadow("normal", "normal", latency_ms=1.0)
    v = t.verdict()
    assert isinstance(v, Fail) and "too slow" in v.reason and v.figures["baseline_ms"] == pytest.approx(1.0, rel=0.02)


def test_with_no_baseline_at_all_latency_is_not_judged():
    clock = SimClock()
    t = Trial(4, S, clock=clock)
    feed(t, 5, latency_ms=500.0)
    clock.advance(10.0)
    v = t.verdict()
    assert isinstance(v, Pass) and v.figures["baseline_ms"] is None


def test_disagreement_with_the_shadow_fails_from_the_minimum_windows_on():
    clock = SimClock()
    t = Trial(5, S, clock=clock)
    for i in range(4):
        t.observe(SCORES, 1.0, "imbalance")
        t.shadow("imbalance", "normal")  # every window disagrees
        assert t.verdict() is None  # too few shadowed windows to judge
    t.observe(SCORES, 1.0, "imbalance")
    t.shadow("imbalance", "normal")
    v = t.verdict()
    assert isinstance(v, Fail) and "disagrees" in v.reason and "0 of 5" in v.reason
    assert v.figures["agreement"] == 0.0 and v.figures["shadowed"] == 5


def test_agreement_at_the_threshold_passes_and_is_reported():
    clock = SimClock()
    t = Trial(5, S, clock=clock)
    for i in range(10):
        t.observe(SCORES, 1.0, "normal")
        t.shadow("normal", "normal" if i < 8 else "imbalance")
    clock.advance(10.0)
    v = t.verdict()
    assert isinstance(v, Pass) and v.figures["agreement"] == 0.8 and v.figures["shadowed"] == 10


def test_a_shadow_with_too_few_windows_is_not_judged_and_says_so():
    clock = SimClock()
    t = Trial(5, S, clock=clock)
    feed(t, 5)
    t.shadow("normal", "imbalance")  # one disagreeing window (the shadow was then paused)
    clock.advance(10.0)
    v = t.verdict()
    assert isinstance(v, Pass) and v.figures["agreement"] is None and v.figures["shadowed"] == 1


def test_a_verdict_is_final():
    clock = SimClock()
    t = Trial(6, S, clock=clock)
    t.crashed("worker_timeout: no answer within 5000 ms")
    first = t.verdict()
    feed(t, 50)
    clock.advance(100.0)
    t.crashed("another")
    assert t.verdict() is first and t.windows == 0  # nothing is counted after the verdict
    passed = Trial(6, S, clock=clock)
    feed(passed, 5)
    clock.advance(10.0)
    v = passed.verdict()
    passed.crashed("late")
    passed.observe([math.nan], 1.0, "x")
    assert passed.verdict() is v and isinstance(v, Pass)


def test_status_before_a_verdict():
    clock = SimClock()
    t = Trial(9, S, baseline_p50_ms=2.0, clock=clock)
    feed(t, 2, latency_ms=1.0)
    clock.advance(3.0)
    st = t.status()
    assert st["version"] == 9 and st["windows"] == 2 and st["verdict"] is None and st["reason"] is None
    assert st["elapsed_s"] == 3.0 and st["baseline_ms"] == 2.0 and st["agreement"] is None


def test_settings_from_the_config():
    from device import config

    cfg = config.loads("[update]\ntrial_s = 2\ntrial_min_windows = 3\nlatency_factor = 2\nmin_agreement = 0.5\n"
                       "shadow = false\n")
    assert TrialSettings.from_config(cfg.update) == TrialSettings(2.0, 3, 2.0, 0.5)
    assert cfg.update.shadow is False and config.Config().update.shadow is True
