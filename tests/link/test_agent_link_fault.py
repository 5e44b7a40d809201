"""A broker outage is a fault: a real agent against a real mosquitto that is stopped and started again (and
against a broker address where nothing listens). The fault shows in ``status`` (and ``fieldnode status``'s exit
code), in the service's ``STATUS=`` line, as the LED's NO_BROKER code, and as one ``link_fault`` event; its end is
one ``link_recovered``."""

from __future__ import annotations

import threading

from device import config
from device.agent.agent import Agent
from device.errors import Exit
from drivers.led import LedCode
from tests.link.broker import free_port
from tests.link.test_agent_notify import Listener
from tests.link.test_agent import write_config, operator_key  # noqa: F401 (fixture)
from tests.waiting import eventually
from tools import cli

GRACE_S = 1.0  # the agent's is 30 s; what is tested is the rule, not the number


def agent_config(tmp_path, broker) -> str:
    path = write_config(tmp_path, broker)
    text = open(path).read()
    if "runtime_dir" not in text:  # never the host's /run
        text = text.replace("[device]\n", f'[device]\nruntime_dir = "{tmp_path / "run"}"\n')
    text = text.replace("[drivers]\n", '[drivers]\ngpio = "sim"\nled_pin = 17\n')
    open(path, "w").write(text)
    return path


def start(agent: Agent) -> threading.Thread:
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    return t


def statuses(systemd: Listener) -> list[str]:
    """The ``STATUS=`` texts the agent told systemd, in order (READY=1 carries one too)."""
    return [ln[len("STATUS="):] for m in systemd.messages() for ln in m.splitlines() if ln.startswith("STATUS=")]


def kinds(events, kind: str) -> list[dict]:
    return [d for k, d in list(events) if k == kind]


def test_a_broker_outage_is_a_fault_said_once_and_its_end_too(tmp_path, broker, operator_key, capsys, monkeypatch):
    path = agent_config(tmp_path, broker)
    systemd = Listener(str(tmp_path / "notify"))  # what systemctl status would show
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    events: list[tuple[str, dict]] = []
    agent = Agent(config.load(path), on_event=lambda k, d: events.append((k, d)))
    agent.faults.link_grace_s = GRACE_S
    t = start(agent)
    try:
        assert agent.link.wait_connected(30)
        eventually(lambda: agent.results >= 1, timeout=60, what="a first result")
        assert "link" not in agent.status()["faults"] and agent.io.led.code is not LedCode.NO_BROKER

        before = len(events)  # a slow first connect may have been a fault of its own: the outage's are counted
        broker.stop()
        fault = eventually(lambda: agent.status()["faults"].get("link"), timeout=60, what="the link fault")
        assert fault["problem"].startswith(f"not connected to {broker.url} (") and "spool" in fault["problem"]
        assert fault["for_s"] >= GRACE_S  # counted from when the link went down, not from the grace's end
        eventually(lambda: agent.io.led.code is LedCode.NO_BROKER, timeout=30, what="the LED's NO_BROKER")
        assert cli.main(["status", "--config", path]) == Exit.FAULTS
        out = capsys.readouterr().out
        assert f"faults    link: not connected to {broker.url}" in out
        assert f"link      NOT connected to {broker.url}" in out
        eventually(lambda: any(m.endswith("; FAULTS: link") for m in statuses(systemd)), timeout=30,
                   what="a STATUS= line naming the link fault")

        broker.start()
        assert agent.link.wait_connected(60)
        eventually(lambda: kinds(events[before:], "link_recovered"), timeout=60, what="link_recovered")
        assert "link" not in agent.status()["faults"]
        eventually(lambda: agent.io.led.code is not LedCode.NO_BROKER, timeout=30, what="the LED to leave NO_BROKER")
        assert cli.main(["status", "--config", path]) == Exit.OK
        eventually(lambda: "FAULTS" not in statuses(systemd)[-1], timeout=30, what="a STATUS= line without faults")
        # Said once each way, however many reconnect attempts and checks came between.
        outage = events[before:]
        assert len(kinds(outage, "link_fault")) == 1 and len(kinds(outage, "link_recovered")) == 1
        assert kinds(outage, "link_fault")[0]["broker"] == broker.url
        assert kinds(outage, "link_recovered")[0]["after_s"] >= GRACE_S
    finally:
        agent.stop()
        t.join(30)
        systemd.close()


def test_a_broker_nobody_answers_at_is_a_fault_after_the_grace(tmp_path, operator_key):
    class Nowhere:
        url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens here

    events: list[tuple[str, dict]] = []
    agent = Agent(config.load(agent_config(tmp_path, Nowhere)), on_event=lambda k, d: events.append((k, d)))
    agent.faults.link_grace_s = GRACE_S
    t = start(agent)
    try:
        fault = eventually(lambda: agent.status()["faults"].get("link"), timeout=60, what="the link fault")
        assert fault["problem"].startswith(f"not connected to {Nowhere.url} (cannot connect to {Nowhere.url}")
        eventually(lambda: agent.io.led.code is LedCode.NO_BROKER, timeout=30, what="the LED's NO_BROKER")
        assert not agent.link.connected
        assert len(kinds(events, "link_fault")) == 1
    finally:
        agent.stop()
        t.join(30)
