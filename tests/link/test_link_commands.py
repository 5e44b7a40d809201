"""The board's command channel against a real mosquitto, attacked the way issue 9 found it broken: hostile
Response Topics (7.2), command floods (7.5) and oversized payloads (7.6); and ``fieldnode send`` against the
board's own link and dispatcher through the wire contract (section 5)."""

from __future__ import annotations

import argparse
import json
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tools import send
from device.link import wire
from device.link.client import Link
from device.link.commands import Dispatcher, Registry, register_builtin
from device.link.spool.spool import Spool
from tests.link.broker import Broker
from tests.waiting import eventually

PREFIX = "fieldnode/v1/dev-a"
REFUSAL_BURST = 10


class FrozenClock:
    """Real wall-clock timestamps, but monotonic time that never moves: token buckets never refill, so how many
    replies a burst may get is exact instead of depending on how fast this machine is."""

    def monotonic(self) -> float:
        return 1000.0

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


@pytest.fixture
def board(tmp_path):
    """``board(broker, protocol=..., **link_kw)`` -> (link, dispatcher, spool): the board's side with the built-in
    commands, a frozen monotonic clock (rate limit: burst 20, refusal budget: burst 10), stopped at teardown."""
    made = []

    def make(broker: Broker, *, protocol: str = "5", clock=None, **kw):
        clock = clock or FrozenClock()
        registry = Registry()
        register_builtin(registry, version="test")
        dispatcher = Dispatcher(registry, clock=clock, rate_burst=20, rate_per_s=5.0)
        spool = Spool(str(tmp_path / f"spool-{len(made)}.db"), commit_interval_s=0.02)
        spool.start()
        link = Link(broker.url, "dev-a", spool, protocol=protocol, backoff=(0.05, 0.5), dispatcher=dispatcher,
                    clock=clock, refusal_budget=(REFUSAL_BURST, 1.0), **kw)
        made.append((link, spool))
        link.start()
        assert link.wait_connected(20)
        return link, dispatcher, spool

    yield make
    for link, spool in made:
        link.stop()
        spool.close()


def ping(client, *, response: str | None = None, correlation: bytes | None = None, payload: bytes = b"{}",
         qos: int = 1):
    props = None
    if response is not None or correlation is not None:
        props = Properties(PacketTypes.PUBLISH)
        if response is not None:
            props.ResponseTopic = response
        if correlation is not None:
            props.CorrelationData = correlation
    return client.client.publish(f"{PREFIX}/cmd/ping", payload, qos=qos, properties=props)


# -- 7.2: a Response Topic the board will not publish to ---------------------------------------------------------

BAD_REPLY_TOPICS = ["x/#", "a/+/b", "#", "$SYS/broker/x", f"{PREFIX}/results/vibration", f"{PREFIX}/state",
                    f"{PREFIX}/events", f"{PREFIX}/telemetry", f"{PREFIX}/cmd/ping", "fieldnode/v1/dev-b/cmd/reboot",
                    "r" * 600]


def test_bad_response_topics_are_refused_without_touching_the_connection(broker, board, mqtt_client):
    link, dispatcher, _ = board(broker)
    watcher = mqtt_client(broker)
    watcher.subscribe("#")  # everything the board publishes ('$' topics aside)
    attacker = mqtt_client(broker)

    for i in range(20):
        ping(attacker, response=BAD_REPLY_TOPICS[i % len(BAD_REPLY_TOPICS)], correlation=b"bad-%d" % i,
             payload=b'{"request_id": "bad-%d"}' % i).wait_for_publish(10)
    ping(attacker, response="ops/replies/1", correlation=b"good", payload=b'{"request_id": "good"}')

    (answer,) = watcher.wait_for_messages(1, topic="ops/replies/1")
    assert json.loads(answer.payload)["result"]["pong"] is True
    assert answer.properties.CorrelationData == b"good"
    st = link.status()
    assert (st["connects"], st["disconnects"], st["connected"]) == (1, 0, True)  # 20 of them before: 21 disconnects
    assert st["bad_reply_topic"] == 20 and dispatcher.counters["bad_reply_topic"] == 20
    assert dispatcher.counters["ok"] == 1  # none of the refused pings ran
    refusals = [json.loads(m.payload) for m in watcher.messages(f"{PREFIX}/reply")]
    assert 1 <= len(refusals) <= REFUSAL_BURST  # on the board's own reply topic, within the refusal budget
    assert all(r["error"]["code"] == "bad_reply_topic" and r["request_id"].startswith("bad-") for r in refusals)
    assert st["replies_dropped"] == 20 - len(refusals)
    board_out = [m for m in watcher.messages() if "ok" in json.loads(m.payload) or m.topic == f"{PREFIX}/state"]
    assert {m.topic for m in board_out} == {f"{PREFIX}/state", f"{PREFIX}/reply", "ops/replies/1"}
    assert len(watcher.messages(f"{PREFIX}/cmd/ping")) == 21  # only the attacker's own requests
    assert len(watcher.messages(f"{PREFIX}/state")) == 1  # one birth: the link never reconnected


# -- 7.5: command floods ------------------------------------------------------------------------------------------


class Flooder(threading.Thread):
    """Publishes pings at QoS 1 as fast as the broker takes them until stopped (paho's own queue capped, so the
    test client's memory stays bounded too)."""

    def __init__(self, client, limit: int) -> None:
        super().__init__(daemon=True)
        self.client, self.limit, self.sent = client, limit, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and self.sent < self.limit:
            info = ping(self.client, response="ops/flood", correlation=b"f")
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                self.sent += 1
            else:  # paho's queue is full: let the broker catch up
                self.stop.wait(0.002)


