"""Human output is for people: no Python reprs (``True``, ``['...']``, ``{...}``) in what a technician reads."""

from __future__ import annotations

import re

from device.cliargs import for_people
from tools.cli import main


def test_for_people():
    assert for_people(True) == "yes" and for_people(False) == "no"
    assert for_people(None) == "unknown" and for_people(None, none="-") == "-"
    assert for_people([0, 1, 2, 3]) == "0-3" and for_people([2]) == "2" and for_people([0, 2]) == "0; 2"
    assert for_people(["gpu unavailable: x", "edgetpu: y"]) == "gpu unavailable: x; edgetpu: y"
    assert for_people([]) == "none" and for_people({}) == "none"
    assert for_people({"normal": 3, "imbalance": 1}) == "normal 3, imbalance 1"
    assert for_people(42.5, " C") == "42.5 C"


PYTHON_REPR = re.compile(r"\bTrue\b|\bFalse\b|\bNone\b|\['|\{'")


def test_bench_prints_for_people(capsys):
    assert main(["bench", "device/models/vibration", "--runs", "5", "--warmup", "1", "--isolation", "inline"]) == 0
    out = capsys.readouterr().out
    assert "delegate_fallbacks" in out and "identical" in out
    assert not PYTHON_REPR.search(out), out


def test_power_status_and_simulate_print_for_people(capsys):
    assert main(["power", "status", "--sim", "rpi4"]) == 0
    assert main(["power", "simulate", "--sim", "rpi5", "--scenario", "plug", "--hours", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "SIMULATED" in out and "cpus 0-3" in out and "rpi5" in out
    assert not PYTHON_REPR.search(out), out
