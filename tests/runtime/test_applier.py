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


def _copy_model(src_manifest, dest, *, accuracy: bool):
    """The bundled model under another version, with or without each variant's accuracy."""
    import json
    import shutil

    from device.runtime.manifest import load_manifest

    shutil.copytree(src_manifest.root, dest)
    doc = json.loads((dest / "model.json").read_text())
    doc["version"] = "2.0.0"
    for spec in doc["variants"].values():
        if not accuracy:
            spec.pop("accuracy", None)
    (dest / "model.json").write_text(json.dumps(doc))
    return load_manifest(str(dest))


def test_the_planner_follows_a_new_model_and_without_accuracies_keeps_its_default_variant(tmp_path, settings,
                                                                                          vibration):
    """An update swaps the model: the power loop gives the governor a planner for the new model's variants; a
    model.json without each variant's accuracy is planned with its default variant only (never trading accuracy
    for energy unasked)."""
    from device.agent.loops import PowerLoop
    from device.agent.wiring import planner_for_model
    from drivers.accel import discover
    from power.governor import Governor
    from power.policy import Policy
    from power.snapshot import BoardReader

    rt = Runtime(settings(isolation="inline", variant="auto", threads=2), manifest=vibration)
    rt.start()
    try:
        board = VirtualBoard(str(tmp_path / "board"), "rpi4")
        policies = CpuFreq(board.fs).policies()
        accel = discover(board.fs)

        def planner_for(manifest):
            return planner_for_model(manifest, policies, accel)

        gov = Governor(Policy.from_config(), BoardReader(board.fs, clock=board.clock).read, clock=board.clock,
                       frequencies_khz=policies[0].frequencies_khz, planner=planner_for(rt.manifest))
        loop = PowerLoop(gov, PlanApplier(CpuFreq(board.fs), rt), step_s=5.0, runtime=rt, planner_for=planner_for)
        assert set(gov.planner.variants) == {"full", "lite"}
        assert gov.planner.variants["lite"].quality == pytest.approx(0.955 / 0.9702)
        loop.step()
        rt.switch_model(_copy_model(vibration, tmp_path / "v2", accuracy=False))
        loop.step()
        assert set(gov.planner.variants) == {"full"}  # no accuracies: the default variant only
        assert gov.plan.variant in ("full", "auto")
        rt.switch_model(_copy_model(vibration, tmp_path / "v3", accuracy=True))
        loop.step()
        assert set(gov.planner.variants) == {"full", "lite"}
    finally:
        rt.close()
