"""``fieldnode run`` as a real process, seen only from outside: systemd's notify socket, a real mosquitto, the
real ``fieldnode send``/``status``/``keys`` command lines, signals and ``/proc``.

The shared board (conftest ``board``) serves the checks that leave it as they found it; the lifecycle test has
its own broker and board because it kills both.
"""

from __future__ import annotations

import json
import os
import signal
import time

from tests.e2e import helpers as H
from tests.link.conftest import MqttTestClient
from tests.waiting import eventually

RESULTS = f"{H.PREFIX}/results/vibration"
SEND_TIMEOUT = "30"  # a bound only a hang exceeds, also on a loaded CI machine


def payloads(client: MqttTestClient, topic: str) -> list[dict]:
    return [json.loads(m.payload) for m in client.messages(topic)]


def retained_state(broker) -> tuple[bool, dict]:
    """What a client that subscribes now gets on the board's ``state`` topic: (retain flag, payload)."""
    c = MqttTestClient(broker, client_id=f"e2e-late-{time.monotonic_ns()}")
    try:
        c.connect()
        c.subscribe(f"{H.PREFIX}/state")
        m = c.wait_for_messages(1, timeout=H.HANG_S)[0]
        return m.retain, json.loads(m.payload)
    finally:
        c.close()


def wait_results(board, more: int, what: str = "results") -> list[dict]:
    """Waits for ``more`` new results on the shared board's results topic; returns the new ones."""
    seen = len(board.watcher.messages(RESULTS))
    board.watcher.wait_for_messages(seen + more, timeout=H.HANG_S, topic=RESULTS)
    return payloads(board.watcher, RESULTS)[seen:]


def send(board, *argv: str) -> tuple[int, dict]:
    """``fieldnode send --config BOARD ...``: the broker and the device id come from the board's own config."""
    return H.fieldnode_json("send", "--config", board.dirs.config, "--timeout", SEND_TIMEOUT, *argv)


# ------------------------------------------------------------------------------------------- the shared board


def test_ready_first_then_the_retained_birth_results_and_telemetry(board):
    msgs = board.notify.messages()
    assert msgs and msgs[0].startswith("READY=1\n"), msgs[:3]  # nothing is said before READY
    ready = msgs[0]
    assert "STATUS=serving vibration" in ready and "SIMULATED board" in ready, ready
    assert f"link {board.broker.url}" in ready, ready
    # NotifyAccess=main: only the agent itself speaks to systemd, never its worker.
    assert board.notify.senders() == {board.agent.pid}

    retain, state = retained_state(board.broker)
    assert retain and state["state"] == "online" and state["device"] == H.DEV, state
    assert state["serving"] is True and state["simulated"] is True and state["variant"], state

    new = wait_results(board, 3)
    ids = [r["id"] for r in new]
    assert all(isinstance(i, int) for i in ids) and ids == sorted(set(ids)), ids
    assert all(r["model"] == "vibration" and r["simulated"] is True and r["label"] for r in new), new[0]

    # Telemetry every second (the test config's telemetry_s); one sent after the first results counts them.
    tel = eventually(lambda: next((t for t in payloads(board.watcher, f"{H.PREFIX}/telemetry")
                                   if t["results"] >= 1), None), timeout=60.0, what="telemetry counting results")
    assert isinstance(tel["id"], int) and tel["governor"]["level"] and tel["latency"]["count"] >= 1, tel
    assert tel["sensor"]["frames"] > 0 and tel["spool"] is not None, tel


def test_ping_and_a_signed_variant_through_fieldnode_send(board):
    rc, reply = send(board, "ping")
    assert rc == 0 and reply["ok"] and reply["result"]["pong"] is True, reply

    # Unsigned: refused with exit 1, and nothing changes on the board.
    rc, reply = send(board, "variant", "--args", '{"variant": "lite"}')
    assert rc == 1 and not reply["ok"] and reply["error"]["code"] == "unauthorized", reply

    rc, reply = send(board, "variant", "--args", '{"variant": "lite"}', "--sign", board.operator.key)
    try:
        assert rc == 0 and reply["ok"], reply
        assert reply["result"]["variant"] == "lite" and reply["result"]["pinned"] == "lite", reply
        # What the board publishes follows: results made by the lite variant arrive.
        eventually(lambda: any(r["variant"] == "lite" for r in payloads(board.watcher, RESULTS)[-3:]), timeout=60.0, what="a result of the lite variant", detail=board.agent.log_tail)
    finally:  # the shared board goes back to the plan's choice
        rc, back = send(board, "variant", "--args", '{"variant": "auto"}', "--sign", board.operator.key)
    assert rc == 0 and back["ok"] and back["result"]["pinned"] is None, back


