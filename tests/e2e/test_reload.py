"""SIGHUP (``systemctl reload fieldnode``) on a running ``fieldnode run``: the config file read again, what is safe
applied at once, what is not named as needing a restart, and a broken file changing nothing.

Seen from outside only: the file is edited as a person or a config manager would (replaced whole), the signal
is sent, and the answer is read on MQTT (``config_reloaded`` / ``config_reload_failed`` events, ``config.get``
through ``fieldnode send``) and in the agent's log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

from tests.e2e import helpers as H
from tests.waiting import eventually

EVENTS = f"{H.PREFIX}/events"
RESULTS = f"{H.PREFIX}/results/vibration"


def hup_and_wait(board, kind: str) -> dict:
    """Sends SIGHUP and returns the next event of ``kind`` (any kind of config reload event ends the wait, so a
    wrong answer fails at once with what it said)."""
    seen = len(board.watcher.messages(EVENTS))
    board.agent.signal(signal.SIGHUP)

    def answer():
        new = [json.loads(m.payload) for m in board.watcher.messages(EVENTS)[seen:]]
        return next((e for e in new if e["kind"].startswith("config_reload")), None)

    event = eventually(answer, timeout=60.0, what=f"a {kind} event after SIGHUP", detail=board.agent.log_tail)
    assert event["kind"] == kind, event
    assert board.agent.alive
    return event


def wait_event(board, kind: str, after: int) -> dict:
    """The first event of ``kind`` with an id above ``after`` (ids grow across every kind of message)."""
    def found():
        events = [json.loads(m.payload) for m in board.watcher.messages(EVENTS)]
        return next((e for e in events if e["kind"] == kind and e["id"] > after), None)

    return eventually(found, timeout=60.0, what=f"a {kind} event", detail=board.agent.log_tail)


def config_get(board, key: str):
    """The value in force on the board. ``fieldnode send`` is given the broker and the device (the board's file
    may be broken on purpose, and ``send`` would read it)."""
    rc, reply = H.fieldnode_json("send", "--broker", board.broker.url, "--device", H.DEV, "--timeout", "30",
                                 "config.get", "--args", json.dumps({"key": key}))
    assert rc == 0 and reply["ok"], reply
    return reply["result"][key]


def json_lines(text: str) -> list[dict]:
    """The agent's log lines (``--log-format json``); a line that is not JSON fails the test with it."""
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"a log line that is not JSON under --log-format json: {line!r}") from None
    return out


def test_sighup_applies_power_and_log_level_and_names_what_needs_a_restart(board):
    original = open(board.dirs.config, encoding="utf-8").read()
    log_at = len(board.agent.log())
    try:
        # The board runs at about 42 C: a balanced level entered at 35 C must take it there at the next step.
        H.edit_config(board.dirs.config, {"step_s = 0.5": "step_s = 0.7",
                                          "thermal_target_c = 77": "thermal_target_c = 30",
                                          "[power.balanced]": "[power.balanced]\nenter_temp_c = 35",
                                          'log_level = "info"': 'log_level = "debug"',
                                          "threads = 2": "threads = 1"})
        event = hup_and_wait(board, "config_reloaded")
        assert {"power.step_s", "power.thermal_target_c", "power.balanced.enter_temp_c",
                "device.log_level"} <= set(event["applied"]), event
        assert event["needs_restart"] == ["runtime.threads"], event
        assert isinstance(event["id"], int)
        # Applied for real: the governor decides by the new thresholds (a level change, not an override).
        level = wait_event(board, "governor_level", after=event["id"])
        assert level["to"] == "balanced" and level["override"] is False, level

        # In force: the new step; the old thread count until a restart (config.get answers the config in force).
        assert config_get(board, "power.step_s") == 0.7
        assert config_get(board, "runtime.threads") == 2
        # The new level is in force, in the format the command line chose (not the file's "text").
        eventually(lambda: any(d["level"] == "debug" for d in json_lines(board.agent.log()[log_at:])), timeout=60.0, what="a debug line in the log after the reload", detail=board.agent.log_tail)
        lines = json_lines(board.agent.log()[log_at:])
        assert any("runtime.threads" in d["message"] and d["level"] == "warning" for d in lines), lines[-5:]

        # A file run would refuse changes nothing: the event names the key, and the agent goes on.
        H.edit_config(board.dirs.config, {"step_s = 0.7": "step_s = 0"})
        failed = hup_and_wait(board, "config_reload_failed")
        assert failed["key"] == "power.step_s" and failed["code"] == "config_invalid", failed
        assert "power.step_s" in failed["error"] and "0.1" in failed["error"], failed  # the rule, for people
        assert config_get(board, "power.step_s") == 0.7
        eventually(lambda: any(json.loads(m.payload)["id"] > failed["id"]
                               for m in board.watcher.messages(RESULTS)), timeout=60.0, what="a result published after the failed reload", detail=board.agent.log_tail)

        # A file that is not TOML at all: the same, with no key to name.
        with open(board.dirs.config, "a", encoding="utf-8") as f:
            f.write("[device\n")
        failed = hup_and_wait(board, "config_reload_failed")
        assert failed["code"] == "config_invalid" and board.dirs.config in failed["error"], failed
        assert failed["key"] is None, failed
    finally:
        # The file as it was: the reload puts the shared board back (the thread count never changed).
        with open(board.dirs.config, "w", encoding="utf-8") as f:
            f.write(original)
    event = hup_and_wait(board, "config_reloaded")
    assert {"power.step_s", "power.balanced.enter_temp_c", "device.log_level"} <= set(event["applied"]), event
    assert event["needs_restart"] == [], event
    assert config_get(board, "power.step_s") == 0.5
    level = wait_event(board, "governor_level", after=event["id"])
    assert level["to"] == "performance" and level["override"] is False, level
    assert "Traceback" not in board.agent.log()


