"""A real agent (``fieldnode run`` with its zygote and inference worker, a real mosquitto) tells its parts apart in
``ps`` and ``top``: every thread of the agent carries its own OS name (``/proc/PID/task/TID/comm``, what ``top -H``
and ``ps -L`` show), none is a generic ``fieldnode``/``python`` but the main thread (the process's name), and the
three processes have three different command lines (what ``ps aux`` and ``systemctl status`` show)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from tests.link.test_agent import ROOT
from tests.waiting import eventually

DEV = "dev-threads"
AGENT_THREADS = {"link", "link-cmd", "spool", "sensor", "governor", "telemetry", "fault-watch", "control",
                 "sim-mcu", "sim-board"}


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def threads_of(pid: int) -> dict[int, str]:
    """``{tid: OS name}`` of a process."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = _read(f"/proc/{pid}/task/{tid}/comm").strip()
        except OSError:
            continue  # ended meanwhile
    return out


def cmdline(pid: int) -> str:
    return _read(f"/proc/{pid}/cmdline").replace("\0", " ").strip()


def children(pid: int) -> list[int]:
    return [int(p) for p in _read(f"/proc/{pid}/task/{pid}/children").split()]


def test_threads_and_processes_say_what_they_are(tmp_path, broker, mqtt_client):
    results = mqtt_client(broker)
    results.subscribe(f"fieldnode/v1/{DEV}/results/#")
    cfg = tmp_path / "fieldnode.toml"
    cfg.write_text("\n".join([
        "[device]", f'id = "{DEV}"', f'state_dir = "{tmp_path / "state"}"', f'runtime_dir = "{tmp_path / "run"}"',
        "[drivers]", 'virtual_board = "rpi4"',
        "[link]", f'broker = "{broker.url}"', "spool_commit_ms = 20"]) + "\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "run", "--config", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        eventually(lambda: results.messages(), timeout=120.0, what="a result from the agent (its worker serves)")
        def family() -> dict[str, int]:  # the worker is the zygote's child, or the agent's (a subreaper) once adopted
            kids = children(proc.pid)
            kids += [k for p in kids for k in children(p)]
            return {_read(f"/proc/{k}/comm").strip(): k for k in kids}

        named = eventually(lambda: (lambda f: f if {"fieldnode-fork", "fieldnode-infer"} <= set(f) else None)(
            family()), what="the zygote and its worker", detail=family)
        zygote, worker = named["fieldnode-fork"], named["fieldnode-infer"]

        agent = threads_of(proc.pid)
        names = sorted(agent.values())
        assert agent[proc.pid] == "fieldnode"  # the main thread (the inference loop) is the process's name
        assert AGENT_THREADS <= set(names), f"missing {AGENT_THREADS - set(names)} in {names}"
        generic = [n for tid, n in agent.items() if tid != proc.pid and (n == "fieldnode" or n.startswith("python"))]
        assert generic == [], f"threads without a name of their own: {names}"
        assert len(set(names)) == len(names), f"two threads of one name: {names}"

        assert _read(f"/proc/{zygote}/comm").strip() == "fieldnode-fork"
        workers = threads_of(worker)
        assert workers[worker] == "fieldnode-infer"
        assert all(n == "infer-pool" for tid, n in workers.items() if tid != worker), workers  # the interpreter's

        lines = [cmdline(proc.pid), cmdline(zygote), cmdline(worker)]
        assert " run " in f"{lines[0]} " and lines[1] == "fieldnode-fork" and lines[2] == "fieldnode-infer", lines
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