def test_fieldnode_status_on_the_control_socket_answers_as_the_mqtt_status_command(board):
    status = H.fieldnode("status", "--config", board.dirs.config)
    assert status.returncode == 0 and H.DEV in status.stdout and "SIMULATED" in status.stdout, status
    rc, local = H.fieldnode_json("status", "--config", board.dirs.config)
    assert rc == 0, local
    rc, reply = send(board, "status")
    assert rc == 0 and reply["ok"], reply
    remote = reply["result"]
    assert set(local) == set(remote)  # one source, one shape
    for key in ("device", "pid", "version", "simulated", "virtual_board", "serving", "faults"):
        assert local[key] == remote[key], key
    assert local["pid"] == board.agent.pid and local["device"] == H.DEV and local["serving"] is True
    for key in ("model", "variant", "backend", "delegate", "isolation", "worker_pid"):
        assert local["runtime"][key] == remote["runtime"][key], key
    assert local["runtime"]["worker_pid"] == board.agent.worker_pid()
    # `fieldnode run` forks its worker from the zygote (device/runtime/zygote.py), and the worker is the
    # agent's own child, so the agent reaps it and reads its exit status.
    assert H.comm(local["runtime"]["worker_pid"]) == "fieldnode-infer"
    assert board.agent.zygote_pid() is not None, board.agent.children()
    assert local["governor"]["level"] == remote["governor"]["level"]
    assert local["link"]["connected"] is True and remote["link"]["connected"] is True
    # Counters only grow between the two answers (the socket answered first).
    assert remote["results"] >= local["results"] > 0


def test_a_second_run_on_the_same_state_directory_is_refused(board):
    before = len(board.watcher.messages(RESULTS))
    env = H.env_for_child(NOTIFY_SOCKET=board.notify.path, WATCHDOG_USEC=str(H.WATCHDOG_USEC))
    second = H.fieldnode("run", "--config", board.dirs.config, env=env)
    said = [line for line in (second.stdout + second.stderr).splitlines() if line.strip()]
    assert second.returncode != 0, said
    assert len(said) == 1 and f"pid {board.agent.pid}" in said[0] and "state_dir_busy" in said[0], said
    assert "Traceback" not in second.stderr
    # The refused run told systemd nothing, and the first one goes on.
    assert board.notify.senders() == {board.agent.pid}
    assert board.agent.alive
    board.watcher.wait_for_messages(before + 1, timeout=H.HANG_S, topic=RESULTS)
    rc, local = H.fieldnode_json("status", "--config", board.dirs.config)
    assert rc == 0 and local["pid"] == board.agent.pid


def test_watchdog_pings_stop_while_the_inference_worker_hangs_and_resume(board):
    n = len(board.notify.pings())
    eventually(lambda: len(board.notify.pings()) >= n + 3, timeout=60.0, what="watchdog pings while healthy", detail=board.agent.log_tail)
    worker = board.agent.worker_pid()
    os.kill(worker, signal.SIGSTOP)  # a hang for real: the loop blocks in predict (deadline_ms is 10 minutes)
    try:
        eventually(lambda: H.proc_state(worker) == "T", timeout=60.0, what="the worker to stop")
        # No ping for 3 s = 6 intervals while the worker stays stopped: systemd's watchdog would fire.
        eventually(lambda: board.notify.quiet_for(3.0), timeout=60.0, what="the pings to stop with the worker hung", detail=board.agent.log_tail)
        assert H.proc_state(worker) == "T" and board.agent.alive  # only the pings tell systemd
        assert "watchdog: not pinging, no progress in loop" in board.agent.log()
        stopped_at = len(board.notify.pings())
        seen = len(board.watcher.messages(RESULTS))
    finally:
        os.kill(worker, signal.SIGCONT)
    eventually(lambda: len(board.notify.pings()) >= stopped_at + 2, timeout=60.0, what="the pings to resume", detail=board.agent.log_tail)
    board.watcher.wait_for_messages(seen + 1, timeout=H.HANG_S, topic=RESULTS)  # results resume too
    assert board.agent.worker_pid() == worker  # the same worker: it was waited for, not killed
    assert "watchdog: healthy again, pinging" in board.agent.log()


# ------------------------------------------------------------------------------------------ kill -9 and SIGTERM


def stable_status(config: str) -> dict:
    """The status of an agent whose worker is stopped, once two answers agree (the result in flight when the
    worker stopped, if any, is counted by then): its ``results`` and ``last_result`` then describe the same
    moment."""
    def agree():
        rc1, a = H.fieldnode_json("status", "--config", config)
        rc2, b = H.fieldnode_json("status", "--config", config)
        assert rc1 == rc2 == 0, (a, b)
        same = a["results"] == b["results"] and a["last_result"] == b["last_result"] and a["last_result"]
        return b if same else None

    return eventually(agree, timeout=60.0, what="two agreeing status answers")


