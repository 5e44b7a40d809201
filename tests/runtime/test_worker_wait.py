"""How the worker waits for requests: a bounded poll after each reply, then a real sleep."""

import os
import socket
import threading
import time

import numpy as np
import pytest

from device.runtime.runtime import Runtime
from device.runtime.worker import FRAME, OP_INFER, next_frame
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
