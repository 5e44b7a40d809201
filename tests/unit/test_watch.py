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


# ------------------------------------------------------------------------------ when a condition is a fault


def faults(clock, **kw):
    from device.agent.watch import Faults

    events: list[tuple[str, dict]] = []
    return Faults(lambda k, d: events.append((k, d)), clock=clock, **kw), events


def link(connected: bool, **more) -> dict:
    return {"broker": "mqtt://hub:1883", "connected": connected, "last_error": None if connected else "refused",
            **more}


def test_a_link_down_past_its_grace_is_a_fault_counted_from_when_it_went_down():
    clock = SimClock()
    f, events = faults(clock, link_grace_s=30)
    f.check_link(link(True))
    f.check_link(link(False))
    clock.sleep(29)
    f.check_link(link(False))
    assert events == [] and f.by_part() == {}  # a blip (a broker restart) is not a fault
    clock.sleep(2)
    f.check_link(link(False))
    f.check_link(link(False))
    assert events == [("link_fault", {"problem": "not connected to mqtt://hub:1883 (refused); results wait in the "
                                                 "spool", "broker": "mqtt://hub:1883"})]
    assert f.by_part()["link"]["for_s"] == 31.0
    clock.sleep(9)
    f.check_link(link(True))
    assert events[-1] == ("link_recovered", {"after_s": 40.0}) and f.by_part() == {}
    f.check_link(link(False))  # down again: a new grace from now
    clock.sleep(29)
    f.check_link(link(False))
    assert len(events) == 2


def test_a_link_that_never_connected_and_no_link_at_all():
    clock = SimClock()
    f, events = faults(clock, link_grace_s=30)
    f.check_link(None)  # no broker configured: never a fault
    clock.sleep(100)
    f.check_link(None)
    assert events == []
    f.check_link({"broker": "mqtt://hub:1883", "connected": False})
    clock.sleep(30)
    f.check_link({"broker": "mqtt://hub:1883", "connected": False})
    assert f.by_part()["link"]["problem"] == ("not connected to mqtt://hub:1883 (no connection yet); results wait "
                                              "in the spool")


def test_a_broker_that_stopped_acknowledging_is_a_fault_at_once():
    from device.agent.watch import link_unhealthy

    clock = SimClock()
    f, events = faults(clock, link_grace_s=30)
    assert link_unhealthy(link(True)) is None  # a link that does not say is healthy as far as this goes
    f.check_link(link(True, healthy=False, acks_stalled=True, ack_stall_s=2.5, ack_timeout_s=30.0))
    assert f.by_part()["link"] == {"problem": "the broker stopped acknowledging results (none within 30 s); the link "
                                              "resets its session, results wait in the spool", "for_s": 2.5}
    f.check_link(link(False, healthy=False, ack_stall_s=3.0, ack_timeout_s=30.0))  # the reset: still the one fault
    f.check_link(link(True, healthy=True, ack_stall_s=None))
    assert [k for k, _ in events] == ["link_fault", "link_recovered"]


def test_a_request_late_for_its_worker_is_a_fault():
    clock = SimClock()
    f, events = faults(clock)
    assert f.late_after_s(5.0) == 2.5 and f.late_after_s(0.01) == 1.0  # half the deadline, never before 1 s
    f.check_worker(None, deadline_s=5.0, pid=845, isolation="process")
    f.check_worker(2.4, deadline_s=5.0, pid=845, isolation="process")
    assert events == []
    f.check_worker(2.6, deadline_s=5.0, pid=845, isolation="process")
    assert f.by_part("no variant can serve") == {
        "worker": {"problem": "the inference worker (pid 845) has not answered a request within 2.5 s; it is killed "
                              "at runtime.deadline_ms (5 s)", "for_s": 2.6},
        "runtime": {"problem": "no variant can serve"}}
    f.check_worker(None, deadline_s=5.0, pid=None, isolation="process")  # answered, or killed at the deadline
    assert [k for k, _ in events] == ["worker_fault", "worker_recovered"]
    f.check_worker(30.0, deadline_s=5.0, pid=None, isolation="inline")
    assert f.by_part()["worker"]["problem"].startswith("the interpreter (inline isolation: nothing can kill it)")
