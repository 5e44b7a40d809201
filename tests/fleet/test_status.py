"""``fieldnode fleet status`` against a real mosquitto and real boards: the counts and lists of exactly what the
boards retain (online, offline by a clean stop, lost by the will of a killed board, another group, unreadable
states), ``--where`` and ``--group``, the ``--known`` file, ``--watch`` with the session rule, an empty broker,
and every bad ``--where`` refused naming what is wrong."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import threading

import pytest

from device.link import presence
from tools import cli
from tools.fleet import status
from tools.fleet.states import FleetView, parse_state
from tools.fleet.where import compare_versions, parse_where
from tests.fleet.boards import Board
from tests.waiting import eventually


def run_json(capsys, fleet, *words: str) -> dict:
    capsys.readouterr()
    assert cli.main(fleet.cli("fleet", "status", "--json", *words)) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------------------ a fleet's view


def test_status_counts_and_lists_exactly_what_the_boards_retain(fleet, capsys):
    doc = run_json(capsys, fleet)
    assert doc["complete"] and doc["boards_seen"] == doc["selected"] == 6
    assert doc["counts"]["state"] == {"lost": 1, "offline": 1, "online": 4}
    # Without --known, an offline or lost board's models are unknown (its state says only its groups).
    assert doc["counts"]["group"] == {"ring-1": 1, "site-a": 5, "site-b": 1}
    assert doc["counts"]["model"] == {"(unknown)": 2, "vibration 1.0.0": 2, "vibration 1.1.0": 2}
    assert doc["counts"]["update"] == {"(unknown)": 2, "idle": 3, "trial": 1}
    listed = {b["device"]: b for b in doc["boards"]}
    assert sorted(listed) == ["dev-d", "dev-e"]
    assert listed["dev-d"]["state"] == "offline" and isinstance(listed["dev-d"]["last_seen"], float)
    assert listed["dev-e"]["state"] == "lost" and listed["dev-e"]["last_seen"] is None  # a will says no time
    assert sorted(doc["unreadable"]) == ["dev-x", "dev-y"]
    assert "not valid JSON" in doc["unreadable"]["dev-x"]
    assert "'state': expected one of online, offline, lost, got 'sleeping'" == doc["unreadable"]["dev-y"]


def test_the_known_file_remembers_the_groups_and_models_of_boards_that_are_away(fleet, capsys):
    doc = run_json(capsys, fleet, "--known", str(fleet.known))
    assert doc["counts"]["group"] == {"ring-1": 1, "site-a": 5, "site-b": 1}
    assert doc["counts"]["model"] == {"vibration 1.0.0": 4, "vibration 1.1.0": 2}
    lost = {b["device"]: b for b in doc["boards"]}["dev-e"]
    assert lost["summary_from"] == "last_online" and isinstance(lost["last_seen"], float)  # its last online's time
    away = run_json(capsys, fleet, "--known", str(fleet.known), "--where", "group=site-a,state!=online")
    assert [b["device"] for b in away["boards"]] == ["dev-d", "dev-e"]


def test_the_text_output_for_people(fleet, capsys):
    capsys.readouterr()
    assert cli.main(fleet.cli("fleet", "status")) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "6 boards, 2 unreadable"
    assert "by state:  lost 1, offline 1, online 4" in out
    assert out[out.index("offline and lost:") + 1].split()[:2] == ["dev-d", "offline"]
    assert "last seen unknown" in out[out.index("offline and lost:") + 2]
    assert out[-3] == "unreadable:" and out[-2].startswith("  dev-x") and out[-1].startswith("  dev-y")


@pytest.mark.parametrize("where, boards", [
    ("model=vibration,version=1.1.0", ["dev-b", "dev-c"]),  # who runs X version Y
    ("version<1.1", ["dev-a", "dev-f"]),
    ("version>=1.0.0,update=trial", ["dev-b"]),
    ("state=lost", ["dev-e"]),
    ("state=lost,version>0", []),  # its model is unknown without --known: no model condition can hold
    ("state!=online", ["dev-d", "dev-e"]),
    ("group=site-a,group!=ring-1,state=online", ["dev-a", "dev-f"]),
    ("model!=vibration", []),
    ("level=balanced,variant=lite,fault!=sensor,group=site-b", ["dev-c"]),
])
def test_where_lists_the_matching_boards(fleet, capsys, where, boards):
    doc = run_json(capsys, fleet, "--where", where)
    assert [b["device"] for b in doc["boards"]] == boards and doc["selected"] == len(boards)


def test_group_counts_its_members_only(fleet, capsys):
    doc = run_json(capsys, fleet, "--group", "site-b")
    assert doc["selected"] == 1 and doc["counts"]["state"] == {"online": 1} and doc["boards"] == []
    capsys.readouterr()
    assert cli.main(fleet.cli("fleet", "status", "--group", "ring-1", "--where", "update=trial")) == 0
    assert capsys.readouterr().out.splitlines()[0] == "1 board in group ring-1 and where update=trial (of 6), " \
                                                      "2 unreadable"


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("where, why", [
    ("", "empty expression"),
    ("model~x", "condition 1 ('model~x'): expected KEY OP VALUE"),
    ("colour=red", "unknown key 'colour'; expected one of model, version"),
    ("model=x,,state=online", "condition 2 is empty"),
    ("state=sleeping", "'sleeping' is not a state; expected one of online, offline, lost"),
    ("update=paused", "'paused' is not a update"),
    ("level<3", "'<' compares versions only; level takes = and !="),
    ("version=", "expected one value after '='"),
    ("version<=1<2", "expected one value after '<='"),
])
def test_a_bad_where_is_a_usage_error_naming_what_is_wrong(capsys, where, why):
    with pytest.raises(ValueError) as err:
        parse_where(where)
    assert why in str(err.value)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fleet", "status", "--broker", "mqtt://127.0.0.1:9", "--where", where])
    assert exit_.value.code == 2 and why in capsys.readouterr().err


def test_versions_compare_as_dotted_numbers_when_both_are():
    assert compare_versions("1.10", ">", "1.9") and compare_versions("1.0", "<", "1.0.1")
    assert compare_versions("1.0-rc1", ">", "1.0") and compare_versions("2", "=", "2")


@pytest.mark.parametrize("payload, why", [
    (b"", "payload is empty"),
    (b"[1]", "payload is an array, expected a JSON object"),
    (b'{"state": "online", "session": "7"}', "'session': expected an integer, got '7'"),
    (b'{"state": "online", "groups": "site-a"}', "'groups': expected a list, got 'site-a'"),
    (b'{"state": "online", "groups": [1]}', "'groups': expected a list of strings"),
    (b'{"state": "online", "models": {"m": 1}}', "'models': expected an object of objects"),
    (b'{"state": "online", "time": true}', "'time': expected a number, got true"),
])
def test_a_malformed_state_is_named(payload, why):
    with pytest.raises(ValueError) as err:
        parse_state(payload)
    assert why in str(err.value)


def test_the_view_applies_the_session_rule_and_forgets_a_cleared_state():
    view = FleetView()
    topic = "fieldnode/v1/dev-a/state"
    online = json.dumps(presence.online("dev-a", 5, 100.0, {"groups": ["g"]})).encode()
    assert view.apply(topic, online).after == "online"
    stale = view.apply(topic, json.dumps(presence.will("dev-a", 4)).encode())
    assert stale.ignored and view.boards["dev-a"].state == "online"
    assert not view.apply(topic, json.dumps(presence.will("dev-a", 5)).encode()).ignored
    board = view.boards["dev-a"]
    assert board.state == "lost" and board.groups == ["g"] and board.last_seen == 100.0
    assert view.apply(topic, b"").after == "gone" and view.boards == {}
    assert view.apply("fieldnode/v1/dev-a/events", b"{}") is None


# -------------------------------------------------------------------------------------- alone and watching


def test_an_empty_broker_is_zero_boards(broker, capsys):
    assert cli.main(["fleet", "status", "--broker", broker.url]) == 0
    assert capsys.readouterr().out.splitlines() == ["0 boards"]
    assert cli.main(["fleet", "status", "--broker", broker.url, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["selected"] == 0 and doc["boards"] == [] and doc["unreadable"] == {} and doc["complete"]


def test_an_unreachable_broker_exits_4(capsys):
    from tests.link.broker import free_port

    assert cli.main(["fleet", "status", "--broker", f"mqtt://127.0.0.1:{free_port()}"]) == 4
    assert "could not connect" in capsys.readouterr().err


@contextlib.contextmanager
def watching(broker, tmp_path):
    """A board ``dev-a`` in ``site-a`` and ``fleet status --watch`` on a thread, after its first view: yields
    ``(board, out)``; on the way out the watch is stopped, must have exited 0, and the board is stopped."""
    board = Board(broker.url, tmp_path, "dev-a", ["site-a"], tmp_path / "trust")
    parser = argparse.ArgumentParser()
    status.add_arguments(parser)
    args = parser.parse_args(["--broker", broker.url, "--watch", "--timeout", "20"])
    out, stop = io.StringIO(), threading.Event()
    codes: list[int] = []
    t = threading.Thread(target=lambda: codes.append(status.run(args, out=out, stop=stop)), daemon=True)
    t.start()
    try:
        eventually(lambda: out.getvalue().startswith("1 board\n"), what="the first view")
        yield board, out
    finally:
        stop.set()
        t.join(10)
        board.link.stop()
    assert codes == [0]


def test_watch_prints_changes_and_ignores_a_stale_lost(broker, tmp_path, mqtt_client):
    with watching(broker, tmp_path) as (board, out):
        session = board.link.session
        # A stale will of an older session, as the broker may publish it late: ignored by the rule. (The board heals
        # its retained state too, which the watcher sees as a new online.)
        mqtt_client(broker).publish("fieldnode/v1/dev-a/state", json.dumps(presence.will("dev-a", session - 1)),
                                    retain=True)
        eventually(lambda: "dev-a: online -> lost (session" in out.getvalue(), what="the stale lost")
        assert f"ignored: session {session - 1} is older than the online of session {session}" in out.getvalue()
        board.groups.set(["site-b"])  # a new birth: the change is said, field by field
        eventually(lambda: 'dev-a: online, groups: ["site-a"] -> ["site-b"]' in out.getvalue(), what="new groups")
        board.close()
        eventually(lambda: f"dev-a: online -> offline (session {session})" in out.getvalue(), what="offline")
        assert "online -> online" not in out.getvalue()  # the healed state (the same online again) is no news


def test_watch_connects_again_after_a_broker_restart(broker, tmp_path, capsys):
    with watching(broker, tmp_path) as (board, out):
        session = board.link.session
        broker.restart()  # no persistence: the retained states are gone until the boards say them again

        # Each attempt to connect takes a session number, so the new one is higher, not necessarily the next. The
        # old broker may publish the board's will as it shuts down: the watcher then saw lost before the new online.
        def back() -> bool:
            n = board.link.session
            return n > session and (f"dev-a: online again (session {n})" in out.getvalue()
                                    or f"dev-a: lost -> online (session {n})" in out.getvalue())

        eventually(back, timeout=60.0, what="the board's new session, seen after the watcher connected again",
                   detail=out.getvalue)
    err = capsys.readouterr().err
    assert "connecting again" in err and "connected again" in err


@pytest.mark.parametrize("content, why", [
    ("{", "not JSON"),
    ('{"format": 2, "boards": {}}', 'expected {"format": 1, "boards": {id: state}}'),
    ('{"format": 1, "boards": {"dev-a": 7}}', 'expected {"format": 1'),
])
def test_a_bad_known_file_is_refused_naming_it(tmp_path, capsys, content, why):
    path = tmp_path / "known.json"
    path.write_text(content)
    assert cli.main(["fleet", "status", "--broker", "mqtt://127.0.0.1:9", "--known", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"--known {path}: " in err and why in err and "remove it to start afresh" in err
