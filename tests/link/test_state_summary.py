"""The retained state as a fleet summary: the session counter (persisted, one higher at each connect, carried by
``online``, ``offline`` and the will ``lost``), a board that heals its own retained state over a stale ``lost``
against a real mosquitto, the consumers' session rule, and the summary's fields in an agent's state."""

from __future__ import annotations

import json
import os
import stat

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from device import config
from device.agent.summary import UPDATE_STATES, UpdateState
from device.link import presence, wire
from device.link.client import Link
from device.link.spool.spool import Spool
from tests.link.test_agent import DEV, PREFIX, running_agent, write_config
from tests.waiting import eventually

STATE = "fieldnode/v1/dev-a/state"


# ------------------------------------------------------------------------------------------ the counter


def test_the_session_counter_counts_up_and_persists(tmp_path):
    path = str(tmp_path / "link-session.json")
    c = presence.SessionCounter(path)
    assert c.value == 0 and [c.next(), c.next()] == [1, 2]
    assert json.loads((tmp_path / "link-session.json").read_bytes()) == {"format": 1, "session": 2}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = presence.SessionCounter(path)  # a restart
    assert again.next() == 3 and again.problem is None


@pytest.mark.parametrize("raw, why", [
    (b"{not json", "not JSON"),
    (b"[1]", "format 1"),
    (b'{"format": 2, "session": 1}', "format 1"),
    (b'{"format": 1, "session": -1}', "'session': expected an integer >= 0, got -1"),
    (b'{"format": 1, "session": true}', "'session': expected an integer >= 0, got True"),
    (b'{"format": 1}', "'session': expected an integer >= 0, got None"),
])
def test_a_corrupt_counter_file_is_set_aside_naming_what_is_wrong(tmp_path, raw, why):
    with pytest.raises(ValueError) as err:
        presence.parse_counter(raw)
    assert why in str(err.value)
    path = tmp_path / "link-session.json"
    path.write_bytes(raw)
    c = presence.SessionCounter(str(path))
    assert c.value == 0 and "corrupt" in c.problem and why in c.problem
    assert not path.exists() and any(p.name.startswith("link-session.json.corrupt-") for p in tmp_path.iterdir())
    assert c.next() == 1 and c.problem is None  # written again


def test_a_counter_that_cannot_be_written_counts_on_in_memory(tmp_path):
    (tmp_path / "a-file").write_text("")  # its "directory" is a file: no write can succeed (even as root)
    c = presence.SessionCounter(str(tmp_path / "a-file" / "link-session.json"))
    assert [c.next(), c.next()] == [1, 2]
    assert "cannot write it" in c.problem


# ------------------------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("new, old, replaces", [
    ({"state": "lost", "session": 4}, {"state": "online", "session": 5}, False),  # a late will
    ({"state": "offline", "session": 4}, {"state": "online", "session": 5}, False),
    ({"state": "lost"}, {"state": "online", "session": 5}, False),  # an older agent's will: session 0
    ({"state": "lost", "session": 5}, {"state": "online", "session": 5}, True),  # this connection's own will
    ({"state": "lost", "session": 6}, {"state": "online", "session": 5}, True),
    ({"state": "online", "session": 1}, {"state": "online", "session": 9}, True),  # a wiped state dir: 1 again
    ({"state": "online", "session": 6}, {"state": "lost", "session": 5}, True),
    ({"state": "lost", "session": 1}, {"state": "offline", "session": 3}, True),  # no online to protect
])
def test_the_consumers_session_rule(new, old, replaces):
    assert wire.state_supersedes(new, old) is replaces


@pytest.mark.parametrize("payload, heal", [
    (b'{"state": "lost", "device": "dev-a", "session": 4}', True),
    (b'{"state": "offline", "device": "dev-a", "session": 4, "time": 1}', True),
    (b'{"state": "lost", "device": "dev-a"}', True),  # an older agent's will
    (b'{"state": "online", "device": "dev-a", "session": 5}', False),  # our own
    (b'{"state": "lost", "device": "dev-a", "session": 6}', False),  # a newer session: another instance's
    (b'{"state": "online", "device": "dev-a", "session": 6}', False),
    (b'not json', True),
    (b'', True),  # the retained state cleared
    (b'{"state": "weird", "session": 9}', True),
])
def test_what_the_board_heals(payload, heal):
    assert presence.needs_heal(payload, 5) is heal


# ------------------------------------------------------------------------------------ against mosquitto


def make_link(broker, tmp_path, **kw):
    spool = Spool(str(tmp_path / "spool.db"), commit_interval_s=0.02)
    spool.start()
    link = Link(broker.url, "dev-a", spool, backoff=(0.05, 0.2), birth=lambda: {"version": "test"},
                session_path=str(tmp_path / "link-session.json"), **kw)
    return link, spool


def states(watcher):
    return [json.loads(m.payload) for m in watcher.messages(STATE) if m.payload]


