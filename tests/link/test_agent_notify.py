"""A real agent on a virtual board tells a notify socket the test listens on: READY=1 once it serves,
WATCHDOG=1 while it is healthy and none while a loop hangs, STOPPING=1 when it stops."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from device import config
from device.agent.agent import Agent
from tests.waiting import eventually


class Listener:
    """The systemd side: every datagram, with the real time it came."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.got: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            with self.lock:
                self.got.append((time.monotonic(), data.decode()))

    def messages(self) -> list[str]:
        with self.lock:
            return [m for _, m in self.got]

    def pings(self) -> list[float]:
        with self.lock:
            return [t for t, m in self.got if m == "WATCHDOG=1"]

    def quiet_for(self, seconds: float) -> bool:
        """No ping in the last ``seconds``."""
        p = self.pings()
        return not p or time.monotonic() - p[-1] > seconds

    def close(self):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def listener(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    lst = Listener(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # a ping every 0.5 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield lst
    lst.close()


def make_agent(tmp_path, link: str = "") -> Agent:
    cfg = config.loads(f"""
[device]
id = "notify-test"
state_dir = "{tmp_path / 'state'}"
runtime_dir = "{tmp_path / 'run'}"
[link]
broker = "{link}"
backoff_min_s = 0.05
backoff_max_s = 0.5
[runtime]
isolation = "inline"
delegate = "cpu"
[drivers]
virtual_board = "rpi4"
[power]
step_s = 0.5
""")
    return Agent(cfg)


class Gate:
    """Narrow error injection: wraps one method so that it blocks while the gate is shut."""

    def __init__(self, fn):
        self.fn = fn
        self.open = threading.Event()
        self.open.set()
        self.blocked = threading.Event()

    def __call__(self, *a, **kw):
        if not self.open.is_set():
            self.blocked.set()
            self.open.wait()
        return self.fn(*a, **kw)


@pytest.fixture
def link_url(request):
    """A broker for the ``link`` case, started before ``listener`` sets NOTIFY_SOCKET (mosquitto speaks sd_notify
    too, and its READY=1 must not pass for the agent's)."""
    if request.node.callspec.params.get("part") != "link":
        return ""
    return request.getfixturevalue("broker").url


@pytest.mark.parametrize("part", ["loop", "governor", "link"])
def test_ready_then_pings_while_healthy_none_while_a_part_hangs_then_stopping(tmp_path, link_url, listener,
                                                                               monkeypatch, part):
    agent = make_agent(tmp_path, link_url)
    if part == "link":  # the link's network thread stuck (in a publish, a spool read...) while connected
        gate = Gate(agent.link._pump)
        monkeypatch.setattr(agent.link, "_pump", gate)
    elif part == "loop":  # the inference loop stuck in a read (as it would be on a worker that never answers)
        gate = Gate(agent.sensor.next_window)
        monkeypatch.setattr(agent.sensor, "next_window", gate)
    else:  # the governor stuck reading the board
        gate = Gate(agent.governor.step)
        monkeypatch.setattr(agent.governor, "step", gate)
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        eventually(lambda: "READY=1" in "\n".join(listener.messages()), timeout=60, what="READY=1")
        ready = next(m for m in listener.messages() if m.startswith("READY=1"))
        assert agent.serving  # said once the model is warm
        assert "STATUS=serving vibration" in ready and "SIMULATED" in ready, ready
        assert (f"link {link_url}" if link_url else "link off") in ready, ready
        assert listener.messages()[0] == ready  # nothing before READY
        eventually(lambda: len(listener.pings()) >= 4, timeout=30, what="watchdog pings while healthy")
        # A level change shows in `systemctl status` (said by the governor loop, once).
        level = "saver" if agent.governor.level.label != "saver" else "performance"
        agent.governor.override(level, 600)
        eventually(lambda: any(m.startswith("STATUS=") and f"level {level};" in m for m in listener.messages()), timeout=30, what=f"a STATUS= line with level {level}")
        statuses = [m for m in listener.messages() if m.startswith("STATUS=")]
        assert len(statuses) == len(set(statuses)) and f"level {level};" not in ready  # each said once

        gate.open.clear()  # hang it
        assert gate.blocked.wait(30)
        # The pings stop within a few intervals: none for 3 s (6 intervals) while the part stays hung.
        eventually(lambda: listener.quiet_for(3.0), timeout=30, what=f"the pings to stop with the {part} hung")
        assert gate.blocked.is_set() and not gate.open.is_set()
        assert t.is_alive()  # the agent itself is still up: only the pings tell systemd

        stopped_at = len(listener.pings())
        gate.open.set()  # it recovers: the pings come back
        eventually(lambda: len(listener.pings()) >= stopped_at + 2, timeout=30, what="the pings to resume")
    finally:
        gate.open.set()
        agent.stop()
        t.join(30)
    assert not t.is_alive()
    msgs = listener.messages()
    assert "STOPPING=1" in msgs
    assert "WATCHDOG=1" not in msgs[msgs.index("STOPPING=1"):]  # no ping once stopping


def test_a_terminal_run_without_notify_socket_sends_nothing_and_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    agent = make_agent(tmp_path)
    assert agent.run(seconds=2.0) == 0
    assert agent.watchdog is None and not agent.notifier.enabled
