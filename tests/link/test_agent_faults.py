"""The agent when things are wrong, against a real mosquitto, real workers and a real pty: simulated data is
always labelled and never the default, a sensor that cannot be opened shows in the log, the events and the LED,
and a model that crashes the interpreter leaves the board serving another variant (or none, saying so) and
reachable, with every event spooled."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading

import pytest

from device import config
from device.agent.agent import Agent
from device.errors import ConfigError
from device.link.envelope import sign_envelope
from device.runtime.manifest import bundled_model_dir
from drivers.led import LedCode
from tests.link.test_agent import DEV, PREFIX, Operator, operator_key, write_config  # noqa: F401 (fixture)
from tests.runtime.crashmodel import make_crashing_model
from tests.waiting import eventually


class Watcher:
    """Everything the board publishes, by topic suffix."""

    def __init__(self, broker):
        import paho.mqtt.client as mqtt

        self.msgs: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watcher", protocol=mqtt.MQTTv5)
        self.c.on_message = self._msg
        ready = threading.Event()
        self.c.on_subscribe = lambda *a: ready.set()
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        self.c.subscribe(f"{PREFIX}/#", qos=1)
        assert ready.wait(10)

    def _msg(self, c, u, m):
        with self.lock:
            self.msgs.append((m.topic[len(PREFIX) + 1:], json.loads(m.payload)))

    def of(self, prefix: str) -> list[dict]:
        with self.lock:
            return [body for topic, body in self.msgs if topic.startswith(prefix)]

    def events(self, kind: str) -> list[dict]:
        return [e for e in self.of("events") if e.get("kind") == kind]

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def watcher(broker):
    w = Watcher(broker)
    yield w
    w.close()


def start(agent: Agent) -> threading.Thread:
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    return t


# ------------------------------------------------------------------------------------------- simulation


def test_no_sensor_and_no_virtual_board_is_a_config_error_naming_the_key(tmp_path):
    cfg = config.loads(f'[device]\nstate_dir = "{tmp_path / "state"}"\n')
    with pytest.raises(ConfigError) as err:
        Agent(cfg)
    assert err.value.key_path == "drivers.sensor_url" and "--sim" in str(err.value)
    assert not (tmp_path / "state" / "board").exists()  # no simulated MCU was made


def test_a_simulated_board_says_so_in_birth_status_and_every_result(tmp_path, broker, operator_key, watcher):
    agent = Agent(config.load(write_config(tmp_path, broker)))
    t = start(agent)
    try:
        assert agent.link.wait_connected(30)
        eventually(lambda: len(watcher.of("results/")) >= 3, timeout=60.0, what="three results")
        births = [b for b in watcher.of("state") if b.get("state") == "online"]
        assert births and births[-1]["simulated"] is True and births[-1]["virtual_board"] == "rpi4"
        # The link comes up before the model: the birth is refreshed once the runtime serves.
        assert births[-1]["serving"] is True and births[-1]["variant"] in ("full", "lite")
        assert all(r["simulated"] is True for r in watcher.of("results/"))
        op = Operator(broker)
        try:
            st = op.send("status", {})["result"]
        finally:
            op.close()
        assert st["simulated"] is True and st["virtual_board"] == "rpi4"
    finally:
        agent.stop()
        t.join(30)


# ------------------------------------------------------------------------------------------- the sensor


def test_a_sensor_port_that_does_not_exist_is_a_warning_an_event_and_the_led_code(tmp_path, caplog):
    port = tmp_path / "ttyUSB9"  # does not exist
    cfg = config.loads(f"""
[device]
id = "{DEV}"
state_dir = "{tmp_path / 'state'}"
[runtime]
isolation = "inline"
delegate = "cpu"
[drivers]
sensor_url = "{port}"
sensor_timeout_s = 0.5
gpio = "sim"
led_pin = 17
[power]
step_s = 0.2
""")
    events: list[tuple[str, dict]] = []
    agent = Agent(cfg, on_event=lambda k, d: events.append((k, d)))
    assert agent.simulated is False
    with caplog.at_level(logging.WARNING, logger="device.agent"):
        code = agent.run(seconds=3.0)
    faults = [d for k, d in events if k == "sensor_fault"]
    assert len(faults) == 1, events  # said once, not once per retry
    assert str(port) in faults[0]["problem"] and faults[0]["port"] == str(port)
    warned = [r for r in caplog.records if "sensor fault" in r.getMessage()]
    assert len(warned) == 1 and str(port) in warned[0].getMessage()
    assert code == 1  # a timed run that ends with the sensor faulty fails
    assert agent.io.led.code == LedCode.SENSOR_FAULT or LedCode.SENSOR_FAULT in agent.io.led._active
    assert agent.results == 0


def test_the_agent_uses_its_injected_clock_without_a_virtual_board(tmp_path):
    from drivers.sim.clock import SimClock
    from drivers.sim.mcu import SimulatedMcu
    from drivers.sim.signal import VibrationSource

    mcu = SimulatedMcu(VibrationSource(seed=1))
    clock = SimClock(epoch=1_000_000.0)
    cfg = config.loads(f"""