def retained_state(broker, mqtt_client):
    """What a consumer that subscribes now gets: the broker's retained state of dev-a."""
    late = mqtt_client(broker)
    late.subscribe(STATE)
    got = late.wait_for_messages(1, topic=STATE)[0]
    late.close()
    assert got.retain
    return json.loads(got.payload)


def test_online_offline_and_the_will_carry_the_connections_session(broker, tmp_path, mqtt_client):
    watcher = mqtt_client(broker)
    watcher.subscribe(STATE)
    link, spool = make_link(broker, tmp_path)
    link.start()
    try:
        first = eventually(lambda: [s for s in states(watcher) if s["state"] == "online"], what="online")[0]
        assert first["session"] == link.session == 1 and first["version"] == "test"
        # Another client takes the client id over: the broker publishes the board's will, then the link
        # reconnects (taking it back) with a new session.
        thief = mqtt_client(broker, client_id="dev-a")
        lost = eventually(lambda: [s for s in states(watcher) if s["state"] == "lost"], what="the will")[0]
        assert lost == {"state": "lost", "device": "dev-a", "session": 1}
        thief.close()
        again = eventually(lambda: [s for s in states(watcher) if s["state"] == "online" and s["session"] > 1],
                           what="online in a new session")[0]
        assert retained_state(broker, mqtt_client)["state"] == "online"
    finally:
        link.stop()
        spool.close()
    last = eventually(lambda: [s for s in states(watcher) if s["state"] == "offline"], what="offline")[0]
    assert last["session"] == link.session >= again["session"]
    assert presence.SessionCounter(str(tmp_path / "link-session.json")).value == link.session


def test_a_stale_lost_never_ends_as_the_retained_state_of_a_connected_board(broker, tmp_path, mqtt_client):
    (tmp_path / "link-session.json").write_text('{"format": 1, "session": 41}')
    watcher = mqtt_client(broker)
    watcher.subscribe(STATE)
    link, spool = make_link(broker, tmp_path)
    link.start()
    try:
        assert link.wait_connected(10) and link.session == 42
        eventually(lambda: any(s.get("session") == 42 for s in states(watcher)), what="online of session 42")
        # The old connection's will, published by the broker itself after the new online: a client that
        # carries it as its own will and goes with "Disconnect with Will Message".
        ghost = mqtt_client(broker, connect=False, client_id="dev-a-old-connection")
        ghost.client.will_set(STATE, json.dumps(presence.will("dev-a", 41)), qos=1, retain=True)
        ghost.connect()
        ghost.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message"))
        ghost.client.loop_stop()
        eventually(lambda: any(s["state"] == "lost" and s["session"] == 41 for s in states(watcher)),
                   what="the stale lost")
        # The board saw it on its own state topic and said online again, after it.
        def healed():
            seen = states(watcher)
            stale = max(i for i, s in enumerate(seen) if s["state"] == "lost")
            return any(s["state"] == "online" and s["session"] == 42 for s in seen[stale + 1:])
        eventually(healed, what="online again after the stale lost")
        assert retained_state(broker, mqtt_client) == {**states(watcher)[-1]}
        assert retained_state(broker, mqtt_client)["state"] == "online"
        # An old offline, and an older agent's will without a session, are healed too.
        for stale in ({"state": "offline", "device": "dev-a", "session": 40, "time": 1.0},
                      {"state": "lost", "device": "dev-a"}):
            healed_before = link.counters["state_healed"]
            watcher.publish(STATE, json.dumps(stale), retain=True)
            eventually(lambda: link.counters["state_healed"] > healed_before, what="the board to notice")
            eventually(lambda: states(watcher)[-1]["state"] == "online", what="online again")
            assert retained_state(broker, mqtt_client)["session"] == 42
        assert link.status()["session"] == 42 and link.counters["state_healed"] >= 3
    finally:
        link.stop()
        spool.close()


# --------------------------------------------------------------------------------------- the summary


def test_the_update_state_follows_the_update_events():
    u = UpdateState(None)
    assert u.summary() == {"state": "idle"}
    steps = [
        ("update_install", {"state": "started", "version": 3}, {"state": "downloading", "version": 3}),
        ("update_install", {"state": "progress", "step": "download"}, {"state": "downloading", "version": 3}),
        ("update_install", {"state": "deferred", "version": 3, "code": "update_deferred"},
         {"state": "deferred", "version": 3, "code": "update_deferred"}),
        ("update_install", {"state": "failed", "version": 3, "code": "hash_mismatch"},
         {"state": "failed", "version": 3, "code": "hash_mismatch"}),
        ("update_install", {"state": "installed", "version": 4, "name": "vibration"}, {"state": "trial", "version": 4}),
        ("update_trial", {"version": 4, "verdict": None, "windows": 0}, {"state": "trial", "version": 4}),
        ("update_trial", {"version": 4, "verdict": "fail"}, {"state": "trial", "version": 4}),
        ("update_rolled_back", {"version": 4, "code": "trial_failed"},
         {"state": "rolled_back", "version": 4, "code": "trial_failed"}),
        ("update_install", {"state": "up_to_date"}, {"state": "idle"}),
        ("update_committed", {"version": 5, "slot": "b"}, {"state": "committed", "version": 5}),
        ("governor_level", {"to": "saver"}, {"state": "committed", "version": 5}),
    ]
    for kind, data, want in steps:
        u.on_event(kind, data)
        assert u.summary() == want, (kind, data)
        assert u.summary()["state"] in UPDATE_STATES
    assert u.on_event("update_committed", {"version": 5}) is False  # no change: no republish


