"""Groups on the board: the group rule and topics of the wire contract, the persisted group set, group envelopes in
the verifier, and group commands against a real mosquitto: members only, signed only, bound to their group,
unexpired, replies that name their board, and boards that join a group by command."""

from __future__ import annotations

import json
import threading
import uuid

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device.link import wire
from device.link.client import Link
from device.link.commands import Dispatcher, Registry, register_builtin
from device.link.envelope import TrustStore, Verifier, sign_envelope
from device.link.errors import EnvelopeExpired, Unauthorized, WrongTarget
from device.link.groups import Groups, groups_problem, parse_groups_file
from device.link.spool.spool import Spool
from tests.waiting import eventually

# ------------------------------------------------------------------------------------ the wire contract


def test_group_topics_and_targets():
    assert wire.GroupTopics.cmd_filter("site-a") == "fieldnode/v1/group/site-a/cmd/+"
    assert wire.GroupTopics.command("site-a", "ping") == "fieldnode/v1/group/site-a/cmd/ping"
    assert wire.GroupTopics.parse("fieldnode/v1/group/site-a/cmd/ping") == ("site-a", "ping")
    for topic in ("fieldnode/v1/group/site-a/cmd", "fieldnode/v1/group/site-a/cmd/", "fieldnode/v1/group/a b/cmd/x",
                  "fieldnode/v1/group/site-a/cmd/x/y", "fieldnode/v1/site-a/cmd/ping", "fieldnode/v1/group/s/reply/x"):
        assert wire.GroupTopics.parse(topic) is None, topic
    with pytest.raises(ValueError, match="expected 1-64 characters"):
        wire.GroupTopics.cmd_filter("a/b")
    assert wire.group_target("site-a") == "group:site-a"
    # A reply is never published where members would take it as a command.
    topics = wire.Topics("fieldnode/v1/dev-a")
    assert topics.reply_topic_problem("fieldnode/v1/group/site-a/cmd/ping") == "a group's command topic"
    assert topics.reply_topic_problem("fieldnode/v1/group/site-a/replies/op-1") is None


@pytest.mark.parametrize("value, why", [
    ("site-a", "expected a list of group names, got 'site-a'"),
    (["site-a", "site-a"], "group 'site-a' is listed twice"),
    (["ok", "a b"], "group 2 ('a b'): expected 1-64 characters from A-Z, a-z, 0-9, '_' and '-'"),
    (["a/b"], "group 1 ('a/b'): expected"),
    (["+"], "group 1 ('+'): expected"),
    ([""], "group 1 (''): expected"),
    (["x" * 65], "group 1 ('xxxx"),
    ([7], "group 1 (7): expected"),
    ([f"g{i}" for i in range(33)], "at most 32 groups, got 33"),
])
def test_bad_group_lists_are_refused_naming_what_is_wrong(value, why):
    assert why in groups_problem(value)


def test_good_group_lists():
    assert groups_problem([]) is None and groups_problem(["site-a", "ring_1", "A" * 64]) is None
    assert groups_problem([f"g{i}" for i in range(32)]) is None


# ------------------------------------------------------------------------------------ the persisted set


def test_groups_set_persists_and_wins_over_the_config_until_a_reset(tmp_path):
    path = str(tmp_path / "groups.json")
    seen = []
    g = Groups(["site-a"], path)
    g.on_change(seen.append)
    assert g.current == ("site-a",) and g.source == "config" and "site-a" in g
    out = g.set(["site-b", "ring-canary"], by="ops")
    assert out["groups"] == ["site-b", "ring-canary"] and out["source"] == "command" and out["config"] == ["site-a"]
    assert seen == [("site-b", "ring-canary")]
    assert json.loads(open(path).read())["groups"] == ["site-b", "ring-canary"]
    g.use_config(["site-c"])  # a reload: the persisted set still wins
    assert g.current == ("site-b", "ring-canary") and len(seen) == 1
    again = Groups(["site-c"], path)  # a restart
    assert again.current == ("site-b", "ring-canary") and again.status()["set_by"]["by"] == "ops"
    assert again.reset(by="ops")["groups"] == ["site-c"] and again.source == "config"
    assert Groups(["site-c"], path).current == ("site-c",)