[device]
state_dir = "{tmp_path / 'state'}"
[runtime]
isolation = "inline"
[drivers]
sensor_url = "{mcu.port}"
sensor_timeout_s = 3600
""")
    events: list[str] = []
    agent = Agent(cfg, clock=clock, on_event=lambda kind, data: events.append(kind))
    try:
        assert agent.board_clock is clock and agent.reader.clock is clock and agent.governor.clock is clock
        # Behaviour, not only wiring: the MCU is silent, and the sensor goes stale, and the agent says so, when
        # the injected clock says so, not when real time passes.
        agent.sensor.start()
        assert agent.sensor.wait_until(lambda h: h.connected, timeout=10)
        clock.advance(cfg.drivers.sensor_timeout_s + 1)  # an hour of silence, on the injected clock only
        assert agent.sensor.wait_until(lambda h: h.state.value == "stale", timeout=10)
        agent._watch()
        assert events == ["sensor_fault"] and agent.status()["faults"]["sensor"]["for_s"] == 0.0
        clock.advance(42)
        assert agent.status()["faults"]["sensor"]["for_s"] == 42.0
    finally:
        agent.sensor.stop()
        agent.io.close()
        mcu.close()


# --------------------------------------------------------------------------------- a crashing variant


def crashing_model_dir(tmp_path, crash=("full",)) -> str:
    d = tmp_path / "model"
    shutil.copytree(bundled_model_dir(), d)
    for variant in crash:
        f = d / f"vibration_{variant}.tflite"
        f.write_bytes(make_crashing_model(f.read_bytes()))
    return str(d)


def crash_config(tmp_path, broker, model_dir) -> str:
    path = write_config(tmp_path, broker)
    text = open(path).read().replace('isolation = "inline"', f'isolation = "process"\nmodel = "{model_dir}"\n'
                                                               f'quarantine_after = 2\nstart_timeout_s = 30')
    open(path, "w").write(text)
    return path


def test_a_crashing_variant_falls_back_and_the_board_stays_reachable(tmp_path, broker, operator_key, watcher):
    agent = Agent(config.load(crash_config(tmp_path, broker, crashing_model_dir(tmp_path))))
    t = start(agent)
    op = Operator(broker)
    try:
        assert agent.link.wait_connected(30)
        eventually(lambda: agent.runtime.variant == "lite" and agent.serving, timeout=60.0, what="serving on lite")
        eventually(lambda: len(watcher.of("results/")) >= 2, timeout=60.0, what="results from lite")
        assert {r["variant"] for r in watcher.of("results/")} == {"lite"}
        st = op.send("status", {})["result"]
        assert st["serving"] is True and st["runtime"]["variant"] == "lite" and st["runtime"]["quarantined"]
        eventually(lambda: watcher.events("variant_fallback") and watcher.events("worker_crashed"), timeout=60.0, what="crash and fallback events on the broker")
        fb = watcher.events("variant_fallback")[0]
        assert fb["from"] == "full" and fb["to"] == "lite"
    finally:
        op.close()
        agent.stop()
        t.join(60)


def test_no_variant_can_serve_the_board_says_so_and_takes_quarantine_release(tmp_path, broker, operator_key,
                                                                              watcher):
    model_dir = crashing_model_dir(tmp_path, crash=("full", "lite"))
    agent = Agent(config.load(crash_config(tmp_path, broker, model_dir)))
    t = start(agent)
    op = Operator(broker)
    try:
        assert agent.link.wait_connected(30)
        eventually(lambda: len(agent.runtime.status()["quarantined"]) == 2
                 and agent.runtime.status()["not_serving_reason"], timeout=120, what="both quarantined, not serving")
        st = op.send("status", {})["result"]
        assert st["serving"] is False and st["runtime"]["not_serving_reason"]
        eventually(lambda: watcher.events("not_serving"), timeout=60.0, what="not_serving on the broker")
        eventually(lambda: [b for b in watcher.of("state") if b.get("state") == "online"][-1]["serving"] is False, timeout=60.0, what="the retained birth to say it does not serve")
        assert st["faults"]["runtime"]["problem"]
        # The board is still reachable for a signed release of a quarantine.
        sha = st["runtime"]["quarantined"][0]["sha256"]
        env = sign_envelope(operator_key, device=DEV, cmd="quarantine.release", args={"sha256": sha}, ttl_s=60)
        r = op.send("quarantine.release", env)
        assert r["ok"], r
    finally:
        op.close()
        agent.stop()
        t.join(60)
    assert agent.results == 0 and agent.failures == 0  # not one failure per window while not serving


def test_events_of_a_crash_at_start_are_spooled_even_if_the_broker_is_down(tmp_path, broker, operator_key):
    path = crash_config(tmp_path, broker, crashing_model_dir(tmp_path))
    broker.stop()
    agent = Agent(config.load(path))
    agent.run(seconds=8)
    import sqlite3

    db = sqlite3.connect(os.path.join(str(tmp_path / "state"), "spool", "spool.db"))
    kinds = [json.loads(p).get("kind") for (p,) in db.execute("SELECT payload FROM messages WHERE topic LIKE "
                                                              "'%/events'")]
    db.close()
    assert "worker_crashed" in kinds and "variant_fallback" in kinds, kinds


# --------------------------------------------------------------------------------------------- a hung worker


def test_a_hung_worker_is_a_fault_once_its_request_is_late(tmp_path, capsys):
    import signal

    from device.errors import Exit
    from tools import cli

    path = tmp_path / "fieldnode.toml"
    path.write_text(f"""
