"""How the worker waits for requests: a bounded poll after each reply, then a real sleep."""

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from device.runtime.runtime import Runtime
from device.runtime.worker import FRAME, OP_INFER, SPIN_NS, next_frame, poll_window_ns
from tests.conftest import EXPECTED_BACKEND, ROOT
from tests.runtime.test_isolation import cpu_ticks

pytestmark = pytest.mark.runtime


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_a_waiting_frame_is_read_while_polling(pair):
    a, b = pair
    a.send(FRAME.pack(OP_INFER, 7, 0))
    assert FRAME.unpack(next_frame(b.fileno(), FRAME.size)) == (OP_INFER, 7, 0)


def test_a_frame_after_the_poll_window_is_read_by_the_blocking_wait(pair):
    a, b = pair
    sender = threading.Timer(0.05, a.send, (FRAME.pack(OP_INFER, 8, 0),))
    sender.start()
    frame = next_frame(b.fileno(), FRAME.size, spin_ns=1_000)  # the poll gives up long before the frame
    sender.join()
    assert FRAME.unpack(frame) == (OP_INFER, 8, 0)
    assert not os.get_blocking(b.fileno())  # back to polling mode for the next request


def test_the_supervisor_going_away_ends_the_wait_in_either_phase(pair):
    a, b = pair
    closer = threading.Timer(0.05, a.close)
    closer.start()
    assert next_frame(b.fileno(), FRAME.size, spin_ns=1_000) == b""
    closer.join()
    assert next_frame(b.fileno(), FRAME.size) == b""  # EOF seen while polling


def test_an_idle_worker_sleeps_and_still_serves_the_next_request(settings, vibration):
    x = np.random.default_rng(5).normal(0, 1, (256, 3)).astype(np.float32)
    with Runtime(settings(isolation="process"), manifest=vibration) as rt:
        first = rt.infer(x).outputs[0]
        time.sleep(0.3)  # far past the 300 µs poll: the worker is asleep in read()
        before = cpu_ticks(rt.worker_pid)
        time.sleep(1.0)
        idle_ticks = cpu_ticks(rt.worker_pid) - before
        # Clock ticks are 10 ms; a worker still polling would burn ~100 of them in that second.
        assert idle_ticks <= 5, f"idle worker used {idle_ticks} ticks of CPU in 1 s"
        assert np.array_equal(rt.infer(x).outputs[0], first)


def test_a_single_cpu_worker_does_not_poll():
    assert poll_window_ns(1) == 0
    assert poll_window_ns(2) == poll_window_ns(64) == SPIN_NS


def test_an_agent_on_one_cpu_gets_its_replies(tmp_path):
    # The whole runtime in a process allowed one CPU: the worker inherits it and must not poll.
    script = textwrap.dedent("""
        import os, numpy as np
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        from device.runtime.runtime import Runtime, RuntimeSettings
        from device.runtime.worker import _usable_cpus
        s = RuntimeSettings(backend=os.environ.get("B", "auto"), delegate="cpu", isolation="process")
        x = np.random.default_rng(1).normal(0, 1, (256, 3)).astype(np.float32)
        with Runtime(s) as rt:
            outs = [rt.infer(x).outputs[0] for _ in range(20)]
            with open(f"/proc/{rt.worker_pid}/status") as f:
                allowed = [l for l in f if l.startswith("Cpus_allowed_list")][0].split()[1]
        assert all(np.array_equal(o, outs[0]) for o in outs)
        print(_usable_cpus(), allowed)
    """)
    env = dict(os.environ, B=EXPECTED_BACKEND, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cpus, allowed = r.stdout.split()
    assert cpus == "1" and "," not in allowed and "-" not in allowed  # the worker had one CPU too


def test_stages_of_a_request_follow_each_other_across_the_two_processes(settings, vibration):
    x = np.random.default_rng(6).normal(0, 1, (256, 3)).astype(np.float32)
    with Runtime(settings(isolation="process"), manifest=vibration) as rt:
        engine = rt._engine
        assert engine.last_stages() is None  # nothing served yet
        t = time.perf_counter_ns()
        r = rt.infer(x)
        elapsed = time.perf_counter_ns() - t
        stages = engine.last_stages()
    assert list(stages) == ["agent_in", "to_worker", "worker_in", "invoke", "worker_out", "to_agent", "agent_out"]
    # Both processes read CLOCK_MONOTONIC, so the stages are causal and tile the request exactly.
    assert all(v >= 0 for v in stages.values()), stages
    assert stages["invoke"] > 0 and stages["to_worker"] > 0 and stages["to_agent"] > 0
    assert sum(stages.values()) <= elapsed
    assert stages["invoke"] == r.invoke_ns  # the worker's own measure of invoke()
    assert stages["to_worker"] + stages["worker_in"] + stages["invoke"] + stages["worker_out"] \
        + stages["to_agent"] + stages["agent_out"] == r.latency_ns


def test_an_inline_engine_has_no_stages(settings, vibration):
    with Runtime(settings(isolation="inline"), manifest=vibration) as rt:
        rt.infer(np.zeros((256, 3), np.float32))
        assert rt._engine.last_stages() is None
