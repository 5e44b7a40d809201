"""The power loop owns the governor and the plan applier behind one lock: an operator's override and a governor
step never apply plans at the same time, and the plan in force is always the governor's latest."""

from __future__ import annotations

import threading

from device.agent.applier import PlanApplier
from device.agent.loops import PowerLoop
from drivers.cpufreq import CpuFreq
from drivers.sim.board import VirtualBoard
from power.governor import Governor
from power.policy import Policy
from power.snapshot import BoardReader

CAP = "sys/devices/system/cpu/cpufreq/policy0/scaling_max_freq"


def make_loop(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4")
    policy = Policy.from_config()
    fs = board.fs
    reader = BoardReader(fs, clock=board.clock)
    freqs = CpuFreq(fs).policies()[0].frequencies_khz
    governor = Governor(policy, reader.read, frequencies_khz=freqs, clock=board.clock)
    return board, governor, PowerLoop(governor, PlanApplier(CpuFreq(fs), None), step_s=policy.step_s)


class Gate:
    """Error injection: the governor's read of the board blocks while the gate is shut."""

    def __init__(self, fn):
        self.fn, self.open, self.inside = fn, threading.Event(), threading.Event()

    def __call__(self):
        self.inside.set()
        self.open.wait(30)
        return self.fn()


def test_an_override_waits_for_a_step_in_progress_and_its_plan_is_the_one_in_force(tmp_path):
    board, governor, loop = make_loop(tmp_path)
    gate = Gate(governor._read)
    governor._read = gate
    stepper = threading.Thread(target=loop.step)
    stepper.start()
    assert gate.inside.wait(30)  # the step holds the loop's lock, stuck reading the board
    done = threading.Event()
    commander = threading.Thread(target=lambda: (loop.override("saver", 600, "ops"), done.set()))
    commander.start()
    # The command cannot change the plan while the step is in progress: it waits for the lock.
    assert not done.wait(0.3)
    assert governor.level.label == "performance" and governor.status().get("override") is None
    gate.open.set()
    stepper.join(30)
    commander.join(30)
    assert done.is_set()
    # The override came last, so its plan is the one written to the board.
    assert governor.level.label == "saver"
    assert board.fs.read_int(CAP) == governor.plan.cpu_max_khz == loop.applier.applied.cpu_max_khz["policy0"]


def test_steps_and_commands_from_two_threads_always_leave_the_governors_latest_plan_in_force(tmp_path):
    board, governor, loop = make_loop(tmp_path)
    levels = ["saver", "auto", "critical", "balanced", "auto", "performance"]
    for i in range(30):
        level = levels[i % len(levels)]
        t1 = threading.Thread(target=loop.step)
        t2 = threading.Thread(target=loop.override, args=(level, 600, "ops"))
        t1.start(), t2.start()
        t1.join(30), t2.join(30)
        assert board.fs.read_int(CAP) == governor.plan.cpu_max_khz, f"round {i}: {level}"
        assert loop.applier.applied.cpu_max_khz == {"policy0": governor.plan.cpu_max_khz}


def test_a_pinned_variant_and_the_status_say_who_decides(tmp_path):
    _, governor, loop = make_loop(tmp_path)
    st = loop.status()
    assert st["pinned_variant"] is None and st["level"] == governor.level.label
    loop.override("saver", 60, "ops")
    assert loop.status()["override"]["by"] == "ops"
    loop.override("auto", 60, "ops")
    assert "override" not in loop.status()


def test_a_reloaded_policy_is_used_from_the_next_step(tmp_path):
    from device import config

    _, governor, loop = make_loop(tmp_path)
    new = Policy.from_config(config.from_mapping({"power": {"step_s": 2.0}}).power)
    loop.set_policy(new)
    assert governor.policy is new and loop.step_s == 2.0
    loop.step()  # decides by the new policy without a jump
    assert governor.level.label == "performance"
