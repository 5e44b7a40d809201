"""The agent's GPIO as status reports it: a board without a status LED does not claim one shows "ok"."""

from __future__ import annotations

from device import config
from device.agent.hardware import BoardIO
from drivers.gpio import make_factory


def test_status_has_no_led_code_without_an_led():
    io = BoardIO(config.Config().drivers)  # led_pin = -1: nothing wired, no GPIO library needed
    try:
        io.update(started=True, broker_ok=True, sensor_ok=True, runtime_ok=True, critical=False)
        assert io.describe()["led"] is None and io.describe()["gpio"] is None
    finally:
        io.close()


def test_status_shows_the_code_of_a_wired_led():
    drivers = config.loads('[drivers]\ngpio = "sim"\nled_pin = 17\n').drivers
    io = BoardIO(drivers, factory=make_factory("sim"))
    try:
        assert io.describe()["led"] == "starting"
        io.update(started=True, broker_ok=True, sensor_ok=False, runtime_ok=True, critical=False)
        assert io.describe()["led"] == "sensor_fault"
    finally:
        io.close()