def test_a_reloaded_config_list_is_in_force_at_once_without_a_persisted_set(tmp_path):
    seen = []
    g = Groups(["site-a"], str(tmp_path / "groups.json"))
    g.on_change(seen.append)
    g.use_config(["site-a"])
    assert seen == []  # no change, no call
    g.use_config(["site-b"])
    assert g.current == ("site-b",) and seen == [("site-b",)] and g.source == "config"


def test_a_bad_set_changes_nothing(tmp_path):
    path = tmp_path / "groups.json"
    g = Groups(["site-a"], str(path))
    with pytest.raises(ValueError, match="listed twice"):
        g.set(["x", "x"])
    assert g.current == ("site-a",) and not path.exists()
    (tmp_path / "blocker").write_text("")
    stuck = Groups(["site-a"], str(tmp_path / "blocker" / "groups.json"))
    with pytest.raises(OSError):
        stuck.set(["site-b"])
    assert stuck.current == ("site-a",)


@pytest.mark.parametrize("raw, why", [
    (b"{", "not JSON"),
    (b'{"format": 1, "groups": ["a", "a"]}', "'groups': group 'a' is listed twice"),
    (b'{"format": 1}', "'groups': expected a list of group names, got None"),
    (b'{"groups": ["a"]}', "format 1"),
])
def test_a_corrupt_groups_file_is_set_aside_and_the_config_is_in_force(tmp_path, raw, why):
    with pytest.raises(ValueError) as err:
        parse_groups_file(raw)
    assert why in str(err.value)
    path = tmp_path / "groups.json"
    path.write_bytes(raw)
    g = Groups(["site-a"], str(path))
    assert g.current == ("site-a",) and why in g.problem and "device.groups is in force" in g.problem
    assert not path.exists()


# ------------------------------------------------------------------------------------------ the verifier


