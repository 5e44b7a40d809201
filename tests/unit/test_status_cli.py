"""``fieldnode status`` against a real agent on a virtual board (its own control socket, its real status), a
watch across an agent going away and another process answering, and the real CLI entry with no agent."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from tools import cli
from device import config
from device.agent.controlserver import ControlServer
from device.control import socket_path
from device.errors import Exit
from device.link.commands import Registry
from tools import status as status_tool

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON_REPR = re.compile(r"\bTrue\b|\bFalse\b|\bNone\b|\['|\{'")


def status_only(fn) -> Registry:
    """A registry whose one local command, ``status``, answers ``fn()``."""
    reg = Registry()
    reg.register("status", lambda args, ctx: fn(), local=True)
    return reg


ENTRY = ("import sys\nfrom tools import cli\n"
         "if 'status' not in cli.COMMANDS:\n    cli._lazy('tools.status', 'status', 'status')\n"
         "sys.exit(cli.main(sys.argv[1:]))\n")


def write_config(directory, runtime_dir) -> str:
    path = os.path.join(directory, "fieldnode.toml")
    with open(path, "w") as f:
        f.write("\n".join([
            "[device]", 'id = "dev-a"', f'state_dir = "{os.path.join(directory, "state")}"',
            f'runtime_dir = "{runtime_dir}"', "[runtime]", 'isolation = "process"', 'delegate = "cpu"',
            "[drivers]", 'virtual_board = "rpi4"', "[power]", "step_s = 0.5"]) + "\n")
    return path


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """A real agent on a virtual board, with no broker, serving its own control socket."""
    from device.agent.agent import Agent

    d = str(tmp_path_factory.mktemp("agent"))
    cfg_path = write_config(d, os.path.join(d, "run"))
    a = Agent(config.load(cfg_path))
    t = threading.Thread(target=a.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while a.results < 1:
        assert t.is_alive() and time.monotonic() < deadline, "the agent never classified a window"
        time.sleep(0.05)
    a.config_path = cfg_path
    yield a
    a.stop()
    t.join(30)


@pytest.fixture(autouse=True)
def registered():
    if "status" not in cli.COMMANDS:  # the CLI's registration line may not be there yet
        cli._lazy("tools.status", "status", "ask the running agent what it is doing")


def test_status_prints_a_block_for_people(agent, capsys):
    assert cli.main(["status", "--config", agent.config_path]) == 0
    out = capsys.readouterr().out
    rt = agent.runtime.status()
    lines = out.splitlines()
    assert lines[0] == f"device    dev-a (fieldnode {agent.status()['version']}, agent pid {os.getpid()}): " \
                       f"SIMULATED board rpi4"
    assert [ln.split()[0] for ln in lines if not ln.startswith(" ")] == [
        "device", "serving", "governor", "sensor", "link", "spool", "worker", "results", "faults"]
    # the governor's planner asks for a variant by name (auto before its first step)
    assert f"variant {rt['variant']} (requested {rt.get('requested_variant') or 'auto'}), {rt['backend']} " \
           f"{rt['backend_version']} on " \
           f"{rt['delegate']}, {rt['threads']} threads" in out
    assert f"worker    pid {rt['worker_pid']} (process isolation)" in out
    assert "link      off (no broker configured)" in out and "faults    none" in out
    assert re.search(r"^results   \d+, 0 failures, p50 [\d.]+ ms; last \w+ [\d.]+, [\d.]+ s ago$", out, re.M), out
    assert not PYTHON_REPR.search(out), out


def test_status_json_is_the_agents_status_object(agent, capsys):
    assert cli.main(["status", "--config", agent.config_path, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert set(agent.status()) == set(st)  # the same object the MQTT status command returns
    assert st["device"] == "dev-a" and st["simulated"] is True and st["virtual_board"] == "rpi4"
    assert st["link"] is None and st["sensor"]["frames"] > 0 and st["results"] >= 1


def test_watch_prints_a_line_a_tick_like_the_demo(agent, capsys):
    assert cli.main(["status", "--config", agent.config_path, "--watch", "--count", "3", "--interval", "0.05"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"fieldnode status: device dev-a, agent pid {os.getpid()}, SIMULATED board rpi4;")
    assert len(lines) == 4
    worker = agent.runtime.status()["worker_pid"]
    for ln in lines[1:]:
        assert re.match(r"t= *[\d.]+s level=\w+ +temp= *[\d.]+C cap=\d+MHz batt=\S+ \w+/\w+ variant=\w+ +threads=\d "
                        r"serving=yes p50=[\d.]+ms sensor=ok frames=\d+ crc=0 link=off backlog=- dropped=- "
                        rf"worker={worker} restarts=0 results=\d+ failures=0 last=\w+\([\d.]+\) age=[\d.]+s "
                        r"faults=none SIMULATED$", ln), ln
    assert cli.main(["status", "--config", agent.config_path, "--watch", "--json", "--count", "2",
                     "--interval", "0.05"]) == 0
    docs = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert len(docs) == 2 and all(d["device"] == "dev-a" and d["simulated"] is True for d in docs)


def test_watch_says_when_the_agent_goes_and_another_process_answers(agent, tmp_path):
    cfg_path = write_config(str(tmp_path), str(tmp_path / "run"))
    path = socket_path(config.load(cfg_path))
    server = ControlServer(path, status_only(agent.status), group=None)
    server.start()
    snapshot = tmp_path / "status.json"
    snapshot.write_text(json.dumps(agent.status()))
    code = ("import json, sys\nfrom device.agent.controlserver import ControlServer\n"
            "st = json.load(open(sys.argv[2]))\n"
            "from device.link.commands import Registry\nreg = Registry()\n"
            "reg.register('status', lambda a, c: st, local=True)\n"
            "with ControlServer(sys.argv[1], reg, group=None):\n"
            "    print('ready', flush=True)\n    sys.stdin.read()\n")
    lines, procs = [], []

    def out(text):
        lines.append(text)
        if sum(ln.startswith("t=") for ln in lines) == 2 and server is not None and not procs \
                and os.path.exists(path):
            server.close()  # the agent goes away after the second line
        if text.startswith("agent unreachable"):  # ... and a new one (another process) comes
            p = subprocess.Popen([sys.executable, "-c", code, path, str(snapshot)], cwd=ROOT, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            procs.append(p)
            assert p.stdout.readline().strip() == "ready"

    args = SimpleNamespace(config=cfg_path, json=False, watch=True, interval=0.05, count=6, timeout=2.0)
    try:
        assert status_tool.run(args, out=out) == 0
    finally:
        server.close()
        for p in procs:
            p.stdin.close()
            p.wait(30)
    notes = [ln for ln in lines[1:] if not ln.startswith("t=")]
    assert len(notes) == 2, lines
    # The kept connection was closed: the client connects again at once, and finds no agent.
    assert notes[0].startswith(f"agent unreachable: no agent is running here (no control socket at {path})")
    assert notes[0].endswith("; retrying every 0.05 s (Ctrl-C to stop)")
    assert notes[1] == f"agent restarted: pid {procs[0].pid} (was {os.getpid()}); reconnected"
    assert sum(ln.startswith("t=") for ln in lines) == 5  # 6 ticks, one of them unreachable
    assert lines.index(notes[0]) == 3 and lines.index(notes[1]) == 4


def test_a_watch_that_ends_unreachable_exits_unreachable(tmp_path):
    cfg_path = write_config(str(tmp_path), str(tmp_path / "run"))
    path = socket_path(config.load(cfg_path))
    server = ControlServer(path, status_only(lambda: {"device": "dev-b", "simulated": False}), group=None)
    server.start()
    lines = []

    def out(text):
        lines.append(text)
        if text.startswith("t="):
            server.close()

    args = SimpleNamespace(config=cfg_path, json=False, watch=True, interval=0.05, count=3, timeout=2.0)
    assert status_tool.run(args, out=out) == Exit.UNREACHABLE
    assert lines[0].startswith("fieldnode status: device dev-b, agent pid") and "real board" in lines[0]
    assert lines[2].startswith("agent unreachable: ") and len(lines) == 3  # said once, not per tick


def run_entry(*argv):
    return subprocess.run([sys.executable, "-c", ENTRY, "status", *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_no_agent_is_one_line_and_exit_unreachable(tmp_path):
    cfg_path = write_config(str(tmp_path), str(tmp_path / "run"))
    path = os.path.join(str(tmp_path), "run", "control.sock")
    line = (f"fieldnode status: error [agent_unreachable]: no agent is running here (no control socket at {path}): "
            f"start it with systemctl start fieldnode\n")
    for extra in ([], ["--watch"]):
        p = run_entry("--config", cfg_path, *extra)
        assert (p.returncode, p.stdout, p.stderr) == (Exit.UNREACHABLE, "", line)
    p = run_entry("--config", cfg_path, "--json")
    assert p.returncode == Exit.UNREACHABLE and p.stderr == line
    assert json.loads(p.stdout) == {"ok": False, "error": {
        "code": "agent_unreachable", "message": line.split("[agent_unreachable]: ")[1].strip()}}


def test_bad_options_are_usage_errors(tmp_path, capsys):
    cfg_path = write_config(str(tmp_path), str(tmp_path / "run"))
    for bad in (["--interval", "0"], ["--interval", "nan"], ["--count", "0"], ["--timeout", "-1"]):
        with pytest.raises(SystemExit) as e:
            cli.main(["status", "--config", cfg_path, "--watch", *bad])
        assert e.value.code == 2
        assert "expected" in capsys.readouterr().err


def test_any_status_shape_is_printed_without_a_crash():
    # An agent of another version: missing parts, parts of the wrong type, an override, faults, a link down.
    odd = {"runtime": "x",
           "governor": {"level": "saver", "plan": 5, "override": {"level": "saver", "by": "op-1", "remaining_s": 90}},
           "sensor": None, "link": {"connected": False, "broker": "mqtts://hub:8883", "last_error": "refused"},
           "spool": {"messages": 3, "bytes": 2048, "oldest_age_s": 12.4, "dropped": {"telemetry": 2}},
           "faults": {"sensor": {"problem": "no frame for 6 s", "for_s": 6.2}, "runtime": "every variant quarantined"},
           "last_result": {"label": "imbalance", "score": 0.91}, "simulated": False, "trust_problems": ["bad.pub"]}
    for st in ({}, odd):
        text = "\n".join(status_tool.block(st)) + "\n" + status_tool.line(st, 1.0)
        assert not PYTHON_REPR.search(text), text
    text = "\n".join(status_tool.block(odd))
    assert "override saver by op-1, 90 s left" in text and "real board" in text
    assert "link      NOT connected to mqtts://hub:8883: refused" in text
    assert "spool     backlog 3 messages (2.0 kB, oldest 12 s), dropped telemetry 2" in text
    assert "faults    sensor: no frame for 6 s (for 6 s); runtime: every variant quarantined" in text
    assert "last imbalance 0.91, at an unknown time" in text and "trust     bad.pub" in text
    ln = status_tool.line(odd, 1.0)
    assert "level=saver(override)" in ln and "link=down backlog=3 dropped=2" in ln and "faults=sensor,runtime" in ln
    assert not ln.endswith("SIMULATED")
    assert "board simulated or real: not said by this agent" in status_tool.block({})[0]


def test_ctrl_c_ends_a_watch_cleanly(tmp_path):
    cfg_path = write_config(str(tmp_path), str(tmp_path / "run"))
    path = socket_path(config.load(cfg_path))
    with ControlServer(path, status_only(lambda: {"device": "dev-c", "simulated": True, "virtual_board": "rpi5"}),
                       group=None):
        p = subprocess.Popen([sys.executable, "-c", ENTRY, "status", "--config", cfg_path, "--watch",
                              "--interval", "0.05"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        try:
            header = p.stdout.readline()
            first = p.stdout.readline()
            p.send_signal(signal.SIGINT)
            rest, err = p.communicate(timeout=30)
        finally:
            if p.poll() is None:
                p.kill()
    assert header.startswith("fieldnode status: device dev-c, agent pid ") and "SIMULATED board rpi5" in header
    assert first.startswith("t=") and first.rstrip().endswith("SIMULATED")
    assert p.returncode == 0 and err == "", err  # the usual end of a watch: no traceback, no error
    assert all(ln.startswith("t=") for ln in rest.splitlines())