def test_the_update_state_at_start_comes_from_the_store():
    assert UpdateState({"active": {"version": 2, "state": "trial"}}).summary() == {"state": "trial", "version": 2}
    assert UpdateState({"active": {"version": 2, "state": "committed"}}).summary() == {"state": "committed",
                                                                                        "version": 2}
    assert UpdateState({"active": None}).summary() == {"state": "idle"}


def test_a_failure_the_store_does_not_keep_is_said_again_after_a_restart(tmp_path):
    path = str(tmp_path / "update-summary.json")
    committed = {"active": {"version": 2, "state": "committed"}}
    u = UpdateState(committed, path)
    assert u.on_event("update_install", {"state": "failed", "version": 3, "code": "hash_mismatch"})
    again = UpdateState(committed, path)  # the store still serves version 2; the failed install of 3 is kept
    assert again.summary() == {"state": "failed", "version": 3, "code": "hash_mismatch"} and again.problem is None
    again.on_event("update_committed", {"version": 3})
    assert UpdateState(committed, path).summary() == {"state": "committed", "version": 2}  # the store's again


@pytest.mark.parametrize("raw, why", [
    (b"{", "not JSON"),
    (b'{"format": 1, "state": "melted"}', "'state': expected one of idle, downloading"),
    (b'{"format": 1, "state": "failed", "code": 7}', "'code': expected a string, got 7"),
    (b'{"format": 1, "state": "failed", "version": true}', "'version': expected a number or a string"),
    (b'{"state": "failed"}', "format 1"),
])
def test_a_corrupt_update_summary_is_set_aside_and_the_store_says_the_state(tmp_path, raw, why):
    path = tmp_path / "update-summary.json"
    path.write_bytes(raw)
    u = UpdateState({"active": {"version": 2, "state": "committed"}}, str(path))
    assert u.summary() == {"state": "committed", "version": 2}
    assert why in u.problem and not path.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("update-summary.json.corrupt-")]


@pytest.fixture
def agent(tmp_path, broker):
    cfg = config.load(write_config(tmp_path, broker)).with_overrides({"device.groups": ["site-a", "ring-canary"]})
    yield from running_agent(cfg, control=False)


def test_the_agents_retained_state_is_a_small_fleet_summary(agent, broker, mqtt_client):
    watcher = mqtt_client(broker)
    watcher.subscribe(f"{PREFIX}/state")

    def serving_state():
        got = [json.loads(m.payload) for m in watcher.messages() if m.payload]
        return got and got[-1].get("serving") and got[-1]

    s = eventually(serving_state, timeout=60, what="the state of a serving board")
    assert s["state"] == "online" and s["device"] == DEV and s["session"] == agent.link.session >= 1
    assert isinstance(s["time"], float) and s["version"] and s["level"] in ("performance", "balanced", "saver",
                                                                             "critical")
    assert s["models"] == {"vibration": {"version": "1.0.0", "variants": ["full", "lite"]}}
    assert s["variant"] in ("full", "lite") and s["faults"] == [] and s["groups"] == ["site-a", "ring-canary"]
    assert s["update"]["state"] == "idle" and s["update"]["active"] is None
    size = len(wire.encode(s, default=str))
    print(json.dumps({"state_payload_bytes": size}))
    assert size < 1024  # the broker holds one per board: at 100,000 boards that is under 100 MB
    # A fault comes and goes: the retained state says so each time.
    agent.event("sensor_fault", {"problem": "test"})
    before = len(watcher.messages())
    eventually(lambda: len(watcher.messages()) > before, what="a new state after the fault event")
    assert agent.status()["groups"]["groups"] == ["site-a", "ring-canary"]
    assert agent.status()["update"]["summary"] == {"state": "idle"}
    # An update step (here: an install deferred for power) is in the retained state at once.
    agent.event("update_install", {"state": "deferred", "version": 3, "code": "update_deferred", "message": "test"})
    eventually(lambda: serving_state() and serving_state()["update"]["state"] == "deferred", what="deferred")
    assert serving_state()["update"]["version"] == 3 and serving_state()["update"]["code"] == "update_deferred"