@pytest.fixture
def key(tmp_path):
    k = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "trust").mkdir(exist_ok=True)
    (tmp_path / "trust" / "ops.pub").write_bytes(k.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return k


def test_the_verifier_binds_a_group_envelope_to_its_group_and_its_members(tmp_path, key):
    groups = Groups(["site-a"])
    v = Verifier(TrustStore(str(tmp_path / "trust")), device_id="dev-a", groups=groups)
    env = sign_envelope(key, device="group:site-a", cmd="ping", args={})
    with pytest.raises(WrongTarget, match="only on that group's topic"):
        v.verify(env, "ping")  # on the board's own topic
    with pytest.raises(WrongTarget, match="arrived on the topic of group 'site-b'"):
        v.verify(env, "ping", group="site-b")
    own = sign_envelope(key, device="dev-a", cmd="ping", args={})
    with pytest.raises(WrongTarget, match="arrived on the topic of group 'site-a'"):
        v.verify(own, "ping", group="site-a")  # a board's envelope is not a group's
    assert not v.claim(env, "ping") and not v.claim(env, "ping", group="site-b")
    assert v.claim(env, "ping", group="site-a")
    assert v.verify(env, "ping", group="site-a").args == {}
    groups.set([])  # left the group
    with pytest.raises(WrongTarget, match="not a member of group 'site-a'"):
        v.verify(sign_envelope(key, device="group:site-a", cmd="ping", args={}), "ping", group="site-a")
    groups.set(["site-a"])
    old = sign_envelope(key, device="group:site-a", cmd="ping", args={}, ttl_s=1)
    v2 = Verifier(TrustStore(str(tmp_path / "trust")), device_id="dev-a", groups=groups,
                  clock=_Later(3600))
    with pytest.raises(EnvelopeExpired):
        v2.verify(old, "ping", group="site-a")
    assert v.counters["refused_wrong_target"] == 4


class _Later:
    def __init__(self, s):
        import time
        self.t = time.time() + s

    def time(self):
        return self.t


def test_the_dispatcher_wants_an_envelope_on_a_group_topic(tmp_path, key):
    reg = Registry()
    register_builtin(reg, version="test")
    d = Dispatcher(reg, verifier=Verifier(TrustStore(str(tmp_path / "trust")), device_id="dev-a",
                                          groups=Groups(["site-a"])), device="dev-a")
    r = d.handle("ping", b'{"request_id": "r1"}', "site-a")
    body = json.loads(r.body)
    assert body["error"]["code"] == Unauthorized.code and "signed envelope bound to 'group:site-a'" in \
        body["error"]["message"] and body["device"] == "dev-a" and r.refused
    ok = json.loads(d.handle("ping", b'{"request_id": "r1"}').body)  # on its own topic: not the same request
    assert ok["ok"] and ok["device"] == "dev-a"
    env = {**sign_envelope(key, device="group:site-a", cmd="ping", args={}), "request_id": "r2"}
    assert json.loads(d.handle("ping", json.dumps(env).encode(), "site-a").body)["ok"]


# ------------------------------------------------------------------------------------ against mosquitto


class Board:
    """One board's real protocol code (link, channel, dispatcher, verifier, groups), without runtime or sensor."""

    def __init__(self, broker, tmp_path, device_id: str, groups: list[str]):
        d = tmp_path / device_id
        d.mkdir()
        self.id = device_id
        self.groups = Groups(groups, str(d / "groups.json"))
        reg = Registry()
        register_builtin(reg, version="test")
        self.verifier = Verifier(TrustStore(str(tmp_path / "trust")), device_id=device_id, groups=self.groups,
                                 nonce_path=str(d / "nonces.json"))
        self.dispatcher = Dispatcher(reg, verifier=self.verifier, device=device_id)
        self.spool = Spool(str(d / "spool.db"), commit_interval_s=0.02)
        self.spool.start()
        self.link = Link(broker.url, device_id, self.spool, backoff=(0.05, 0.2), dispatcher=self.dispatcher,
                         session_path=str(d / "session.json"), groups=self.groups)
        self.link.start()
        assert self.link.wait_connected(10)
        eventually(lambda: self.link.status()["groups"] == sorted(groups), what=f"{device_id} subscribed")

    def close(self):
        self.link.stop()
        self.spool.close()


class Fleet:
    """An operator's MQTT 5 client: group and board commands, every reply collected by its request id."""

    def __init__(self, broker, key):
        self.key = key
        self.reply_topic = f"fieldnode/v1/ops/reply/{uuid.uuid4().hex[:8]}"
        self.replies: dict[str, list[dict]] = {}
        self.cond = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"ops-{uuid.uuid4().hex[:6]}",
                             protocol=mqtt.MQTTv5)
        self.c.on_message = self._msg
        subscribed = threading.Event()
        self.c.on_subscribe = lambda *a: subscribed.set()
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        self.c.subscribe(self.reply_topic, qos=1)
        assert subscribed.wait(10)

    def _msg(self, c, u, m):
        rid = m.properties.CorrelationData.decode()
        with self.cond:
            self.replies.setdefault(rid, []).append(json.loads(m.payload))
            self.cond.notify_all()

    def publish(self, topic: str, payload: dict, *, expiry_s: int = 60) -> str:
        rid = uuid.uuid4().hex[:12]
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = rid.encode()
        props.MessageExpiryInterval = expiry_s  # the envelope's TTL: a broker does not keep it for longer
        self.c.publish(topic, json.dumps({**payload, "request_id": rid}), qos=1, properties=props).wait_for_publish(10)
        return rid

    def group(self, group: str, cmd: str, args: dict | None = None, *, target: str | None = None, ttl: float = 60,
              signed: bool = True, clock=None) -> str:
        if not signed:
            return self.publish(wire.GroupTopics.command(group, cmd), {"args": args or {}})
        kw = {"clock": clock} if clock is not None else {}
        env = sign_envelope(self.key, device=target or wire.group_target(group), cmd=cmd, args=args or {},
                            ttl_s=ttl, **kw)
        return self.publish(wire.GroupTopics.command(group, cmd), env, expiry_s=int(ttl))

    def board(self, device: str, cmd: str, args: dict | None = None, *, signed: bool = False) -> str:
        if signed:
            return self.publish(f"fieldnode/v1/{device}/cmd/{cmd}",
                                sign_envelope(self.key, device=device, cmd=cmd, args=args or {}))
        return self.publish(f"fieldnode/v1/{device}/cmd/{cmd}", {"args": args or {}})

    def wait(self, rid: str, count: int, timeout: float = 20.0) -> list[dict]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.replies.get(rid, [])) >= count, timeout), \
                f"{len(self.replies.get(rid, []))} of {count} replies to {rid}"
            return list(self.replies[rid])

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def fleet(broker, tmp_path, key):
    boards = {name: Board(broker, tmp_path, name, groups) for name, groups in
              (("dev-a", ["site-a"]), ("dev-b", ["site-a", "ring-1"]), ("dev-c", ["site-b"]))}
    ops = Fleet(broker, key)
    yield ops, boards
    ops.close()
    for b in boards.values():
        b.close()


