"""The worker zygote (device/runtime/zygote.py) with real processes: workers forked from it are the agent's
own children, serve what an exec'd worker serves, crash, restart and hot-swap alike, and die with the agent;
a zygote that is gone hands over to exec.

Each scenario runs in a fresh process (tests/runtime/zygotechild.py), since the zygote must be forked from a
process with one thread.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT
from tests.runtime.zygotechild import state


def scenario(name: str, tmp_path, backend: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "tests.runtime.zygotechild", name, backend, str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def forked(proc: dict, me: int) -> bool:
    """A worker forked by the zygote and adopted by the agent (not exec'd)."""
    return proc["comm"] == "fieldnode-infer" and proc["ppid"] == me and not proc["exec"]


def test_workers_forked_by_the_zygote_serve_crash_restart_and_swap_as_the_agents_children(tmp_path, backend):
    out = scenario("serve", tmp_path, backend.name)
    me = out["me"]
    assert out["zygote"] == {"pid": out["zygote"]["pid"], "comm": "fieldnode-fork", "ppid": me}
    assert forked(out["first"], me), out["first"]
    assert out["equal"] is True  # bit-identical to the interpreter in this process
    # SIGKILLed while idle: the next request is served by a new worker, not counted against the model; the exit
    # status was read by waitpid.
    assert out["after_kill"] == "served", out["after_kill"]
    assert any("was killed by signal SIGKILL while idle" in w for w in out["warnings"]), out["warnings"]
    assert out["first_state_after"] is None  # reaped by the agent, not left a zombie
    assert out["equal_after_restart"] is True and forked(out["second"], me), out["second"]
    # The hot swap runs on its own thread; the new worker is forked by the zygote all the same.
    assert forked(out["third"], me) and out["lite_served"] is True, out["third"]
    assert out["status"] == {"crashes": 0, "restarts": 1}
    assert set(out["after_close"].values()) == {None}  # every worker stopped and reaped
    assert [w for w in out["warnings"] if "zygote" in w] == []  # it never fell back to exec
    assert out["zygote_after_stop"] is None


def test_a_crash_of_a_forked_worker_names_its_signal_and_its_stderr(tmp_path, backend):
    out = scenario("crash", tmp_path, backend.name)
    text = out["crash"]
    assert "while loading crashy.tflite" in text
    # The worker's stderr is the pipe the agent reads, so faulthandler's dump names the fault and the frame.
    assert "its stderr: Fatal Python error: Segmentation fault" in text and "allocate_tensors" in text, text


def test_a_zygote_that_is_gone_hands_over_to_exec_and_says_so_once(tmp_path, backend):
    out = scenario("zygote_killed", tmp_path, backend.name)
    # Reaped and said at once, before any worker is asked for, not left a zombie until the next spawn.
    assert out["reaped_at_once"] is True and out["current_before_spawn"] is False, out
    assert len(out["warned_before_spawn"]) == 1 and "SIGKILL" in out["warned_before_spawn"][0], out
    assert "25 MB" in out["warned_before_spawn"][0], out
    for w in (out["worker"], out["worker2"]):
        assert w["exec"] is True and w["ppid"] == out["me"], w
    assert out["served"] > 0
    assert out["zygote_state"] is None and out["current"] is False  # reaped, and no longer offered
    gone = [w for w in out["warnings"] if "zygote" in w]
    assert len(gone) == 1 and "started by exec from now on" in gone[0], out["warnings"]


def test_no_zygote_is_forked_from_a_process_that_runs_threads(tmp_path, backend):
    assert scenario("threads", tmp_path, backend.name) == {"zygote": False}


def test_the_zygote_and_its_workers_die_with_the_agent(tmp_path, backend):
    proc = subprocess.Popen([sys.executable, "-m", "tests.runtime.zygotechild", "orphan", backend.name,
                             str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        pids = json.loads(proc.stdout.readline())
        assert all(os.path.exists(f"/proc/{p}") for p in pids.values()), pids
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        end = time.monotonic() + 30
        left = list(pids.values())
        while left and time.monotonic() < end:
            left = [p for p in left if state(p) not in (None, "Z")]
            time.sleep(0.05)
        assert left == [], f"still running after the agent was killed: {left} of {pids}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

