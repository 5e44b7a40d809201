"""sd_notify against a real datagram socket the test binds (a path and an abstract one), and the health rule
that decides whether the watchdog pings, on a hand-wound clock."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from device.agent.sdnotify import Health, Notifier, Watchdog, describe
from drivers.sim.clock import SimClock


@pytest.fixture
def path_socket(tmp_path):
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    yield path, s
    s.close()


@pytest.fixture
def abstract_socket():
    name = f"fieldnode-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(5)
    yield "@" + name, s
    s.close()


def _nothing_waiting(s: socket.socket) -> bool:
    s.settimeout(0)
    try:
        s.recv(4096)
    except BlockingIOError:
        return True
    finally:
        s.settimeout(5)
    return False


@pytest.mark.parametrize("which", ["path", "abstract"])
def test_each_message_is_one_exact_datagram(which, request):
    address, s = request.getfixturevalue(f"{which}_socket")
    n = Notifier({"NOTIFY_SOCKET": address})
    assert n.enabled
    assert n.ready("serving vibration v1 (full) on litert/xnnpack; link off")
    assert s.recv(4096) == b"READY=1\nSTATUS=serving vibration v1 (full) on litert/xnnpack; link off"
    assert n.ready()
    assert s.recv(4096) == b"READY=1"
    assert n.status("level saver\nvariant lite")  # a newline would start another assignment
    assert s.recv(4096) == b"STATUS=level saver variant lite"
    assert n.watchdog()
    assert s.recv(4096) == b"WATCHDOG=1"
    assert n.stopping()
    assert s.recv(4096) == b"STOPPING=1"
    assert _nothing_waiting(s)


def test_a_status_is_said_again_only_when_it_changes_and_only_after_ready(path_socket):
    address, s = path_socket
    n = Notifier({"NOTIFY_SOCKET": address})
    assert n.status_if_changed("starting") is False  # before READY: READY's own status says how it started
    assert _nothing_waiting(s)
    n.ready("serving; level balanced")
    assert s.recv(4096) == b"READY=1\nSTATUS=serving; level balanced"
    assert n.status_if_changed("serving; level balanced") is False
    assert n.status_if_changed("serving; level saver") is True
    assert s.recv(4096) == b"STATUS=serving; level saver"
    assert n.status_if_changed("serving; level saver") is False
    assert _nothing_waiting(s)


def test_without_notify_socket_every_call_is_a_no_op():
    n = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled
    assert n.ready("x") is False and n.status("x") is False and n.watchdog() is False and n.stopping() is False
    assert n.watchdog_interval_s() is None  # no socket to ping


def test_a_socket_nobody_listens_on_never_raises(tmp_path, caplog):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level("DEBUG", logger="device.agent.sdnotify"):
        assert n.ready("x") is False
        assert n.watchdog() is False
    assert len([r for r in caplog.records if "cannot notify" in r.getMessage()]) == 1  # said once


def test_the_environment_is_left_alone(path_socket):
    env = {"NOTIFY_SOCKET": path_socket[0], "WATCHDOG_USEC": "2000000"}
    Notifier(env).ready()
    assert env == {"NOTIFY_SOCKET": path_socket[0], "WATCHDOG_USEC": "2000000"}


@pytest.mark.parametrize("env, expected", [
    ({"WATCHDOG_USEC": "2000000"}, 1.0),  # half of it
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),  # ours
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),  # another process's (inherited)
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_from_watchdog_usec_and_pid(env, expected):
    n = Notifier({"NOTIFY_SOCKET": "@x", **env}, pid=4242)
    assert n.watchdog_interval_s() == expected


def test_watchdog_pid_defaults_to_ours():
    n = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval_s() == 0.5


def test_health_needs_every_required_part_within_its_bound():
    clock = SimClock()
    h = Health(clock)
    interval = [1.0]
    h.require("loop", lambda: 1.5 + interval[0])  # follows the plan
    h.require("governor", 3.0)
    assert h.stale() == ["loop (never)", "governor (never)"] and not h.healthy()
    h.beat("loop")
    h.beat("governor")
    assert h.healthy()
    clock.advance(2.4)
    h.beat("loop")
    assert h.healthy()  # governor 2.4 s ago, within 3
    clock.advance(0.7)
    assert h.stale() == ["governor (3.1 s > 3.0 s)"]
    h.beat("governor")
    clock.advance(2.6)
    assert [s.split(" ")[0] for s in h.stale()] == ["loop"]  # 3.3 s > 2.5 s: a hung loop
    interval[0] = 5.0  # a slower plan: the bound follows it
    assert h.healthy()
    h.beat("sensor")  # a part that is not required never makes it unhealthy
    assert h.healthy()


def test_the_watchdog_pings_only_while_healthy(path_socket, caplog):
    address, s = path_socket
    clock = SimClock()
    h = Health(clock)
    h.require("loop", 1.5)
    w = Watchdog(Notifier({"NOTIFY_SOCKET": address}), h, interval_s=0.5)
    h.beat("loop")
    assert w.check() is True and s.recv(4096) == b"WATCHDOG=1"
    clock.advance(1.6)
    with caplog.at_level("INFO", logger="device.agent.sdnotify"):
        assert w.check() is False and w.check() is False
        assert _nothing_waiting(s)
        h.beat("loop")
        assert w.check() is True and s.recv(4096) == b"WATCHDOG=1"
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "not pinging" in m and "loop" in m]) == 1  # said once, not per check
    assert len([m for m in said if "healthy again" in m]) == 1
    assert w.pings == 2


def test_describe_reads_like_a_status_and_hides_a_password():
    st = {"serving": True, "model": "vibration", "model_version": "1.2.0", "variant": "full",
          "backend": "litert", "delegate": "xnnpack"}
    assert describe(st, "mqtts://user:secret@broker.example:8883", False) == \
        "serving vibration v1.2.0 (full) on litert/xnnpack; link mqtts://broker.example:8883"
    assert describe(st, "", False, "saver") == \
        "serving vibration v1.2.0 (full) on litert/xnnpack; level saver; link off"
    down = {"serving": False, "model": "vibration", "not_serving_reason": "every variant quarantined"}
    assert describe(down, "", True) == "not serving vibration: every variant quarantined; link off; SIMULATED board"
