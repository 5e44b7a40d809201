"""The link's single command thread is never held by a command that waits on the network: ``update.check``
against a repository that accepts connections and never answers replies ``started`` at once, ``ping`` is answered
while the check hangs, a second check is told one runs, and the outcome arrives as an ``update_check`` event.
The whole agent, its own link and dispatcher, a real mosquitto and a real listening socket."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from device import config
from device.agent.agent import Agent
from device.update import age
from device.update.errors import Busy
from tests.link.test_agent import DEV, Operator, operator_key, signed, write_config  # noqa: F401 - a fixture
from tests.update.reposim import model_repo

@pytest.fixture
def silent_repository():
    """``http://127.0.0.1:PORT``: the kernel accepts connections (the listen backlog), nobody ever answers."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield f"http://127.0.0.1:{s.getsockname()[1]}", s
    s.close()


def test_a_repository_that_never_answers_does_not_hold_the_command_thread(tmp_path, broker, operator_key,
                                                                          silent_repository):
    from device.runtime.manifest import bundled_model_dir

    url, listener = silent_repository
    identity, recipient = age.generate_identity()
    model = {"full": (os.path.join(bundled_model_dir(), "vibration_full.tflite"),
                      os.path.join(bundled_model_dir(), "vibration_testvectors.npz"))}
    root = model_repo(str(tmp_path / "repo"), {2: model}, {DEV: recipient})
    (tmp_path / "root.json").write_bytes(root)
    (tmp_path / "board.age").write_text(identity + "\n")
    os.chmod(tmp_path / "board.age", 0o600)
    path = write_config(tmp_path, broker)
    with open(path, "a") as f:  # a request waits 10 minutes, retried: far longer than any wait below
        f.write(f'[update]\nroot_file = "{tmp_path / "root.json"}"\nrepository = "{url}"\n'
                f'identity_file = "{tmp_path / "board.age"}"\nhwclass = "rpi4"\ntimeout_s = 600\n')
    events: list[tuple[str, dict]] = []
    seen = threading.Condition()

    def on_event(kind, data):
        with seen:
            events.append((kind, dict(data)))
            seen.notify_all()

    def checks():
        return [d for k, d in events if k == "update_check"]

    agent = Agent(config.load(path), on_event=on_event)
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    op = Operator(broker)
    try:
        assert agent.link.wait_connected(120)
        for _ in range(60):  # connected is not yet subscribed: ping until the board's command topic is live
            try:
                if op.send("ping", {}, timeout=2)["ok"]:
                    break
            except AssertionError:  # no reply yet
                continue
        else:
            raise AssertionError("the board never answered a ping")
        started = op.send("update.check", signed(operator_key, "update.check", {}), timeout=90)
        assert started["ok"] and started["result"]["started"] is True, started
        with seen:  # the check reaches the repository, which takes the connection and says nothing
            assert seen.wait_for(lambda: [d for d in checks() if d["state"] == "started"], 90)
        pong = op.send("ping", {}, timeout=90)  # answered while the check hangs
        assert pong["ok"] and pong["result"]["pong"] is True
        again = op.send("update.check", signed(operator_key, "update.check", {}), timeout=90)
        assert not again["ok"] and again["error"]["code"] == Busy.code and "already running" in \
            again["error"]["message"]
        st = op.send("update.status", {}, timeout=90)
        assert st["result"]["check"]["state"] == "started"
        assert [d["state"] for d in checks()] == ["started"]  # still hanging: no outcome yet
        listener.close()  # the repository goes away: the check fails, and says so as an event
        with seen:
            assert seen.wait_for(lambda: [d for d in checks() if d["state"] != "started"], 120)
        outcome = checks()[-1]
        assert outcome["state"] == "failed" and outcome["code"] and outcome["message"] and outcome["by"] == "operator"
        assert agent.updates.status()["check"]["state"] == "failed"
    finally:
        op.close()
        agent.stop()
        t.join(30)
