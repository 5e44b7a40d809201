"""The agent's side of the power loop: a governor plan applied to a real runtime and the virtual board."""

from __future__ import annotations

import logging

import pytest

from device.agent.applier import PlanApplier
from device.runtime.runtime import Runtime
from drivers.cpufreq import CpuFreq
from drivers.sim.board import VirtualBoard
from drivers.sim.signal import WINDOW, VibrationSource
from power.governor import Plan
from power.policy import Level


def plan(level=Level.PERFORMANCE, khz=1500000, threads=2, variant="auto", interval_ms=0):
    return Plan(level, "test", khz, threads, variant, interval_ms, 10.0)


@pytest.fixture
def rig(tmp_path, settings, vibration):
    events = []
    rt = Runtime(settings(isolation="inline", variant="auto", threads=2), manifest=vibration)
    rt.start()
    board = VirtualBoard(str(tmp_path), "rpi4")
    applier = PlanApplier(CpuFreq(board.fs), rt, on_event=lambda kind, data: events.append((kind, data)))
    yield rt, board, applier, events
    rt.close()


def test_a_saver_plan_caps_the_cpu_and_swaps_to_the_cheapest_variant(rig):
    rt, board, applier, _ = rig
    window = VibrationSource(seed=3).read(WINDOW)
    assert rt.predict(window).variant == "full"
    out = applier.apply(plan(Level.SAVER, khz=900000, threads=1, variant="cheapest", interval_ms=100))
    assert out.cpu_max_khz == {"policy0": 900000}
    assert board.fs.read_int("sys/devices/system/cpu/cpufreq/policy0/scaling_max_freq") == 900000
    assert out.swapped and out.variant == "lite" and out.threads == 1
    assert out.interval_ms == 100
    assert rt.predict(window).variant == "lite"
    # the same plan again changes nothing (no needless hot swap)
    swaps = rt.swaps
    assert applier.apply(plan(Level.SAVER, khz=900000, threads=1, variant="cheapest")).swapped is False
    assert rt.swaps == swaps
    # back to performance: the default variant, more threads, the cap lifted
    out = applier.apply(plan(threads=2))
    assert out.variant == "full" and out.threads == 2 and out.cpu_max_khz == {"policy0": 1500000}


def test_auto_is_the_plans_word_for_what_the_runtime_picks(rig):
    rt, _, applier, events = rig
    applier.apply(plan(Level.SAVER, khz=900000, threads=1, variant="cheapest"))
    assert applier.apply(plan(variant="auto")).variant == "full"
    assert [k for k, _ in events if k == "plan_problem"] == []
    # One vocabulary: "default" is no plan word (a bare .tflite's only variant is named so), here a problem.
    applier.apply(plan(variant="default"))
    assert [k for k, _ in events if k == "plan_problem"] == ["plan_problem"]


def test_an_unknown_variant_falls_back_to_the_default_and_is_reported_once(rig, caplog):
    rt, _, applier, events = rig
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            out = applier.apply(plan(variant="turbo"))
    assert out.variant == "full"
    problems = [d["message"] for kind, d in events if kind == "plan_problem"]
    assert len(problems) == 1 and "'turbo'" in problems[0] and "full, lite" in problems[0]


def test_a_refused_cpufreq_write_still_applies_the_other_knobs(rig, mocker):
    rt, board, applier, _ = rig
    real_open = __import__("os").open

    def refuse(path, flags, *a, **kw):  # error injection: the node is root-owned on a real board
        if str(path).endswith("scaling_max_freq") and flags & __import__("os").O_WRONLY:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *a, **kw)

    mocker.patch("drivers.sysfs.os.open", side_effect=refuse)
    out = applier.apply(plan(Level.SAVER, khz=900000, threads=1, variant="cheapest"))
    assert "not writable" in out.cpufreq_problem and "systemd units" in out.cpufreq_problem
    assert out.cpu_max_khz == {}
    assert out.variant == "lite" and out.threads == 1


def test_no_runtime_and_no_cpufreq_is_a_no_op():
    out = PlanApplier(None, None).apply(plan(interval_ms=250))
    assert out.to_dict() == {"interval_ms": 250, "telemetry_s": 10.0, "swapped": False}


def test_a_waiting_apply_applies_the_latest_plan_not_the_one_it_was_given_before_waiting(rig):
    """The command thread and the governor's thread both apply: whichever waits for the other applies the plan in
    force when its turn comes, so an older plan never overwrites a newer one."""
    import threading

    rt, board, applier, _ = rig
    current = {"plan": plan(Level.SAVER, khz=900000, threads=1, variant="cheapest")}
    with applier._lock:  # the other thread is applying
        waiting = threading.Thread(target=applier.apply, args=(lambda: current["plan"],))
        waiting.start()
        current["plan"] = plan(threads=2)  # the governor stepped meanwhile
    waiting.join(60)
    assert applier.applied.variant == "full" and applier.applied.cpu_max_khz == {"policy0": 1500000}
    out = applier.pin("lite", lambda: current["plan"])  # pinning and applying are one step
    assert out.variant == "lite" and applier.pinned_variant == "lite"
