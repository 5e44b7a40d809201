"""The whole agent against a real mosquitto: every command path over MQTT (request/response with MQTT 5
properties and the 3.1.1 reply topic), signed envelopes (good, replayed, expired), the malformed cases, the
last will of a SIGKILLed agent, and a SIGKILLed agent restarted after an outage delivering every spooled
result."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device import config
from device.agent.agent import Agent
from device.link.envelope import sign_envelope
from tests.waiting import eventually

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEV = "dev-a"
PREFIX = f"fieldnode/v1/{DEV}"


def write_config(tmp_path, broker, **link) -> str:
    trust = tmp_path / "trust"
    trust.mkdir(exist_ok=True)
    lines = [
        "[device]", f'id = "{DEV}"', f'state_dir = "{tmp_path / "state"}"', f'runtime_dir = "{tmp_path / "run"}"',
        "[runtime]", 'isolation = "inline"', 'delegate = "cpu"',
        "[drivers]", 'virtual_board = "rpi4"',
        "[power]", "step_s = 0.5",
        "[link]", f'broker = "{broker.url}"', f'trust_dir = "{trust}"', "backoff_min_s = 0.05",
        "backoff_max_s = 0.5", "spool_commit_ms = 20",
    ] + [f"{k} = {json.dumps(v)}" for k, v in link.items()]
    path = tmp_path / "fieldnode.toml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def operator_key(tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "trust").mkdir(exist_ok=True)
    (tmp_path / "trust" / "operator.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key


def running_agent(cfg, **kw):
    """An agent running on a thread, connected to its broker; stopped when the generator is closed (a fixture's
    body)."""
    a = Agent(cfg, **kw)
    t = threading.Thread(target=a.run, daemon=True)
    t.start()
    assert a.link.wait_connected(30)
    yield a
    a.stop()
    t.join(30)


@pytest.fixture
def agent(tmp_path, broker, operator_key):
    yield from running_agent(config.load(write_config(tmp_path, broker)))


class Operator:
    """An operator's client: MQTT 5 request/response, or 3.1.1 with the reply topic."""

    def __init__(self, broker, protocol=mqtt.MQTTv5):
        self.v5 = protocol == mqtt.MQTTv5
        self.replies: dict[str, dict] = {}
        self.cond = threading.Condition()
        self.id = f"op-{uuid.uuid4().hex[:8]}"
        self.reply_topic = f"{PREFIX}/reply/{self.id}" if self.v5 else f"{PREFIX}/reply"
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.id, protocol=protocol)
        self.c.on_message = self._msg
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        self.c.subscribe(self.reply_topic, qos=1)
        assert done.wait(10)

    def _msg(self, c, u, m):
        body = json.loads(m.payload)
        key = body.get("request_id")
        if self.v5 and m.properties is not None and getattr(m.properties, "CorrelationData", None):
            key = m.properties.CorrelationData.decode()
        with self.cond:
            self.replies[key] = body
            self.cond.notify_all()

    def send(self, cmd: str, payload, rid: str | None = None, timeout: float = 20.0) -> dict:
        rid = rid or uuid.uuid4().hex[:12]
        if isinstance(payload, dict):
            payload = json.dumps({"request_id": rid, **payload}).encode()
        props = None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = rid.encode()
        with self.cond:
            self.replies.pop(rid, None)
        self.c.publish(f"{PREFIX}/cmd/{cmd}", payload, qos=1, properties=props)
        with self.cond:
            assert self.cond.wait_for(lambda: rid in self.replies, timeout), f"no reply to {cmd}"
            return self.replies[rid]

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def operator(broker):
    op = Operator(broker)
    yield op
    op.close()


def signed(key, cmd, args, ttl=60, **kw):
    return sign_envelope(key, device=DEV, cmd=cmd, args=args, ttl_s=ttl, **kw)


