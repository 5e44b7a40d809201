"""Human output is for people: no Python reprs (``True``, ``['...']``, ``{...}``) in what a technician reads."""

from __future__ import annotations

import json
import os
import re

import pytest

from device.cliargs import for_people
from device.errors import Exit, InternalError, Interrupted, SystemCallFailed, UsageError
from tools import cli
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
    assert main(["power", "simulate", "--sim", "rpi5", "--scenario", "plug"]) == 0
    out = capsys.readouterr().out
    assert "SIMULATED" in out and "cpus 0-3" in out and "rpi5" in out
    assert not PYTHON_REPR.search(out), out


# ------------------------------------------------------------------------------ one printer for every error


@pytest.fixture
def failing_command():
    """A subcommand that ends the way it is told (error injection: what is under test is ``main``'s printer)."""
    from device.control import ControlUnavailable

    failures = {
        "os": lambda: open(os.path.join(MISSING, "x")),  # a real OSError, from the OS
        "defect": lambda: {}["boom"],
        "ctrl-c": lambda: (_ for _ in ()).throw(KeyboardInterrupt()),
        "unreachable": lambda: (_ for _ in ()).throw(ControlUnavailable("no agent is running here")),
    }

    def arguments(p):
        p.add_argument("how", choices=sorted(failures))
        p.add_argument("--json", action="store_true")

    def run(args):
        failures[args.how]()
        return Exit.OK

    run.arguments = arguments
    cli.command("test-fail", "fails as told")(run)
    yield
    del cli.COMMANDS["test-fail"]


MISSING = "/nonexistent/fieldnode-test"


@pytest.mark.parametrize("how,code,exit_code,words", [
    ("os", SystemCallFailed.code, Exit.FAILED, f"No such file or directory ({MISSING}/x)"),
    ("defect", InternalError.code, Exit.FAILED, "KeyError: 'boom' (this is a defect; run with -v"),
    ("ctrl-c", Interrupted.code, Exit.INTERRUPTED, "interrupted"),
    ("unreachable", "agent_unreachable", Exit.UNREACHABLE, "no agent is running here"),
])
def test_every_error_is_one_line_and_with_json_one_object(failing_command, capsys, how, code, exit_code, words):
    assert main(["test-fail", how]) == exit_code
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"fieldnode test-fail: error [{code}]: ") and err.count("\n") == 1, err
    assert words in err
    assert main(["test-fail", how, "--json"]) == exit_code
    out, err2 = capsys.readouterr()
    assert err2 == err
    doc = json.loads(out)
    assert doc == {"ok": False, "error": {"code": code, "message": err.split(f"[{code}]: ", 1)[1].rstrip("\n")}}


def test_a_usage_error_of_a_command_is_printed_the_same_way(capsys):
    assert main(["config", "defaults", "--json"]) == Exit.USAGE
    out, err = capsys.readouterr()
    assert err == f"fieldnode config: error [{UsageError.code}]: --json applies to check and show, not defaults\n"
    assert json.loads(out)["error"]["code"] == UsageError.code


def test_a_tool_that_prints_its_own_errors_uses_the_one_printer(tmp_path, capsys):
    from device.link.errors import KeyFileError

    assert main(["keys", "id", str(tmp_path / "nope.pub")]) == Exit.USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"fieldnode keys id: error [{KeyFileError.code}]: ") and err.count("\n") == 1, err
    assert main(["keys", "generate", "../evil", "--out", str(tmp_path)]) == Exit.USAGE
    err = capsys.readouterr().err
    assert err == f"fieldnode keys generate: error [{UsageError.code}]: key name '../evil': expected 1-64 " \
                  f"characters from A-Z, a-z, 0-9, '.', '_', '-' (not starting with '.' or '-', without .key/.pub)\n"
    assert main(["power", "status", "--root", str(tmp_path / "nope")]) == Exit.USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"fieldnode power: error [{UsageError.code}]: ") and "is not a directory" in err, err