def gone(pid: int) -> bool:
    return H.proc_state(pid) in (None, "Z")


def test_kill_9_is_lost_the_spool_replays_every_result_and_sigterm_is_offline(own_broker, board_dirs):
    broker = own_broker
    dirs = board_dirs(broker=broker)
    watcher = MqttTestClient(broker, client_id="e2e-lifecycle")
    watcher.connect()
    watcher.subscribe(f"{H.PREFIX}/#")
    notify = H.NotifyListener(dirs.notify_path)
    agents: list[H.AgentProcess] = []

    def start(name: str) -> H.AgentProcess:
        a = H.AgentProcess(dirs.config, notify, dirs.log(name))
        agents.append(a)
        a.ready()
        return a

    def states() -> list[str]:
        return [p["state"] for p in payloads(watcher, f"{H.PREFIX}/state")] or ["none yet"]

    def result_ids() -> list[int]:
        return [p["id"] for p in payloads(watcher, RESULTS)]

    try:
        # Run 1 dies by kill -9 with the broker up: the broker publishes the last will, retained.
        first = start("run1")
        eventually(lambda: states()[-1] == "online", timeout=60.0, what="online")
        watcher.wait_for_messages(2, timeout=H.HANG_S, topic=RESULTS)
        worker = first.worker_pid()
        zygote = first.zygote_pid()
        assert zygote is not None, first.children()
        first.signal(signal.SIGKILL)
        assert first.wait() == -signal.SIGKILL
        eventually(lambda: states()[-1] == "lost", timeout=60.0, what="the last will 'lost'", detail=broker.log_tail)
        assert retained_state(broker) == (True, {"state": "lost", "device": H.DEV, "session": 1})
        eventually(lambda: gone(worker), timeout=60.0, what="the worker to die with its agent")
        eventually(lambda: gone(zygote), timeout=60.0, what="the worker zygote to die with its agent")
        boundary1 = H.spool_last_id(dirs.state)  # nothing writes the spool now: run 2's ids are all above

        # Run 2: online again; then the broker goes away and results are spooled on disk.
        second = start("run2")
        eventually(lambda: states()[-1] == "online", timeout=60.0, what="online after the restart")
        eventually(lambda: any(i > boundary1 for i in result_ids()), timeout=60.0, what="a result of run 2")
        broker.stop()
        eventually(lambda: len([i for i in H.spooled_result_ids(dirs.state) if i > boundary1]) >= 5, timeout=60.0, what="results spooled while the broker is down", detail=second.log_tail)
        # Freeze inference (the worker stopped: the loop blocks in predict), so the agent's own count of
        # results and its last result id describe the same moment; then make sure that id is durable.
        worker = second.worker_pid()
        os.kill(worker, signal.SIGSTOP)
        st = stable_status(dirs.config)
        made, last = st["results"], st["last_result"]["id"]
        eventually(lambda: H.spool_last_id(dirs.state) >= last, timeout=60.0, what=f"result {last} committed to the spool")
        second.signal(signal.SIGKILL)
        assert second.wait() == -signal.SIGKILL
        eventually(lambda: gone(worker), timeout=60.0, what="the stopped worker to die with its agent")
        must_arrive = [i for i in H.spooled_result_ids(dirs.state) if i > boundary1]
        assert last in must_arrive and len(must_arrive) >= 5, (last, must_arrive)
        boundary2 = H.spool_last_id(dirs.state)

        # The broker and the agent come back: the spool replays.
        connects = watcher.connects
        broker.start()
        watcher.wait_connected(connects + 1, timeout=H.HANG_S)
        watcher.subscribe(f"{H.PREFIX}/#")
        third = start("run3")
        eventually(lambda: set(must_arrive) <= set(result_ids()), timeout=60.0, what="every spooled result", detail=lambda: f"missing {sorted(set(must_arrive) - set(result_ids()))[:5]}\n"
                                  f"{third.log_tail()}")
        eventually(lambda: any(i > boundary2 for i in result_ids()), timeout=60.0, what="a result of run 3 after the replay")
        ids = result_ids()
        run2 = sorted({i for i in ids if boundary1 < i <= last})
        # Nothing lost: every result run 2 made up to `last` (its own count) reached the broker, once each.
        assert len(run2) == made and run2[-1] == last, (made, len(run2))
        assert all(i <= boundary2 for i in run2)
        firsts = list(dict.fromkeys(ids))
        assert firsts == sorted(firsts), "results arrived out of id order"
        eventually(lambda: not set(must_arrive) & set(H.spooled_result_ids(dirs.state)), timeout=60.0, what="the replayed results acknowledged and gone from the spool")

        # SIGTERM: STOPPING=1, offline (retained), exit 0, within a bound only a hang exceeds.
        third.signal(signal.SIGTERM)
        assert third.wait(30) == 0, third.log_tail()
        said = notify.messages(third.pid)
        assert "STOPPING=1" in said, said
        assert "WATCHDOG=1" not in said[said.index("STOPPING=1"):]
        eventually(lambda: states()[-1] == "offline", timeout=60.0, what="offline")
        retain, state = retained_state(broker)
        assert retain and state["state"] == "offline" and state["device"] == H.DEV, state
        assert "Traceback" not in third.log()
    finally:
        for a in agents:
            a.kill()
        watcher.close()
        notify.close()