def test_a_command_flood_is_bounded_and_results_keep_flowing(broker, board, mqtt_client):
    link, dispatcher, _ = board(broker)
    watcher = mqtt_client(broker)
    watcher.subscribe("ops/flood")
    watcher.subscribe(f"{PREFIX}/results/#")
    flood_client = mqtt_client(broker, connect=False)
    flood_client.client.max_queued_messages_set(500)
    flood_client.connect()
    flooder = Flooder(flood_client, limit=200_000)
    flooder.start()
    try:
        received = lambda: link.status()["commands_received"] + link.status()["commands_dropped"]  # noqa: E731
        eventually(lambda: received() >= 2000, what="2000 flood commands at the board")
        ids = [link.publish_result("vibration", {"n": i}) for i in range(20)]
        got = watcher.wait_for_messages(20, timeout=60, topic=f"{PREFIX}/results/#")
        assert [json.loads(m.payload)["id"] for m in got] == ids
        at_results = received()
        # The flood was still coming in when the results were through: they did not wait for it to end.
        eventually(lambda: received() >= at_results + 1000, what="the flood going on after the results")
    finally:
        flooder.stop.set()
        flooder.join(30)
    st = link.status()
    assert flooder.sent >= 3000
    assert (st["connects"], st["disconnects"], st["connected"]) == (1, 0, True)
    assert st["commands_queue_peak"] <= link.channel.queue_size
    assert st["replies_queue_peak"] <= link.channel.reply_queue
    assert st["replies_queued"] <= link.channel.reply_queue and st["commands_queued"] <= link.channel.queue_size
    # Frozen refill: 20 pings ran (rate burst), the refusal budget answered 10 rate_limited; nothing else.
    assert dispatcher.counters["ok"] == 20
    assert st["replies"] <= 20 + REFUSAL_BURST
    assert st["replies_dropped"] >= dispatcher.counters["rate_limited"] - REFUSAL_BURST
    time.sleep(0.5)  # let any reply still on its way arrive, so an excess would be seen
    replies = watcher.messages("ops/flood")
    assert 20 <= len(replies) <= 20 + REFUSAL_BURST
    codes = [json.loads(m.payload).get("error", {}).get("code") for m in replies]
    assert codes.count(None) == 20 and set(codes) - {None} <= {"rate_limited"}


# -- 7.6: oversized payloads --------------------------------------------------------------------------------------


def test_an_oversized_command_never_reaches_the_board_under_mqtt5(broker, board, mqtt_client):
    link, dispatcher, _ = board(broker)
    assert link.max_packet == 16384 + 4096 + len(PREFIX)  # the dispatcher's limit plus headroom
    watcher = mqtt_client(broker)
    watcher.subscribe("ops/#")
    sender = mqtt_client(broker)

    info = ping(sender, response="ops/big", payload=b"{" + b" " * (2 * 1024 * 1024) + b"}")
    info.wait_for_publish(30)
    ping(sender, response="ops/small", correlation=b"s", payload=b'{"request_id": "small"}')

    (answer,) = watcher.wait_for_messages(1, topic="ops/small")
    assert json.loads(answer.payload)["request_id"] == "small"
    broker.wait_for_log("dev-a")  # the broker knew the board all along
    c = dispatcher.counters
    assert (c["requests"], c["ok"], c["payload_too_large"]) == (1, 1, 0)  # the 2 MB one never arrived
    st = link.status()
    assert (st["commands_received"], st["connects"], st["disconnects"]) == (1, 1, 0)
    assert not watcher.messages("ops/big")


def test_mqtt_311_has_no_packet_limit_so_the_dispatcher_refuses_it(broker, board, mqtt_client):
    """MQTT 3.1.1 cannot announce a limit: the board reads the payload and refuses it (documented)."""
    link, dispatcher, _ = board(broker, protocol="3.1.1")
    watcher = mqtt_client(broker)
    watcher.subscribe(f"{PREFIX}/reply")
    sender = mqtt_client(broker, protocol=mqtt.MQTTv311)

    ping(sender, payload=b"{" + b" " * (64 * 1024) + b"}").wait_for_publish(30)

    (refusal,) = watcher.wait_for_messages(1)
    assert json.loads(refusal.payload)["error"]["code"] == "payload_too_large"
    assert dispatcher.counters["payload_too_large"] == 1 and link.status()["disconnects"] == 0


# -- section 5: fieldnode send against the board's link, through the contract -------------------------------------


def run_send(capsys, *argv: str) -> tuple:
    parser = argparse.ArgumentParser(prog="fieldnode send")
    send.add_arguments(parser)
    code = send.run(parser.parse_args(list(argv)))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_send_against_the_boards_link(broker, board, capsys, protocol):
    link, dispatcher, _ = board(broker, protocol=protocol, clock=None)
    common = ["--broker", broker.url, "--device", "dev-a", "--mqtt", protocol, "--json"]

    code, out, err = run_send(capsys, *common, "ping", "--request-id", "r-1")
    assert (code, err) == (0, "")
    reply = wire.parse_reply(out.encode())
    assert (reply["cmd"], reply["request_id"], reply["result"]["version"]) == ("ping", "r-1", "test")

    code, out, err = run_send(capsys, *common, "reboot", "--request-id", "r-2")
    assert (code, err) == (1, "")
    reply = wire.parse_reply(out.encode())
    assert reply["error"]["code"] == "unknown_command" and "known: ping" in reply["error"]["message"]

    code, out, _ = run_send(capsys, *common, "ping", "--request-id", "r-1")  # a retry: the cached reply
    assert code == 0 and wire.parse_reply(out.encode())["request_id"] == "r-1"
    assert dispatcher.counters["duplicates"] == 1 and link.status()["bad_reply_topic"] == 0