[device]
id = "{DEV}"
state_dir = "{tmp_path / 'state'}"
runtime_dir = "{tmp_path / 'run'}"
[runtime]
isolation = "process"
delegate = "cpu"
deadline_ms = 120000
[drivers]
virtual_board = "rpi4"
gpio = "sim"
led_pin = 17
[power]
step_s = 0.2
""")
    events: list[tuple[str, dict]] = []
    agent = Agent(config.load(str(path)), on_event=lambda k, d: events.append((k, d)))
    # Late after 0.5 s instead of half the deadline (60 s): the rule is tested, not the number. The deadline stays
    # long, so the supervisor does not kill the worker while the test looks.
    agent.faults.late_min_s, agent.faults.late_fraction = 0.5, 0.0
    t = start(agent)
    stopped = None
    try:
        eventually(lambda: agent.results >= 1, timeout=60, what="a first result")
        assert "worker" not in agent.status()["faults"]
        stopped = pid = agent.runtime.worker_pid
        os.kill(pid, signal.SIGSTOP)  # a real hang: the worker process stops answering
        fault = eventually(lambda: agent.status()["faults"].get("worker"), timeout=60, what="the worker fault")
        assert fault["problem"] == (f"the inference worker (pid {pid}) has not answered a request within 0.5 s; "
                                    f"it is killed at runtime.deadline_ms (120 s)")
        assert agent.status()["serving"] is True  # not a runtime fault: the variant serves, its worker is late
        eventually(lambda: agent.io.led.code is LedCode.RUNTIME_FAULT, timeout=30, what="the LED's RUNTIME_FAULT")
        assert cli.main(["status", "--config", str(path)]) == Exit.FAULTS
        out = capsys.readouterr().out
        assert f"faults    worker: the inference worker (pid {pid}) has not answered" in out

        os.kill(pid, signal.SIGCONT)
        stopped = None
        eventually(lambda: [d for k, d in list(events) if k == "worker_recovered"], timeout=60,
                   what="worker_recovered")
        assert "worker" not in agent.status()["faults"]
        assert [k for k, _ in events if k.startswith("worker_")] == ["worker_fault", "worker_recovered"]
        assert next(d for k, d in events if k == "worker_fault")["pid"] == pid
        assert agent.runtime.worker_pid == pid  # only late, never killed: the same worker serves on
        eventually(lambda: agent.io.led.code is not LedCode.RUNTIME_FAULT, timeout=30, what="the LED to clear")
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        agent.stop()
        t.join(60)