def quarantine_counts(state_dir: str) -> dict:
    """The runtime's crash counts per model file (``quarantine.json`` in the state directory), ``{}`` if none."""
    try:
        with open(os.path.join(state_dir, "quarantine.json"), encoding="utf-8") as f:
            return json.load(f).get("counts", {})
    except FileNotFoundError:
        return {}


def unit_stop_timeout_s() -> float:
    """``TimeoutStopSec=`` of the shipped unit: after it systemd SIGKILLs the agent (no ``offline``, a ``lost``)."""
    with open(os.path.join(H.ROOT, "systemd", "fieldnode.service"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("TimeoutStopSec="):
                return float(line.split("=", 1)[1].strip().rstrip("s"))
    raise AssertionError("no TimeoutStopSec= in systemd/fieldnode.service")


def test_sigterm_while_an_inference_hangs_still_drains_within_the_units_stop_timeout(own_broker, board_dirs):
    """A worker that never answers (here: stopped; runtime.deadline_ms is 10 minutes) must not turn a
    ``systemctl stop`` into systemd's SIGKILL: STOPPING=1 is said at once, the hung inference is given up
    (without blaming the model), ``offline`` is published and the exit is 0 before ``TimeoutStopSec``."""
    dirs = board_dirs(broker=own_broker)  # its own broker: the shared board has the same device id
    watcher = MqttTestClient(own_broker, client_id="e2e-hung-stop")
    watcher.connect()
    watcher.subscribe(f"{H.PREFIX}/state")
    notify = H.NotifyListener(dirs.notify_path)
    agent = H.AgentProcess(dirs.config, notify, dirs.log("hung"))
    try:
        agent.ready()
        eventually(lambda: len(notify.pings()) >= 2, timeout=60.0, what="watchdog pings while healthy", detail=agent.log_tail)
        worker = agent.worker_pid()
        os.kill(worker, signal.SIGSTOP)
        eventually(lambda: H.proc_state(worker) == "T", timeout=60.0, what="the worker to stop")
        eventually(lambda: notify.quiet_for(3.0), timeout=60.0, what="the loop to hang in predict", detail=agent.log_tail)
        agent.signal(signal.SIGTERM)
        eventually(lambda: "STOPPING=1" in notify.messages(agent.pid), timeout=10, what="STOPPING=1 on SIGTERM", detail=agent.log_tail)
        assert agent.wait(unit_stop_timeout_s()) == 0, agent.log_tail()
        eventually(lambda: json.loads(watcher.messages()[-1].payload)["state"] == "offline", timeout=60.0, what="offline")
        eventually(lambda: gone(worker), timeout=60.0, what="the hung worker to be gone")
        # Giving up an inference to stop is not a fault of the model: nothing counts towards its quarantine
        # (three such stops in a row would quarantine a good model), and the log says no error.
        counts = quarantine_counts(dirs.state)
        assert not any(counts.values()), f"a stop counted as a crash of the model file: {counts}"
        errors = [line for line in agent.log().splitlines() if " ERROR " in line]
        assert not errors, errors
    finally:
        agent.kill()
        watcher.close()
        notify.close()


def test_a_config_the_agent_refuses_exits_non_zero_in_one_line_before_ready(board_dirs):
    """A board whose config ``run`` refuses never says READY (systemd sees the start fail), in one line."""
    dirs = board_dirs(extra='protocol = "7"\n')
    notify = H.NotifyListener(dirs.notify_path)
    try:
        a = H.AgentProcess(dirs.config, notify, dirs.log("bad"))
        rc = a.wait()
        said = [line for line in a.log().splitlines() if line.strip()]
        assert rc != 0 and len(said) == 1 and "link.protocol" in said[0], said
        assert notify.messages() == []
    finally:
        notify.close()

