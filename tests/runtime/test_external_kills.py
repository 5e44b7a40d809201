"""Kills from outside are not the model's fault: real workers SIGKILLed while idle, while loading and while
serving are started again without a strike, and only kills at a rate count (a model OOM-killed at every load);
a model that crashes the interpreter is still quarantined (tests/runtime/test_isolation.py)."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np

from device.runtime import errors as E
from device.runtime.quarantine import KILL_WINDOW_S, KILLS_PER_CRASH, Quarantine
from device.runtime.runtime import Runtime
from tests.conftest import TEST_MODELS
from tests.e2e.helpers import children, cmdline, proc_state
from tests.waiting import eventually

SLOW = str(TEST_MODELS / "slow_conv_int8.tflite")


def workers() -> set[int]:
    """This process's inference workers (exec'd: the tests have no zygote)."""
    return {p for p in children(os.getpid()) if "device.runtime.worker" in cmdline(p)}


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def dead(pid: int) -> bool:
    """Ended: gone, or a zombie (until the runtime reaps it) whose other threads (the interpreter's) have ended
    too, so its descriptors are closed; the main thread is a zombie before the others are done."""
    try:
        return proc_state(pid) in (None, "Z") and len(os.listdir(f"/proc/{pid}/task")) <= 1
    except FileNotFoundError:
        return True


def test_workers_sigkilled_while_idle_are_restarted_and_never_counted(settings, vibration, tmp_path):
    rt = Runtime(settings(isolation="process", quarantine_after=2, warmup_runs=0), manifest=vibration,
                 quarantine_path=str(tmp_path / "quarantine.json"))
    x = np.zeros((256, 3), np.float32)
    with rt:
        path = rt._engine.info["path"]
        seen = set()
        for _ in range(3 * rt.quarantine.threshold):
            pid = rt.worker_pid
            seen.add(pid)
            os.kill(pid, signal.SIGKILL)
            eventually(lambda: dead(pid), timeout=60.0, what=f"worker {pid} to die")
            rt.infer(x)  # served by a new worker: the request never reached the dead one
            assert rt.worker_pid not in seen and rt.variant == "full"
        st = rt.status()
        assert (st["crashes"], st["restarts"], st["failures"]) == (0, 3 * rt.quarantine.threshold, 0), st
        assert rt.quarantine.entries() == [] and rt.quarantine.crashes(path) == 0


def test_six_sigkills_of_loading_workers_quarantine_nothing(settings, vibration, tmp_path):
    """The case that quarantined both shipped models until two signed releases: six new workers SIGKILLed as
    soon as they appear. The runtime comes up on the variant it was asked for."""
    rt = Runtime(settings(isolation="process", warmup_runs=0), manifest=vibration,
                 quarantine_path=str(tmp_path / "quarantine.json"))
    before = workers()
    killed: list[int] = []
    done = threading.Event()

    def start():
        try:
            rt.start()
        finally:
            done.set()

    t = threading.Thread(target=start, name="runtime-start")
    t.start()
    try:
        end = time.monotonic() + 120
        while len(killed) < 6 and not done.is_set() and time.monotonic() < end:
            for pid in workers() - before - set(killed):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.001)
        t.join(120)
        assert len(killed) == 6, f"killed {killed} before the runtime started"
        assert rt.serving and rt.variant == "full", rt.status()
        assert rt.quarantine.entries() == []
        assert rt.infer(np.zeros((256, 3), np.float32)).outputs
    finally:
        rt.close()
        t.join(30)


def test_a_worker_sigkilled_during_a_request_fails_it_without_a_strike(settings, single_model, tmp_path):
    manifest = single_model(SLOW, "slow.tflite")
    events: list = []
    rt = Runtime(settings(isolation="process", warmup_runs=0, deadline_ms=600_000), manifest=manifest,
                 on_event=lambda kind, data: events.append((kind, data)),
                 quarantine_path=str(tmp_path / "quarantine.json"))
    with rt:
        path = manifest.variant("default").path
        x = np.zeros(rt._engine.inputs[0].shape, np.int8)
        for _ in range(rt.quarantine.threshold):
            pid = rt.worker_pid
            outcome: dict = {}

            def request():
                try:
                    rt.infer(x)
                except E.WorkerCrashed as exc:
                    outcome["error"] = exc

            before = cpu_ticks(pid)
            t = threading.Thread(target=request)
            t.start()
            eventually(lambda: cpu_ticks(pid) > before + 5 or not t.is_alive(), timeout=60.0, what="the worker to be busy")
            os.kill(pid, signal.SIGKILL)
            t.join(60)
            if "error" in outcome:
                assert "SIGKILL" in str(outcome["error"]) and "not counted" in str(outcome["error"]), outcome
            assert rt.quarantine.crashes(path) == 0
            assert rt.infer(x).outputs  # the next request starts a new worker
        assert rt.quarantine.entries() == []
    crashed = [d for k, d in events if k == "worker_crashed"]
    assert crashed and all(d["counted"] is False for d in crashed), crashed  # an update's trial reads this


def test_kills_count_one_crash_only_at_a_rate():
    now = [1000.0]
    q = Quarantine(threshold=3, monotonic=lambda: now[0])
    path = str(TEST_MODELS / "mobilenet_v2_0.35_96_int8.tflite")
    assert [q.killed(path) for _ in range(KILLS_PER_CRASH)] == [False] * (KILLS_PER_CRASH - 1) + [True]
    assert q.killed(path) is False  # counted kills start over
    # Kills spread wider than the window never count, however many there are.
    q2 = Quarantine(threshold=3, monotonic=lambda: now[0])
    results = []
    for _ in range(3 * KILLS_PER_CRASH):
        results.append(q2.killed(path))
        now[0] += KILL_WINDOW_S / (KILLS_PER_CRASH - 1) + 1
    assert not any(results)
    assert q.crashes(path) == 0 and q2.entries() == []  # a kill alone records no crash