def test_sighup_with_an_unchanged_file_reloads_the_operator_keys(board, tmp_path):
    """A key added to the trust directory is the usual reason to reload: before, its signature is refused;
    after SIGHUP with an unchanged config file, it is accepted."""
    made = H.fieldnode("keys", "generate", "second-operator", "--out", str(tmp_path))
    assert made.returncode == 0, made.stderr
    key = str(tmp_path / "second-operator.key")
    argv = ("send", "--config", board.dirs.config, "--timeout", "30", "governor", "--args", '{"level": "auto"}',
            "--sign", key)
    rc, reply = H.fieldnode_json(*argv)
    assert rc == 1 and reply["error"]["code"] == "unknown_key", reply

    shutil.copy(tmp_path / "second-operator.pub", f"{board.dirs.trust}/second-operator.pub")
    event = hup_and_wait(board, "config_reloaded")
    assert event["needs_restart"] == [] and "link.trust_dir keys" in event["applied"], event
    rc, reply = H.fieldnode_json(*argv)
    assert rc == 0 and reply["ok"], reply


def test_sighup_with_a_trust_key_that_cannot_be_read_keeps_the_keys_in_force(board):
    """A read error must not drop a key while the reload says it succeeded (its signed commands would then fail
    ``unknown_key``): the reload fails naming the file, and the key in force still verifies."""
    from device.link.errors import KeyFileError

    pub = f"{board.dirs.trust}/operator.pub"
    kept = f"{board.dirs.root}/operator.pub.kept"
    argv = ("send", "--config", board.dirs.config, "--timeout", "30", "governor", "--args", '{"level": "auto"}',
            "--sign", board.operator.key)
    shutil.move(pub, kept)
    try:
        os.symlink("operator.pub", pub)  # opening it fails (ELOOP) whoever reads it, root included
        failed = hup_and_wait(board, "config_reload_failed")
        assert failed["code"] == KeyFileError.code and failed["key"] == "link.trust_dir", failed
        assert pub in failed["error"] and "cannot read it" in failed["error"], failed
        rc, reply = H.fieldnode_json(*argv)
        assert rc == 0 and reply["ok"], reply
    finally:
        if os.path.islink(pub):
            os.unlink(pub)
        shutil.move(kept, pub)
    event = hup_and_wait(board, "config_reloaded")
    assert "link.trust_dir keys" in event["applied"], event
    rc, reply = H.fieldnode_json(*argv)
    assert rc == 0 and reply["ok"], reply