def by_device(replies: list[dict]) -> dict[str, dict]:
    return {r["device"]: r for r in replies}


def test_a_group_command_reaches_its_members_only_and_each_reply_names_its_board(fleet):
    ops, boards = fleet
    rid = ops.group("site-a", "ping")
    # After the group command, a command on dev-c's own topic from the same client: when its reply is here,
    # dev-c has had every chance to see the group command.
    own = ops.board("dev-c", "ping")
    replies = by_device(ops.wait(rid, 2))
    assert sorted(replies) == ["dev-a", "dev-b"] and all(r["ok"] and r["cmd"] == "ping" for r in replies.values())
    assert ops.wait(own, 1)[0]["device"] == "dev-c"
    assert len(ops.replies[rid]) == 2  # the non-member never answered
    c = boards["dev-c"]
    assert c.link.channel.counters["group_commands"] == 0 and c.dispatcher.counters["requests"] == 1  # its own ping
    assert boards["dev-b"].link.channel.counters["group_commands"] == 1
    # ring-1 has one member
    assert [r["device"] for r in ops.wait(ops.group("ring-1", "ping"), 1)] == ["dev-b"]


def test_group_commands_must_be_signed_bound_to_their_group_and_unexpired(fleet):
    ops, boards = fleet
    unsigned = by_device(ops.wait(ops.group("site-a", "ping", signed=False), 2))
    assert {r["error"]["code"] for r in unsigned.values()} == {"unauthorized"}
    # An envelope bound to group site-b, published on site-a's topic: refused by site-a's members, and dev-c (in
    # site-b) never sees it.
    wrong = by_device(ops.wait(ops.group("site-a", "ping", target="group:site-b"), 2))
    assert {r["error"]["code"] for r in wrong.values()} == {"wrong_target"}
    assert "site-b" in wrong["dev-a"]["error"]["message"]
    # A board's own envelope is not a group's either.
    mine = by_device(ops.wait(ops.group("site-a", "ping", target="dev-a"), 2))
    assert {r["error"]["code"] for r in mine.values()} == {"wrong_target"}
    from drivers.sim.clock import SimClock
    import time

    stale = by_device(ops.wait(ops.group("site-a", "ping", ttl=60, clock=SimClock(epoch=time.time() - 3600)), 2))
    assert {r["error"]["code"] for r in stale.values()} == {"expired"}
    assert boards["dev-c"].link.channel.counters["group_commands"] == 0


def test_replay_protection_stays_per_board(fleet, key):
    ops, boards = fleet
    env = sign_envelope(key, device="group:site-a", cmd="ping", args={})
    first = by_device(ops.wait(ops.publish(wire.GroupTopics.command("site-a", "ping"), env), 2))
    assert all(r["ok"] for r in first.values())  # one nonce, run once by each member
    again = by_device(ops.wait(ops.publish(wire.GroupTopics.command("site-a", "ping"), env), 2))
    assert {r["error"]["code"] for r in again.values()} == {"replayed"}


def test_a_board_that_joins_or_leaves_a_group_subscribes_again(fleet):
    ops, boards = fleet
    c = boards["dev-c"]
    c.groups.set(["site-b", "site-a"], by="test")
    eventually(lambda: c.link.status()["groups"] == ["site-a", "site-b"], what="dev-c subscribed to site-a")

    def three():
        rid = ops.group("site-a", "ping")
        ops.wait(ops.board("dev-c", "ping"), 1)  # dev-c answers in order: its group reply, if any, is here
        return sorted(by_device(ops.wait(rid, 2))) == ["dev-a", "dev-b", "dev-c"]
    eventually(three, what="dev-c to answer site-a's commands")
    boards["dev-a"].groups.set([])
    eventually(lambda: boards["dev-a"].link.status()["groups"] == [], what="dev-a unsubscribed")
    rid = ops.group("site-a", "ping")
    ops.wait(ops.board("dev-a", "ping"), 1)
    assert sorted(by_device(ops.wait(rid, 2))) == ["dev-b", "dev-c"]


