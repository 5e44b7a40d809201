"""``fieldnode status`` when something is wrong: a config file with a typo beside an agent that runs on the
config it started with, the keys a reload left waiting for a restart, the runtime's last error, and the exit code
that says the agent reports faults. Against a real agent on a virtual board and real control sockets."""

from __future__ import annotations

import json
import os
import threading
from types import SimpleNamespace

import pytest

from device import config
from device.agent.controlserver import ControlServer
from device.control import ControlUnavailable
from device.errors import Exit
from device.link.commands import Registry
from tools import cli
from tools import status as status_tool
from tools.status import runtime_dir_anyway
from tests.waiting import eventually


def write_config(directory, runtime_dir, isolation: str = "inline") -> str:
    path = os.path.join(directory, "fieldnode.toml")
    with open(path, "w") as f:
        f.write("\n".join([
            "[device]", 'id = "dev-a"', f'state_dir = "{os.path.join(directory, "state")}"',
            f'runtime_dir = "{runtime_dir}"', "[runtime]", f'isolation = "{isolation}"', 'delegate = "cpu"',
            "threads = 2", "[drivers]", 'virtual_board = "rpi4"', "[power]", "step_s = 0.5"]) + "\n")
    return path


@pytest.fixture
def agent(tmp_path):
    """A real agent on a virtual board, with no broker, answering on its control socket in tmp_path."""
    from device.agent.agent import Agent

    path = write_config(str(tmp_path), str(tmp_path / "run"))
    a = Agent(config.load(path))
    t = threading.Thread(target=a.run, daemon=True)
    t.start()
    eventually(lambda: a.results >= 1 and a.control is not None, timeout=60, what="the agent's first result")
    a.config_path = path
    yield a
    a.stop()
    t.join(30)


@pytest.fixture(autouse=True)
def registered():
    if "status" not in cli.COMMANDS:
        cli._lazy("tools.status", "status", "ask the running agent what it is doing")


def status_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["status", *argv])
    got = capsys.readouterr()
    return code, got.out, got.err


# ------------------------------------------------------------------------------------- a config with a typo


def test_a_config_typo_still_shows_the_agents_status_and_names_the_error(agent, capsys):
    with open(agent.config_path, "a") as f:
        f.write("stpe_s = 1\n")  # a typo in [power], made while the agent runs on the config it started with
    code, out, err = status_cli(capsys, "--config", agent.config_path)
    lines = out.splitlines()
    assert lines[0].startswith("config    ERROR, the agent runs on the config it started with: ")
    assert f"{agent.config_path}: power.stpe_s: unknown key; did you mean 'power.step_s'?" in lines[0]
    assert lines[1].startswith(f"device    dev-a (fieldnode {agent.status()['version']}, agent pid {os.getpid()})")
    assert "faults    none" in out and err == ""
    assert code == Exit.FAULTS  # the next start or reload would fail: a script must notice

    code, out, err = status_cli(capsys, "--config", agent.config_path, "--json")
    assert json.loads(out)["device"] == "dev-a"  # stdout stays one status object
    assert err.startswith("config    ERROR") and "power.stpe_s" in err and code == Exit.FAULTS


def test_a_config_that_is_not_toml_still_finds_the_agent(agent, capsys):
    with open(agent.config_path, "a") as f:
        f.write("[runtime\n")  # not TOML any more: runtime_dir is read from its line alone
    code, out, _ = status_cli(capsys, "--config", agent.config_path)
    assert "invalid TOML" in out.splitlines()[0] and out.splitlines()[1].startswith("device    dev-a")
    assert code == Exit.FAULTS


def test_a_watch_says_the_config_error_once_and_goes_on(agent, capsys):
    with open(agent.config_path, "a") as f:
        f.write("stpe_s = 1\n")
    code, out, _ = status_cli(capsys, "--config", agent.config_path, "--watch", "--count", "2", "--interval", "0.05")
    lines = out.splitlines()
    assert lines[0].startswith("fieldnode status: device dev-a") and lines[1].startswith("config    ERROR")
    assert sum(ln.startswith("t=") for ln in lines) == 2 and len(lines) == 4
    assert code == Exit.FAULTS


def test_a_config_typo_and_no_agent_says_both(tmp_path, capsys):
    path = write_config(str(tmp_path), str(tmp_path / "run"))
    with open(path, "a") as f:
        f.write("stpe_s = 1\n")
    code, out, err = status_cli(capsys, "--config", path)
    sock = tmp_path / "run" / "control.sock"
    assert out == ""
    first, second = err.splitlines()
    assert first.startswith("config    ERROR") and "power.stpe_s" in first
    assert second.startswith(f"fieldnode status: error [{ControlUnavailable.code}]: ") and str(sock) in second
    assert code not in (Exit.OK, Exit.USAGE, Exit.FAULTS)  # the agent was looked for, at the file's runtime_dir


