"""Signals and kills from outside on a running ``fieldnode run``: a flood of SIGHUPs, a SIGHUP during start-up,
SIGHUPs to the zygote and the worker, SIGKILLs of idle workers and of the zygote.

Seen from outside only: signals sent with ``kill``, the agent's log, ``fieldnode status --json`` on the control
socket, ``/proc``. Each negative check ("nothing changed") is ordered after an event that could only happen once
the signal had been dealt with: a process handles a pending signal before it runs again, so a worker that served
a request sent after the signal, or a zygote that forked a worker asked for after it, has met the signal.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Iterator

import pytest

from tests.e2e import helpers as H
from tests.e2e.conftest import BoardDirs
from tests.waiting import eventually

# HUPs sent back to back (about half a second of them here): the kernel merges those that come while one is
# pending, so it takes a sustained flood for some to land while the agent's handler runs. Before the handler only
# set a flag, handlers nested under it until a RecursionError ended the agent.
FLOOD = 300_000


def status(config: str) -> dict:
    rc, st = H.fieldnode_json("status", "--config", config)
    assert rc == 0, st
    return st


def reloads(agent: H.AgentProcess) -> int:
    """How many reloads the agent has logged (``reloaded: ...`` at info, or the restart warning)."""
    return sum(1 for line in agent.log().splitlines() if "reloaded" in line and "reload refused" not in line)


def reloaded_since(agent: H.AgentProcess, before: int) -> bool:
    if not agent.alive:
        raise AssertionError(f"the agent died with {agent.proc.returncode}\n{agent.log_tail()}")
    return reloads(agent) > before


def served_after(config: str, agent: H.AgentProcess, requests: int) -> dict:
    """The status once the runtime has served more than ``requests`` requests."""
    return eventually(lambda: (lambda st: st if st["runtime"]["requests"] > requests else None)(status(config)), timeout=60.0, what=f"more than {requests} requests served", detail=agent.log_tail)


def alive(pid: int) -> bool:
    return H.proc_state(pid) not in (None, "Z")


class Board:
    def __init__(self, dirs: BoardDirs, name: str):
        self.dirs = dirs
        self.notify = H.NotifyListener(dirs.notify_path)
        self.agent = H.AgentProcess(dirs.config, self.notify, dirs.log(name))

    def close(self) -> None:
        try:
            if self.agent.alive:
                self.agent.signal(signal.SIGTERM)
                self.agent.wait()
        finally:
            self.agent.kill()
            self.notify.close()
            self.dirs.remove()


@pytest.fixture(scope="module")
def hup_board(e2e_broker, operator_key) -> Iterator[Board]:
    """A board of this module's own: the checks flood it with signals."""
    b = Board(BoardDirs(e2e_broker, operator_key), "hup")
    try:
        b.agent.ready()
        yield b
    finally:
        b.close()


def test_a_flood_of_sighups_is_coalesced_into_reloads_and_the_agent_lives(hup_board):
    agent, config = hup_board.agent, hup_board.dirs.config
    zygote, worker = agent.zygote_pid(), agent.worker_pid()
    before = reloads(agent)
    for _ in range(FLOOD):
        os.kill(agent.pid, signal.SIGHUP)
    eventually(lambda: reloaded_since(agent, before), timeout=60.0, what="a reload after the flood", detail=agent.log_tail)
    assert agent.alive, agent.log_tail()
    # A reload still does its work after the flood: a changed key that needs a restart is named.
    try:
        H.edit_config(config, {"threads = 2": "threads = 1"})
        agent.signal(signal.SIGHUP)
        eventually(lambda: "runtime.threads" in agent.log(), timeout=60.0, what="the reload of the edited file", detail=agent.log_tail)
    finally:
        H.edit_config(config, {"threads = 1": "threads = 2"})
    log = agent.log()
    assert "Traceback" not in log and "RecursionError" not in log, agent.log_tail()
    # The flood went to the agent only: its worker and zygote are the ones it had.
    requests = status(config)["runtime"]["requests"]
    st = served_after(config, agent, requests)
    assert st["runtime"]["worker_pid"] == worker and agent.zygote_pid() == zygote, st["runtime"]