def test_unprivileged_commands(agent, operator):
    r = operator.send("ping", {})
    assert r["ok"] and r["result"]["pong"] is True
    r = operator.send("status", {})
    assert r["ok"] and r["result"]["device"] == DEV and r["result"]["link"]["connected"]
    assert r["result"]["runtime"]["model"] == "vibration"
    r = operator.send("config.get", {"args": {"key": "runtime.isolation"}})
    assert r == {"ok": True, "cmd": "config.get", "request_id": r["request_id"], "device": DEV, "result": {"runtime.isolation": "inline"}}
    assert agent.sensor.wait_until(lambda h: h.windows >= 1, timeout=30)
    r = operator.send("infer", {})
    assert r["ok"] and r["result"]["label"] in ("normal", "imbalance", "bearing_fault", "loose_mount")
    assert isinstance(r["result"]["id"], int)


def test_the_diag_command_runs_the_technicians_checks_on_the_board(agent, operator):
    r = operator.send("diag", {}, timeout=60)
    assert r["ok"], r
    d = r["result"]
    names = {c["name"]: c for c in d["checks"]}
    assert d["simulated"] is True and d["exit"] in (0, 5, 6)  # device.errors.Exit: OK, WARN, FAULTS
    # what the agent holds is read from its own status, so the sensor it reads is seen delivering
    assert names["config"]["status"] == "OK" and names["sensor"]["status"] in ("OK", "WARN"), names["sensor"]
    assert names["broker"]["status"] == "OK", names["broker"]  # the board reaches the broker it answers on
    assert all(c["remedy"] for c in d["checks"] if c["status"] in ("WARN", "FAIL"))
    # heavy (model workers, seconds of the command thread): at most once a minute, whoever asks
    again = operator.send("diag", {}, timeout=30)
    assert not again["ok"] and again["error"]["code"] == "too_soon" and "once a minute" in again["error"]["message"]


def test_privileged_commands_need_a_good_envelope(agent, operator, operator_key):
    r = operator.send("variant", {"args": {"variant": "lite"}})
    assert not r["ok"] and r["error"]["code"] == "unauthorized"
    env = signed(operator_key, "variant", {"variant": "lite"})
    r = operator.send("variant", env)
    assert r["ok"] and r["result"]["variant"] == "lite" and r["result"]["pinned"] == "lite"
    assert agent.runtime.variant == "lite"
    # the same envelope again, as a new request: replayed
    r = operator.send("variant", env)
    assert not r["ok"] and r["error"]["code"] == "replayed"
    # expired
    past = signed(operator_key, "variant", {"variant": "full"}, ttl=1)
    past["expires"] -= 3600
    r = operator.send("variant", past)
    assert not r["ok"] and r["error"]["code"] in ("bad_signature", "expired")  # tampered expiry breaks the sig
    from drivers.sim.clock import SimClock

    old = SimClock(epoch=time.time() - 3600)
    r = operator.send("variant", signed(operator_key, "variant", {"variant": "full"}, ttl=60, clock=old))
    assert not r["ok"] and r["error"]["code"] == "expired"
    # an envelope for another command or another board
    r = operator.send("variant", signed(operator_key, "governor", {"level": "saver"}))
    assert not r["ok"] and r["error"]["code"] == "wrong_target"
    other = sign_envelope(operator_key, device="dev-b", cmd="variant", args={"variant": "full"})
    assert operator.send("variant", other)["error"]["code"] == "wrong_target"
    # governor override through MQTT, then back to auto
    r = operator.send("governor", signed(operator_key, "governor", {"level": "saver", "ttl_s": 600}))
    assert r["ok"] and r["result"]["level"] == "saver" and r["result"]["override"]["level"] == "saver"
    r = operator.send("governor", signed(operator_key, "governor", {"level": "auto"}))
    assert r["ok"] and "override" not in r["result"]
    # a runtime target through MQTT (signed), refused out of range, then cleared
    r = operator.send("governor.target", signed(operator_key, "governor.target", {"hours": 12}))
    assert r["ok"] and r["result"]["plan"]["target"]["hours"] == 12.0
    assert r["result"]["plan"]["target"]["by"]  # who set it: the envelope's signer
    r = operator.send("governor.target", signed(operator_key, "governor.target", {"hours": 9000}))
    assert not r["ok"] and r["error"]["code"] == "bad_args" and "hours" in r["error"]["message"]
    r = operator.send("governor.target", {"args": {"hours": 1}})
    assert not r["ok"] and r["error"]["code"] == "unauthorized"
    r = operator.send("governor.target", signed(operator_key, "governor.target", {"hours": 0}))
    assert r["ok"] and r["result"]["plan"]["target"] is None
    refused = agent.dispatcher.counters
    assert refused.get("replayed", 0) >= 1 and refused.get("wrong_target", 0) >= 2


