"""The agent's GPIO on the sim backend: status LED codes, the trigger input and the power-good input, with
the whole agent running (virtual board, pty sensor, worker; no link)."""

from __future__ import annotations

import threading

import pytest

from device import config
from device.agent.agent import Agent
from drivers.led import LedCode
from tests.waiting import eventually

LED, TRIGGER, POWER_GOOD = 17, 22, 27


@pytest.fixture
def agent(tmp_path):
    cfg = config.loads(f"""
[device]
id = "io-test"
state_dir = "{tmp_path / 'state'}"
runtime_dir = "{tmp_path / 'run'}"
[runtime]
isolation = "inline"
delegate = "cpu"
[drivers]
virtual_board = "rpi4"
gpio = "sim"
led_pin = {LED}
trigger_pin = {TRIGGER}
trigger_debounce_s = 0.01
power_good_pin = {POWER_GOOD}
[power]
step_s = 0.1
""")
    a = Agent(cfg)
    assert a.io.led.code == LedCode.STARTING
    t = threading.Thread(target=a.run, daemon=True)
    t.start()
    yield a
    a.stop()
    t.join(30)


def test_led_shows_ok_once_running_and_power_critical_when_power_good_drops(agent):
    pins = agent.io.pins
    eventually(lambda: agent.io.led.code == LedCode.OK, what="LED OK")
    assert any(v for _, v in pins.states(LED))  # it really blinked the line
    # pulled up: good (the LED says OK from the agent's first turn; the governor's first reading may come after it)
    eventually(lambda: agent.governor.snapshot is not None, what="the governor's first reading")
    assert agent.governor.snapshot.power_good is True
    pins.drive_low(POWER_GOOD)  # the UPS HAT's low-battery output
    eventually(lambda: agent.governor.level.label == "critical", what="critical level")
    assert "power-good input" in agent.governor.reason
    eventually(lambda: agent.io.led.code == LedCode.POWER_CRITICAL, what="LED power critical")
    pins.drive_high(POWER_GOOD)
    assert agent.status()["hardware"]["gpio"]["backend"] == "sim"


def test_trigger_input_classifies_the_latest_window_now(agent):
    eventually(lambda: agent.sensor.latest_window() is not None, what="a window")
    assert agent.last_trigger is None
    agent.io.pins.drive_high(TRIGGER)
    eventually(lambda: agent.io.trigger.triggers == 1, what="a debounced trigger")
    eventually(lambda: agent.last_trigger is not None, what="a triggered inference")
    assert agent.last_trigger["result"]["label"] in ("normal", "imbalance", "bearing_fault", "loose_mount")
    agent.io.pins.drive_low(TRIGGER)
    assert agent.status()["hardware"]["trigger"]["triggers"] == 1


def test_the_agent_reports_accelerators(agent):
    assert agent.accelerators.summary()
    assert agent.status()["accelerators"] == agent.accelerators.summary()
    # the retained state (held and replayed by the broker for every board) says only the kinds
    assert agent.birth()["accelerators"] == agent.accelerators.kinds() == []  # the virtual rpi4 has none