def test_runtime_dir_anyway_reads_the_one_key(tmp_path):
    default = config.Config().device.runtime_dir
    f = tmp_path / "c.toml"
    cases = [
        ('[device]\nruntime_dir = "/srv/a"\nbogus = 1\n', "/srv/a"),  # TOML, another key wrong
        ('[device]\nruntime_dir = "/srv/b" # a comment\n[runtime\n', "/srv/b"),  # not TOML: read line by line
        ('[runtime]\nruntime_dir = "/srv/e"\n[power\n', default),  # another table's key is not it
        ('[device]\nruntime_dir = ""\n', default),  # empty
        ('[device]\nruntime_dir = 5\n', default),  # not a string
    ]
    for text, want in cases:
        f.write_text(text)
        assert runtime_dir_anyway(str(f)) == want, text
    assert runtime_dir_anyway(str(tmp_path / "missing.toml")) == default
    f.write_text('[device]\nruntime_dir = "/srv/g"\n')
    assert runtime_dir_anyway(None, {"FIELDNODE_CONFIG": str(f)}) == "/srv/g"  # found as config.load finds it


# ------------------------------------------------------------------------------------ a reload's leftovers


def test_keys_waiting_for_a_restart_and_a_failed_reload_show(agent, capsys):
    with open(agent.config_path) as f:
        good = f.read()
    with open(agent.config_path, "w") as f:
        f.write(good.replace("threads = 2", "threads = 1"))
    assert agent.reload()["needs_restart"] == ["runtime.threads"]
    code, out, _ = status_cli(capsys, "--config", agent.config_path)
    assert ("config    changed in the file, applied at the next restart (systemctl restart fieldnode): "
            "runtime.threads") in out.splitlines()
    assert code == Exit.OK
    st = json.loads(status_cli(capsys, "--config", agent.config_path, "--json")[1])
    assert st["config"]["needs_restart"] == ["runtime.threads"] and st["config"]["reload_error"] is None
    assert st["config"]["source"] == agent.config_path

    with open(agent.config_path, "w") as f:
        f.write(good.replace("threads = 2", "threads = 0"))
    assert "error" in agent.reload()
    code, out, _ = status_cli(capsys, "--config", agent.config_path)
    lines = out.splitlines()
    assert lines[0].startswith("config    ERROR") and "runtime.threads: expected an integer" in lines[0]
    assert any(ln.startswith("config    the last reload failed and changed nothing: ") and "runtime.threads" in ln
               for ln in lines), out
    assert any(ln.endswith("restart fieldnode): runtime.threads") for ln in lines), out  # still waiting
    assert code == Exit.FAULTS


# ----------------------------------------------------------------------------- faults and the exit code


def serve(tmp_path, st: dict) -> tuple[str, ControlServer]:
    path = write_config(str(tmp_path), str(tmp_path / "run"))
    reg = Registry()
    reg.register("status", lambda args, ctx: st, local=True)
    server = ControlServer(os.path.join(str(tmp_path / "run"), "control.sock"), reg, group=None)
    server.start()
    return path, server


def test_faults_are_a_documented_exit_code(tmp_path, capsys):
    st = {"device": "dev-f", "simulated": False,
          "faults": {"link": {"problem": "not connected to mqtt://hub:1883 (refused)", "for_s": 42.0}}}
    path, server = serve(tmp_path, st)
    try:
        code, out, _ = status_cli(capsys, "--config", path)
        assert code == Exit.FAULTS == 6
        assert "faults    link: not connected to mqtt://hub:1883 (refused) (for 42 s)" in out
        code, out, _ = status_cli(capsys, "--config", path, "--json")
        assert code == Exit.FAULTS and json.loads(out)["faults"]["link"]["for_s"] == 42.0
        args = SimpleNamespace(config=path, json=False, watch=True, interval=0.05, count=2, timeout=2.0)
        assert status_tool.run(args, out=lambda text: None) == Exit.FAULTS
        st["faults"] = {}
        assert status_cli(capsys, "--config", path)[0] == Exit.OK
        assert status_tool.run(args, out=lambda text: None) == Exit.OK
    finally:
        server.close()


def test_the_block_shows_the_runtimes_last_error():
    st = {"runtime": {"worker_pid": 845, "isolation": "process", "restarts": 1, "crashes": 0, "timeouts": 1,
                      "last_error": "inference worker (pid 844) gave no answer within 5000 ms and was killed"}}
    lines = status_tool.block(st)
    i = next(i for i, ln in enumerate(lines) if ln.startswith("worker    pid 845"))
    assert lines[i + 1] == "          last error: inference worker (pid 844) gave no answer within 5000 ms and was killed"
    assert not any("last error" in ln for ln in status_tool.block({"runtime": {"last_error": None}}))