@pytest.mark.parametrize("payload, code", [
    (b"\xff\xfe not utf-8", "bad_json"),
    (b"{not json", "bad_json"),
    (b"[1, 2]", "bad_json"),
    (b'{"request_id": 5}', "bad_request"),
    (b'{"request_id": "a", "args": [1]}', "bad_request"),
    (b'{"request_id": "a", "color": "red"}', "bad_request"),
    (b'{"args": {"key": 7}}', "bad_args"),
    (b'{"args": {"nope": 1}}', "bad_args"),
    (b"x" * 17000, "payload_too_large"),
])
def test_malformed_commands_get_error_replies_and_the_agent_goes_on(agent, operator, payload, code):
    rid = uuid.uuid4().hex[:12]
    r = operator.send("config.get", payload, rid=rid)  # MQTT 5: correlated by CorrelationData
    assert r["ok"] is False and r["error"]["code"] == code and r["error"]["message"]
    assert operator.send("ping", {})["ok"]  # still alive


def test_unknown_command_and_duplicates(agent, operator):
    r = operator.send("reboot.now", {})
    assert r["error"]["code"] == "unknown_command"
    assert agent.sensor.wait_until(lambda h: h.windows >= 1, timeout=30)
    first = operator.send("infer", {}, rid="dup-1")
    assert first["ok"], first
    dups = agent.dispatcher.counters["duplicates"]
    again = operator.send("infer", {}, rid="dup-1")
    # the cached reply: a second run would have made a result with a new id
    assert again == first and again["result"]["id"] == first["result"]["id"]
    assert agent.dispatcher.counters["duplicates"] == dups + 1


def test_mqtt_311_replies_go_to_the_reply_topic_with_the_request_id(agent, broker):
    op = Operator(broker, protocol=mqtt.MQTTv311)
    try:
        r = op.send("ping", {}, rid="v311-1")
        assert r["ok"] and r["request_id"] == "v311-1"
    finally:
        op.close()


# ------------------------------------------------------------------------------- the agent as a process