def test_sighups_to_the_zygote_and_the_worker_change_nothing(hup_board):
    agent, config = hup_board.agent, hup_board.dirs.config
    zygote, worker = agent.zygote_pid(), agent.worker_pid()
    assert zygote is not None, "fieldnode run forks a worker zygote"
    before = status(config)["runtime"]
    for _ in range(50):
        os.kill(worker, signal.SIGHUP)
        os.kill(zygote, signal.SIGHUP)
    # The worker served requests sent after the HUPs: it is the same process, and nothing was counted.
    st = served_after(config, agent, before["requests"])["runtime"]
    assert st["worker_pid"] == worker and alive(worker), st
    assert (st["crashes"], st["restarts"]) == (before["crashes"], before["restarts"]), st
    # The zygote forks the next worker asked for after the HUPs (the worker killed from outside, while idle).
    os.kill(worker, signal.SIGKILL)
    new = eventually(lambda: (lambda p: p if p != worker else None)(status(config)["runtime"]["worker_pid"]), timeout=60.0, what="a new worker", detail=agent.log_tail)
    assert H.comm(new) == "fieldnode-infer" and "device.runtime.worker" not in H.cmdline(new), H.cmdline(new)
    assert agent.zygote_pid() == zygote and alive(zygote)
    assert "zygote" not in agent.log(), agent.log_tail()  # it never fell back to exec


def test_a_sighup_during_start_up_is_kept_for_the_first_turn(e2e_broker, operator_key):
    """HUPs from the moment the zygote exists (the agent is still building its parts) until READY: the agent and
    the zygote live, and the agent reloads once it runs."""
    b = Board(BoardDirs(e2e_broker, operator_key), "early")
    stop = threading.Event()
    sent = {"agent": 0, "zygote": 0}

    def hup_until_ready():
        zygote = eventually(lambda: b.agent.zygote_pid() if b.agent.alive else -1, timeout=60.0, what="the zygote", detail=b.agent.log_tail)
        while not stop.is_set() and b.agent.alive:
            for who, pid in (("agent", b.agent.pid), ("zygote", zygote)):
                try:
                    os.kill(pid, signal.SIGHUP)
                    sent[who] += 1
                except ProcessLookupError:
                    pass
            stop.wait(0.02)

    t = threading.Thread(target=hup_until_ready, name="hup-sender", daemon=True)
    t.start()
    try:
        b.agent.ready()
        stop.set()
        t.join(H.HANG_S)
        assert sent["agent"] > 0 and sent["zygote"] > 0, sent
        zygote = b.agent.zygote_pid()
        assert zygote is not None and alive(zygote)
        eventually(lambda: reloaded_since(b.agent, 0), timeout=60.0, what="the reload asked for during start-up", detail=b.agent.log_tail)
        b.agent.signal(signal.SIGTERM)
        assert b.agent.wait() == 0, b.agent.log_tail()
    finally:
        stop.set()
        b.close()


def test_a_killed_zygote_is_reaped_at_once_and_said_once(hup_board):
    """Last on this board: it loses its zygote. No zombie is left until the next spawn; the loss is one warning,
    and the next worker is exec'd and serves."""
    agent, config = hup_board.agent, hup_board.dirs.config
    zygote, worker = agent.zygote_pid(), agent.worker_pid()
    os.kill(zygote, signal.SIGKILL)
    eventually(lambda: H.proc_state(zygote) is None, timeout=60.0, what=f"the killed zygote {zygote} to be reaped", detail=lambda: f"state {H.proc_state(zygote)}\n{agent.log_tail()}")
    said = eventually(lambda: [ln for ln in agent.log().splitlines() if "zygote" in ln], timeout=60.0, what="the zygote's loss said", detail=agent.log_tail)
    assert len(said) == 1 and "SIGKILL" in said[0] and "WARNING" in said[0] and "25 MB" in said[0], said
    os.kill(worker, signal.SIGKILL)
    new = eventually(lambda: (lambda p: p if p not in (None, worker) else None)(status(config)["runtime"]["worker_pid"]), timeout=60.0, what="a new worker", detail=agent.log_tail)
    assert "device.runtime.worker" in H.cmdline(new), H.cmdline(new)  # exec'd now
    served_after(config, agent, status(config)["runtime"]["requests"])
    assert len([ln for ln in agent.log().splitlines() if "zygote" in ln]) == 1, agent.log_tail()
