"""FaultWatch: a fault said once, reminded slowly, its recovery said once, even with two threads updating it
(the inference loop and the governor's thread both do)."""

from __future__ import annotations

import logging
import threading

from device.agent.watch import FaultWatch
from drivers.sim.clock import SimClock


def test_said_once_reminded_slowly_and_recovered_once(caplog):
    events, clock = [], SimClock()
    w = FaultWatch("sensor", lambda k, d: events.append((k, d)), clock=clock, remind_s=600)
    with caplog.at_level(logging.INFO, logger="device.agent"):
        for _ in range(5):
            w.update("cannot open /dev/ttyUSB9", port="/dev/ttyUSB9")
        clock.sleep(599)
        w.update("cannot open /dev/ttyUSB9")
        clock.sleep(2)
        w.update("cannot open /dev/ttyUSB9")  # 601 s: one reminder in the log, no event
        assert w.status() == {"problem": "cannot open /dev/ttyUSB9", "for_s": 601.0}
        w.update(None)
        w.update(None)
    assert events == [("sensor_fault", {"problem": "cannot open /dev/ttyUSB9", "port": "/dev/ttyUSB9"}),
                      ("sensor_recovered", {"after_s": 601.0})]
    said = [r.getMessage() for r in caplog.records]
    assert sum("sensor fault:" in m for m in said) == 1 and sum("sensor fault for 601 s" in m for m in said) == 1
    assert w.status() is None and not w.active


def test_two_threads_never_double_an_event(caplog):
    events = []
    w = FaultWatch("sensor", lambda k, d: events.append(k))
    caplog.set_level(logging.INFO, logger="device.agent")  # logging releases the GIL mid-update
    start = threading.Barrier(2)

    def flap():
        start.wait()
        for _ in range(3000):
            w.update("stale")
            w.update(None)

    threads = [threading.Thread(target=flap) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert events, "the test must see faults"
    assert all(a != b for a, b in zip(events, events[1:])), "a fault or a recovery was said twice in a row"
    assert events[0] == "sensor_fault" and events[-1] == "sensor_recovered"