def spawn_agent(cfg_path: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-m", "tools.cli", "run", "--config", cfg_path], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def test_last_will_of_a_killed_agent_and_clean_offline(tmp_path, broker, mqtt_client, operator_key):
    watcher = mqtt_client(broker)
    watcher.subscribe(f"{PREFIX}/state")
    proc = spawn_agent(write_config(tmp_path, broker, keepalive_s=5))
    try:
        eventually(lambda: any(json.loads(m.payload)["state"] == "online" for m in watcher.messages()), timeout=60.0, what="online")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        # mosquitto publishes the will when it notices the dead socket (the kernel closes it at once)
        eventually(lambda: json.loads(watcher.messages()[-1].payload)["state"] == "lost", timeout=60.0, what="lost")
        proc = spawn_agent(write_config(tmp_path, broker))
        eventually(lambda: json.loads(watcher.messages()[-1].payload)["state"] == "online", timeout=60.0, what="online again")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        eventually(lambda: json.loads(watcher.messages()[-1].payload)["state"] == "offline", timeout=60.0, what="offline")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_agent_killed_while_offline_delivers_every_spooled_result_after_restart(tmp_path, broker, mqtt_client):
    results = mqtt_client(broker, client_id="results-watcher")
    results.subscribe(f"{PREFIX}/results/#")
    cfg = write_config(tmp_path, broker)
    proc = spawn_agent(cfg)
    try:
        eventually(lambda: len(results.messages()) >= 3, timeout=60.0, what="results before the outage")
        broker.stop()
        spool_path = str(tmp_path / "state" / "spool" / "spool.db")

        def spooled():
            # a read-only second reader of the WAL database: what is committed right now
            db = sqlite3.connect(f"file:{spool_path}?mode=ro", uri=True)
            try:
                return [row[0] for row in db.execute("SELECT id FROM messages WHERE kind = 1 ORDER BY id")]
            except sqlite3.OperationalError:
                return []
            finally:
                db.close()

        eventually(lambda: len(spooled()) >= 8, timeout=60.0, what="results spooled while offline")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        must_arrive = spooled()  # everything committed before the kill
        broker.restart()
        results.wait_connected(2)
        results.subscribe(f"{PREFIX}/results/#")
        proc = spawn_agent(cfg)
        got = eventually(lambda: (lambda ids: ids if set(must_arrive) <= ids else None)(
            {json.loads(m.payload)["id"] for m in results.messages()}), timeout=60.0, what="every spooled result")
        assert set(must_arrive) <= got
        ids = [json.loads(m.payload)["id"] for m in results.messages()]
        firsts = list(dict.fromkeys(ids))
        assert firsts == sorted(firsts)  # in order
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_corrupt_spool_is_moved_aside_and_the_agent_runs(tmp_path, broker, mqtt_client, operator_key):
    spool_dir = tmp_path / "state" / "spool"
    spool_dir.mkdir(parents=True)
    (spool_dir / "spool.db").write_bytes(b"this is not a database" * 100)
    watcher = mqtt_client(broker)
    watcher.subscribe(f"{PREFIX}/events")
    cfg = config.load(write_config(tmp_path, broker))
    a = Agent(cfg)
    t = threading.Thread(target=a.run, daemon=True)
    t.start()
    try:
        assert a.link.wait_connected(30)
        evs = [json.loads(m.payload) for m in watcher.wait_for_messages(1)]
        eventually(lambda: any(e["kind"] == "spool_corrupt" for e in
                             [json.loads(m.payload) for m in watcher.messages()]), timeout=60.0, what="spool_corrupt event")
        assert a.spool.stats()["corrupt_recoveries"] == 1
        assert [p for p in os.listdir(spool_dir) if ".corrupt-" in p]
        assert evs is not None and a.sensor.wait_until(lambda h: h.windows >= 1, timeout=30)
        eventually(lambda: a.results >= 1, timeout=60.0, what="a result on the fresh spool")
    finally:
        a.stop()
        t.join(30)


@pytest.mark.parametrize("broker_url, key, words", [
    ("http://127.0.0.1:1883", "link.broker", "scheme"),
    ("mqtt://127.0.0.1:99999", "link.broker", "port"),
    ("mqtts://127.0.0.1:8883", "link.ca_file", "ca"),
])
def test_a_bad_broker_url_is_a_config_error_naming_the_key(tmp_path, broker_url, key, words):
    from device.errors import ConfigError

    class Fake:
        url = broker_url

    with pytest.raises(ConfigError) as e:
        config.load(write_config(tmp_path, Fake))  # refused by the loader, before any Agent exists
    assert e.value.key_path == key and words in str(e.value).lower()


def test_fieldnode_send_talks_to_the_agent(agent, broker, operator_key, tmp_path, capsys):
    from tools.cli import main

    assert main(["send", "--broker", broker.url, "--device", DEV, "ping", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["result"]["pong"] is True
    key = tmp_path / "ops.key"
    key.write_bytes(operator_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    rc = main(["send", "--broker", broker.url, "--device", DEV, "governor", "--args",
               '{"level": "critical", "ttl_s": 120}', "--sign", str(key), "--json"])
    reply = json.loads(capsys.readouterr().out)
    assert rc == 0 and reply["result"]["level"] == "critical"
    assert agent.governor.level.label == "critical"
    # unsigned: refused, exit 1
    assert main(["send", "--broker", broker.url, "--device", DEV, "governor", "--args", '{"level": "auto"}']) == 1
    assert "unauthorized" in capsys.readouterr().out


def test_telemetry_and_events_are_published(tmp_path, broker, mqtt_client, operator_key):
    path = write_config(tmp_path, broker)
    with open(path, "a") as f:
        f.write("[power.performance]\ntelemetry_s = 1\n")
    watcher = mqtt_client(broker)
    watcher.subscribe(f"{PREFIX}/#")
    a = Agent(config.load(path))
    t = threading.Thread(target=a.run, daemon=True)
    t.start()
    try:
        tel = json.loads(watcher.wait_for_messages(1, timeout=30, topic=f"{PREFIX}/telemetry")[0].payload)
        assert tel["governor"]["level"] == "performance" and tel["power"]["temp_source"] == "cpu-thermal"
        assert set(tel) >= {"id", "time", "power", "governor", "latency", "results", "sensor", "spool"}
        a.governor.override("saver", 60, by="test")
        eventually(lambda: any(json.loads(m.payload)["kind"] == "governor_level"
                             for m in watcher.messages(f"{PREFIX}/events")), timeout=60.0, what="a governor_level event")
        ev = next(json.loads(m.payload) for m in watcher.messages(f"{PREFIX}/events")
                  if json.loads(m.payload)["kind"] == "governor_level")
        assert ev["to"] == "saver" and ev["override"] is True and isinstance(ev["id"], int)
    finally:
        a.stop()
        t.join(30)


def test_quarantine_survives_a_restart_and_a_signed_command_releases_it(tmp_path, broker, operator_key):
    import hashlib

    bad = tmp_path / "bad_model.tflite"
    bad.write_bytes(b"TFL3 stands in for a model that crashed its worker three times")
    sha = hashlib.sha256(bad.read_bytes()).hexdigest()
    state = tmp_path / "state"
    state.mkdir()
    (state / "quarantine.json").write_text(json.dumps({"version": 1, "counts": {}, "entries": [
        {"path": str(bad), "sha256": sha, "crashes": 3, "reason": "worker was killed by signal SIGSEGV",
         "since": 1764288000.0}]}))
    a = Agent(config.load(write_config(tmp_path, broker)))
    t = threading.Thread(target=a.run, daemon=True)
    t.start()
    op = Operator(broker)
    try:
        assert a.link.wait_connected(30)
        listed = op.send("status", {"args": {}})["result"]["runtime"]["quarantined"]
        assert [q["sha256"] for q in listed] == [sha] and listed[0]["crashes"] == 3
        assert op.send("quarantine.release", {"args": {"sha256": sha}})["error"]["code"] == "unauthorized"
        assert op.send("quarantine.release", signed(operator_key, "quarantine.release",
                                                    {"sha256": "BAD"}))["error"]["code"] == "bad_args"
        r = op.send("quarantine.release", signed(operator_key, "quarantine.release", {"sha256": sha}))
        assert r["ok"] and r["result"] == {"released": sha, "quarantined": []}
        assert json.loads((state / "quarantine.json").read_text())["entries"] == []
        again = op.send("quarantine.release", signed(operator_key, "quarantine.release", {"sha256": sha}))
        assert again["error"]["code"] == "command_failed" and sha in again["error"]["message"]
    finally:
        op.close()
        a.stop()
        t.join(30)


def test_a_stop_says_what_it_drains_and_what_it_keeps(tmp_path, broker, caplog):
    """The journal of a systemctl stop: what the agent does while it drains, and what it leaves for the next start."""
    import logging

    caplog.set_level(logging.INFO, logger="device.agent")
    a = Agent(config.load(write_config(tmp_path, broker)))
    t = threading.Thread(target=a.run, daemon=True)
    t.start()
    try:
        assert a.link.wait_connected(30)
        eventually(lambda: a.spool.stats()["commits"] > 0, what="a spool commit")
    finally:
        a.stop()
        t.join(30)
    said = [r.getMessage() for r in caplog.records if r.name == "device.agent"]
    assert any(m.startswith("stopping: the link says offline") for m in said), said
    assert any(m.startswith("stopped: ") and "kept in the spool" in m for m in said), said
