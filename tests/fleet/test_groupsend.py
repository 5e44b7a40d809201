"""``fieldnode send --group`` against a real mosquitto and real boards: it reaches members only, the expected boards
come from the retained states (and ``--known``), the missing list is exact (members that are offline or lost),
errors are grouped by code, replies from boards not expected are listed, and the exit codes."""

from __future__ import annotations

import json

import pytest

from tools import cli
from tests.fleet.boards import Board, key_pair


def send_json(capsys, fleet, *words: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = cli.main(fleet.cli("send", "--sign", str(fleet.key), "--json", *words))
    return code, json.loads(capsys.readouterr().out)


def test_a_group_command_reaches_members_only_and_the_missing_list_is_exact(fleet, capsys):
    code, doc = send_json(capsys, fleet, "--group", "site-a", "--known", str(fleet.known), "ping")
    assert doc["expected"] == ["dev-a", "dev-b", "dev-d", "dev-e", "dev-f"]
    assert doc["answered"] == ["dev-a", "dev-b", "dev-f"]
    assert doc["missing"] == ["dev-d", "dev-e"]  # stopped cleanly (offline) and killed (lost)
    assert doc["errors"] == {"unknown_key": ["dev-f"]}  # its trust directory lacks the operator's key
    assert doc["unexpected"] == [] and doc["replies"]["dev-a"]["ok"] and doc["replies"]["dev-b"]["cmd"] == "ping"
    assert code == 3  # missing wins over failed
    # dev-c (site-b) never saw it: after its reply to a command on its own topic, still no group command counted.
    capsys.readouterr()
    assert cli.main(fleet.cli("send", "--device", "dev-c", "ping")) == 0
    assert fleet.boards["dev-c"].link.channel.counters["group_commands"] == 0
    assert fleet.boards["dev-a"].link.channel.counters["group_commands"] >= 1


def test_without_the_known_file_members_away_are_expected_from_their_own_offline_and_lost_states(fleet, capsys):
    code, doc = send_json(capsys, fleet, "--group", "site-a", "ping")  # offline and lost list their groups too
    assert doc["expected"] == ["dev-a", "dev-b", "dev-d", "dev-e", "dev-f"] and doc["missing"] == ["dev-d", "dev-e"]
    assert doc["errors"] == {"unknown_key": ["dev-f"]} and code == 3


def test_a_failure_with_nobody_missing_exits_1(fleet, capsys):
    code, doc = send_json(capsys, fleet, "--group", "ring-1", "--args", '{"bogus": 1}', "ping")
    assert doc["expected"] == ["dev-b"] and doc["missing"] == [] and list(doc["errors"]) == ["bad_args"]
    assert code == 1


def test_all_answered_ok_exits_0_with_a_table_and_the_publish_carries_the_request_properties(fleet, capsys,
                                                                                              mqtt_client):
    spy = mqtt_client(fleet.broker)
    spy.subscribe("fieldnode/v1/group/ring-1/cmd/+")
    capsys.readouterr()
    assert cli.main(fleet.cli("send", "--group", "ring-1", "--sign", str(fleet.key), "--ttl", "30", "ping")) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "group ring-1, ping: 1 of 1 expected answered (1 ok, 0 error), 0 missing"
    assert out[1].split()[:2] == ["dev-b", "ok"] and len(out) == 2
    msg = spy.wait_for_messages(1)[0]
    env = json.loads(msg.payload)
    assert env["device"] == "group:ring-1" and env["cmd"] == "ping" and "sig" in env
    assert msg.properties.MessageExpiryInterval == 30
    assert msg.properties.CorrelationData.decode() == env["request_id"]
    assert msg.properties.ResponseTopic.startswith("fieldnode/v1/_fleet/reply/")


def test_the_missing_and_errors_table(fleet, capsys):
    capsys.readouterr()
    code = cli.main(fleet.cli("send", "--group", "site-a", "--sign", str(fleet.key), "--known", str(fleet.known),
                              "ping"))
    out = capsys.readouterr().out.splitlines()
    assert code == 3
    assert out[0] == "group site-a, ping: 3 of 5 expected answered (2 ok, 1 error), 2 missing"
    rows = {line.split()[0]: line for line in out[1:]}
    assert rows["dev-f"].split()[1] == "unknown_key"
    assert "missing        (offline, last seen 20" in rows["dev-d"]
    assert "missing        (lost, last seen 20" in rows["dev-e"]  # its last online's time (--known)


@pytest.mark.parametrize("words, why", [
    (["--group", "site-a", "ping"], "--group needs --sign KEY"),
    (["--group", "a b", "--sign", "K", "ping"], "--group 'a b': expected 1-64 characters"),
    (["--group", "site-a", "--device", "dev-a", "--sign", "K", "ping"], "leave out --device and --prefix"),
    (["--group", "site-a", "--sign", "K", "--mqtt", "3.1.1", "ping"], "--group needs MQTT 5"),
    (["--group", "site-a", "--sign", "K", "--args", "[1]", "ping"], "--args: expected a JSON object"),
])
def test_bad_input_exits_2(capsys, tmp_path, words, why):
    key = key_pair(tmp_path, "ops")
    words = [str(key) if w == "K" else w for w in words]
    assert cli.main(["send", "--broker", "mqtt://127.0.0.1:9", *words]) == 2
    assert why in capsys.readouterr().err


def test_a_group_no_board_lists_exits_2(fleet, capsys):
    code = cli.main(fleet.cli("send", "--group", "nobody", "--sign", str(fleet.key), "ping"))
    assert code == 2 and "no board's retained state lists group 'nobody'" in capsys.readouterr().err


def test_a_reply_from_a_board_not_expected_is_listed_and_a_silent_member_is_missing(broker, tmp_path, capsys,
                                                                                      mqtt_client):
    key = key_pair(tmp_path, "ops")
    boards = [Board(broker.url, tmp_path, "dev-a", ["site-a"], tmp_path / "trust"),
              Board(broker.url, tmp_path, "dev-old", ["site-a"], tmp_path / "trust", lists_groups=False)]
    # A retained online that no board stands behind (its board died and the broker lost its will): expected, silent.
    ghost = {"state": "online", "device": "dev-ghost", "session": 3, "time": 1.0, "groups": ["site-a"]}
    mqtt_client(broker).publish("fieldnode/v1/dev-ghost/state", json.dumps(ghost), retain=True)
    try:
        capsys.readouterr()
        code = cli.main(["send", "--broker", broker.url, "--group", "site-a", "--sign", str(key), "--json",
                         "--timeout", "4", "ping"])
        doc = json.loads(capsys.readouterr().out)
    finally:
        for b in boards:
            b.close()
    assert doc["expected"] == ["dev-a", "dev-ghost"] and doc["answered"] == ["dev-a"]
    assert doc["missing"] == ["dev-ghost"] and code == 3
    # dev-old's state lists no groups (an agent from before groups), but it is a member and answered: listed.
    assert doc["unexpected"] == ["dev-old"] and doc["replies"]["dev-old"]["ok"]