# ------------------------------------------------------------------------------------ groups.set on an agent


def test_groups_set_on_an_agent_persists_resubscribes_and_republishes(tmp_path, broker, key, mqtt_client):
    from device import config
    from device.agent.agent import Agent
    from tests.link.test_agent import write_config

    path = write_config(tmp_path, broker)
    text = open(path).read().replace("[device]\n", '[device]\ngroups = ["site-a"]\n', 1)
    open(path, "w").write(text)
    watcher = mqtt_client(broker)
    watcher.subscribe("fieldnode/v1/dev-a/state")
    ops = Fleet(broker, key)

    def start():
        a = Agent(config.load(path), control=False)
        t = threading.Thread(target=a.run, daemon=True)
        t.start()
        assert a.link.wait_connected(30)
        return a, t

    def last_state():
        got = [json.loads(m.payload) for m in watcher.messages() if m.payload]
        return got[-1] if got else {}

    a, t = start()
    try:
        eventually(lambda: last_state().get("groups") == ["site-a"], timeout=60, what="the state with site-a")
        for bad, why in (({"groups": ["x", "x"]}, "listed twice"), ({"groups": "x"}, "argument 'groups'"),
                         ({}, "missing groups"), ({"groups": ["x"], "reset": True}, "not both"),
                         ({"groups": [f"g{i}" for i in range(33)]}, "at most 32")):
            r = ops.wait(ops.board("dev-a", "groups.set", bad, signed=True), 1)[0]
            assert r["error"]["code"] == "bad_args" and why in r["error"]["message"], (bad, r)
        assert a.groups.current == ("site-a",) and not (tmp_path / "state" / "groups.json").exists()
        r = ops.wait(ops.board("dev-a", "groups.set", {"groups": ["site-a"]}), 1)[0]
        assert r["error"]["code"] == "unauthorized"  # privileged: signed only
        r = ops.wait(ops.board("dev-a", "groups.set", {"groups": ["site-b", "ring-1"]}, signed=True), 1)[0]
        assert r["ok"] and r["device"] == "dev-a" and r["result"]["groups"] == ["site-b", "ring-1"]
        assert r["result"]["source"] == "command" and r["result"]["set_by"]["by"] == "ops"
        saved = json.loads((tmp_path / "state" / "groups.json").read_text())
        assert saved["groups"] == ["site-b", "ring-1"]
        eventually(lambda: last_state().get("groups") == ["site-b", "ring-1"], what="the state with the new groups")
        eventually(lambda: a.link.status()["groups"] == ["ring-1", "site-b"], what="the new subscriptions")
        assert ops.wait(ops.group("site-b", "ping"), 1)[0]["device"] == "dev-a"
        # A reload with other groups in the file: the persisted set still wins.
        open(path, "w").write(text.replace('groups = ["site-a"]', 'groups = ["site-c"]'))
        assert "device.groups" in a.reload()["applied"]
        assert a.groups.current == ("site-b", "ring-1")
    finally:
        a.stop()
        t.join(30)
    a, t = start()  # a restart: still the persisted set
    try:
        assert a.groups.current == ("site-b", "ring-1") and a.groups.source == "command"
        r = ops.wait(ops.board("dev-a", "groups.set", {"reset": True}, signed=True), 1)[0]
        assert r["ok"] and r["result"]["groups"] == ["site-c"] and r["result"]["source"] == "config"
        assert not (tmp_path / "state" / "groups.json").exists()
        eventually(lambda: last_state().get("groups") == ["site-c"], what="the state with the config's groups")
        # groups.set may also come as a group command: the whole group moves.
        eventually(lambda: a.link.status()["groups"] == ["site-c"], what="subscribed to site-c")
        r = ops.wait(ops.group("site-c", "groups.set", {"groups": ["site-d"]}), 1)[0]
        assert r["ok"] and a.groups.current == ("site-d",)
    finally:
        a.stop()
        t.join(30)
        ops.close()
