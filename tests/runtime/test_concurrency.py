"""Plans applied from two threads at once (the command thread and the governor thread) are applied one after
the other: no change is applied twice, none is lost, and the board never ends in a mix of two plans.

Each round releases two threads together from a barrier. The checks hold for every interleaving when plan
application is serial, and fail when it is not: a second thread that reads the runtime's requested variant
while the first one is still loading the new engine swaps a second time (``swaps`` counts it), and two plans
whose CPU caps and model knobs interleave leave the cap of one and the variant of the other.
"""

from __future__ import annotations

import threading

import pytest

from device.agent.applier import PlanApplier
from device.runtime.runtime import Runtime
from drivers.cpufreq import CpuFreq
from drivers.sim.board import VirtualBoard
from power.governor import Plan
from power.policy import Level

ROUNDS = 12
CAP = "sys/devices/system/cpu/cpufreq/policy0/scaling_max_freq"


def together(*calls):
    """Runs each call on its own thread, released at the same moment; returns results (or raises)."""
    barrier = threading.Barrier(len(calls))
    out: list = [None] * len(calls)
    errors: list = []

    def run(i, fn):
        barrier.wait()
        try:
            out[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return out


@pytest.fixture
def runtime(settings, vibration):
    rt = Runtime(settings(isolation="process", variant="full", threads=2, warmup_runs=0), manifest=vibration)
    rt.start()
    yield rt
    rt.close()


def test_the_same_change_asked_by_two_threads_swaps_once(runtime):
    targets = [("lite", 1), ("full", 2)]
    for i in range(ROUNDS):
        variant, threads = targets[i % 2]
        swapped = together(lambda: runtime.reconfigure(variant=variant, threads=threads),
                           lambda: runtime.reconfigure(variant=variant, threads=threads))
        assert sorted(swapped) == [False, True], f"round {i}: {swapped}"
        assert runtime.swaps == i + 1
        assert (runtime.variant, runtime.status()["threads"]) == (variant, threads)


def plan(level, khz, threads, variant):
    return Plan(level, "test", khz, threads, variant, 0, 10.0)


def test_plans_applied_by_the_command_and_governor_threads_leave_exactly_one_plan_in_force(tmp_path, runtime):
    board = VirtualBoard(str(tmp_path), "rpi4")
    applier = PlanApplier(CpuFreq(board.fs), runtime)
    saver = plan(Level.SAVER, 900000, 1, "cheapest")
    performance = plan(Level.PERFORMANCE, 1500000, 2, "auto")
    expected = {900000: ("lite", 1), 1500000: ("full", 2)}
    for i in range(ROUNDS):
        # one round asks both threads for the same plan (one swap, not two), the next for different plans
        first, second = (saver, saver) if i % 2 == 0 else (performance, saver) if i % 4 == 1 else (saver, performance)
        swaps = runtime.swaps
        outs = together(lambda: applier.apply(first), lambda: applier.apply(second))
        cap = board.fs.read_int(CAP)
        state = (runtime.variant, runtime.status()["threads"])
        assert state == expected[cap], f"round {i}: cap {cap} with {state}: a mix of two plans"
        assert applier.applied.cpu_max_khz == {"policy0": cap}
        assert (applier.applied.variant, applier.applied.threads) == state
        for out, p in zip(outs, (first, second)):
            assert out.interval_ms == p.interval_ms
        if first is second:
            assert runtime.swaps - swaps <= 1, f"round {i}: one change swapped {runtime.swaps - swaps} times"
