"""The link against a real mosquitto: birth and clean offline, results in order with ids, PUBACK deletes
from the spool, and a broker outage under a steady stream loses nothing and keeps the order."""

from __future__ import annotations

import json
import threading

import paho.mqtt.client as mqtt
import pytest

from device.link.client import Link
from device.link.spool.spool import Spool
from tests.link.broker import Broker


class Subscriber:
    """A persistent-session subscriber (MQTT 3.1.1, clean_session False): with broker persistence on, it keeps
    its subscription and queued messages across a broker restart, so the test sees everything the device
    published whether or not it was connected at that moment."""

    def __init__(self, broker: Broker, topic: str, client_id: str):
        self.got: list[tuple[str, dict, bool]] = []
        self.cond = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                             clean_session=False)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.c.on_message = self._msg
        self.subscribed = threading.Event()
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.reconnect_delay_set(0.05, 0.5)
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        assert self.subscribed.wait(10), "the test subscriber's SUBACK never came"

    def _msg(self, c, u, m):
        with self.cond:
            self.got.append((m.topic, json.loads(m.payload), m.retain))
            self.cond.notify_all()

    def wait(self, pred, timeout=30.0):
        with self.cond:
            assert self.cond.wait_for(lambda: pred(self.got), timeout), f"timed out; got {len(self.got)} messages"
            return list(self.got)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def persistent_broker(tmp_path):
    b = Broker(str(tmp_path / "broker"), "plain",
               extra_config=("persistence true", f"persistence_location {tmp_path}/", "max_queued_messages 0",
                             "max_inflight_messages 0")).start()
    yield b
    b.stop()


def wait_acked(link, n, timeout=30.0):
    """The subscriber having a message does not mean its PUBACK is back at the link yet."""
    for _ in range(int(timeout / 0.02)):
        if link.counters["acked"] >= n:
            return
        threading.Event().wait(0.02)
    raise AssertionError(f"only {link.counters['acked']} of {n} PUBACKs")


def make_link(broker, tmp_path, **kw):
    spool = Spool(str(tmp_path / "spool.db"), commit_interval_s=0.02)
    spool.start()
    events = []
    link = Link(broker.url, kw.pop("device_id", "dev-a"), spool, backoff=(0.05, 0.5),
                birth=lambda: {"version": "test", "models": {"vibration": {"variants": ["full", "lite"]}}},
                on_event=lambda k, d: events.append((k, d)), **kw)
    return link, spool, events


def test_birth_online_results_in_order_and_clean_offline(broker, tmp_path, mqtt_client):
    watcher = mqtt_client(broker)
    watcher.subscribe("fieldnode/v1/dev-a/#")
    link, spool, events = make_link(broker, tmp_path)
    link.start()
    assert link.wait_connected(10)
    state = watcher.wait_for_messages(1, topic="fieldnode/v1/dev-a/state")[0]
    birth = json.loads(state.payload)
    assert birth["state"] == "online" and birth["version"] == "test" and birth["device"] == "dev-a"
    ids = [link.publish_result("vibration", {"label": "normal", "n": i}) for i in range(200)]
    got = watcher.wait_for_messages(200, topic="fieldnode/v1/dev-a/results/vibration")
    payloads = [json.loads(m.payload) for m in got]
    assert [p["id"] for p in payloads] == ids == sorted(ids)
    assert [p["n"] for p in payloads] == list(range(200))
    wait_acked(link, 200)
    spool.flush()
    assert spool.stats()["messages"] == 0  # every PUBACK deleted its message
    assert link.counters["acked"] == 200
    link.stop()
    spool.close()
    last = watcher.wait_for_messages(2, topic="fieldnode/v1/dev-a/state")[-1]
    assert json.loads(last.payload)["state"] == "offline"
    # a late subscriber sees the retained state: offline, not lost
    late = mqtt_client(broker)
    late.subscribe("fieldnode/v1/dev-a/state")
    retained = late.wait_for_messages(1)[0]
    assert retained.retain and json.loads(retained.payload)["state"] == "offline"
    assert [k for k, _ in events].count("link_connected") == 1


def test_mqtt_311_link_works_too(broker, tmp_path, mqtt_client):
    watcher = mqtt_client(broker)
    watcher.subscribe("fieldnode/v1/dev-a/results/#")
    link, spool, _ = make_link(broker, tmp_path, protocol="3.1.1")
    link.start()
    try:
        ids = [link.publish_result("vibration", {"n": i}) for i in range(20)]
        got = watcher.wait_for_messages(20)
        assert [json.loads(m.payload)["id"] for m in got] == ids
    finally:
        link.stop()
        spool.close()


def test_broker_outage_under_a_steady_stream_loses_nothing_and_keeps_order(persistent_broker, tmp_path):
    sub = Subscriber(persistent_broker, "fieldnode/v1/dev-a/results/#", "watcher-outage")
    link, spool, events = make_link(persistent_broker, tmp_path)
    link.start()
    assert link.wait_connected(10)
    produced: list[int] = []
    stop = threading.Event()

    def produce():
        i = 0
        while not stop.is_set():
            produced.append(link.publish_result("vibration", {"n": i}))
            i += 1
            stop.wait(0.002)

    t = threading.Thread(target=produce)
    t.start()
    try:
        sub.wait(lambda got: len(got) >= 100)
        persistent_broker.stop()  # the outage: the link keeps spooling
        n_at_outage = len(produced)
        while len(produced) < n_at_outage + 300:
            stop.wait(0.01)
        assert not link.connected
        persistent_broker.restart()
        assert link.wait_connected(30)
        while len(produced) < n_at_outage + 600:
            stop.wait(0.01)
    finally:
        stop.set()
        t.join()
    got = sub.wait(lambda g: set(produced) <= {m[1]["id"] for m in g})
    seen: list[int] = []
    for _, payload, _ in got:
        if payload["id"] not in seen:
            seen.append(payload["id"])
    assert seen == produced  # 0 lost, first occurrences in order (duplicates are dropped by id)
    assert [k for k, _ in events].count("link_disconnected") >= 1
    link.stop()
    spool.close()
    sub.close()


def test_results_spooled_before_the_first_connect_are_replayed(persistent_broker, tmp_path):
    """The device starts while the broker is down: everything waits in the spool, then goes out in order."""
    sub = Subscriber(persistent_broker, "fieldnode/v1/dev-a/results/#", "watcher-late")
    persistent_broker.stop()  # the subscriber's session and subscription survive in the broker's store
    link, spool, _ = make_link(persistent_broker, tmp_path)
    link.start()
    ids = [link.publish_result("vibration", {"n": i}) for i in range(50)]
    assert not link.wait_connected(0.5)
    assert link.counters["connect_failures"] >= 1 and "cannot connect" in link.last_error
    persistent_broker.restart()
    assert link.wait_connected(30)
    got = sub.wait(lambda g: {m[1]["id"] for m in g} >= set(ids))
    assert list(dict.fromkeys(m[1]["id"] for m in got)) == ids  # all of them, in order (duplicates dropped)
    wait_acked(link, 50)
    link.stop()
    spool.close()
    sub.close()
    spool2 = Spool(str(tmp_path / "spool.db"))
    assert spool2.stats()["messages"] == 0  # all 50 were acknowledged and deleted
    spool2.close()


def test_spool_budget_overflow_drops_by_priority_and_the_count_is_published_on_reconnect(persistent_broker,
                                                                                       tmp_path):
    """Offline with a tiny budget: telemetry goes first, then the oldest results; events stay. The drop count
    is an event on the next connect, and everything kept is delivered."""
    sub = Subscriber(persistent_broker, "fieldnode/v1/dev-a/#", "watcher-budget")
    persistent_broker.stop()
    spool = Spool(str(tmp_path / "spool.db"), commit_interval_s=0.02, max_bytes=20_000)
    spool.start()
    link = Link(persistent_broker.url, "dev-a", spool, backoff=(0.05, 0.5))
    link.start()
    pad = "x" * 150
    events = [link.publish_event("fault", {"n": i}) for i in range(5)]
    for i in range(60):
        link.publish_telemetry({"n": i, "pad": pad})
    results = [link.publish_result("vibration", {"n": i, "pad": pad}) for i in range(150)]
    spool.flush()
    st = spool.stats()
    assert st["bytes"] <= 20_000
    dropped = dict(st["dropped"])
    assert dropped["telemetry"] == 60 and dropped["event"] == 0 and dropped["result"] > 0
    kept = results[dropped["result"]:]  # the oldest results went
    persistent_broker.restart()
    try:
        assert link.wait_connected(30)
        got = sub.wait(lambda g: any(p.get("kind") == "spool_dropped" for _, p, _ in g)
                       and {p.get("id") for _, p, _ in g} >= set(kept) | set(events))
        drop_events = [p for t, p, _ in got if p.get("kind") == "spool_dropped"]
        assert drop_events[0]["dropped"] == dropped
        delivered_results = [p["id"] for t, p, _ in got if "/results/" in t]
        assert list(dict.fromkeys(delivered_results)) == kept  # none of the dropped ones, the rest in order
        assert not [p for t, p, _ in got if t.endswith("/telemetry")]
    finally:
        link.stop()
        spool.close()
        sub.close()


def test_mutual_tls_link(tls_broker, pki, tmp_path, mqtt_client):
    from device.link.url import TlsFiles

    watcher = mqtt_client(tls_broker, "operator")
    watcher.subscribe("fieldnode/v1/dev-a/results/#")
    cert, key = pki.client("dev-a")
    link, spool, _ = make_link(tls_broker, tmp_path, tls=TlsFiles(pki.ca, cert, key))
    link.start()
    try:
        assert link.wait_connected(20)
        rid = link.publish_result("vibration", {"n": 1})
        assert json.loads(watcher.wait_for_messages(1)[0].payload)["id"] == rid
    finally:
        link.stop()
        spool.close()


def test_a_device_cannot_use_another_devices_topics(acl_broker, pki, tmp_path, mqtt_client):
    """dev-a's certificate with dev-b's prefix: the broker refuses every publish (PUBACK 0x87), the link counts
    and drops them instead of retrying forever, and dev-b's topics never see them."""
    from device.link.url import TlsFiles

    watcher = mqtt_client(acl_broker, "operator")
    watcher.subscribe("fieldnode/v1/dev-b/#")
    cert, key = pki.client("dev-a")
    link, spool, _ = make_link(acl_broker, tmp_path, tls=TlsFiles(pki.ca, cert, key), prefix="fieldnode/v1/dev-b")
    link.start()
    try:
        assert link.wait_connected(20)
        for i in range(5):
            link.publish_result("vibration", {"n": i})
        for _ in range(400):
            spool.flush()
            if link.counters["refused"] >= 5 and spool.stats()["messages"] == 0:
                break
            threading.Event().wait(0.05)
        assert link.counters["refused"] >= 5 and spool.stats()["messages"] == 0
        # the real dev-b publishes a marker; once it arrives, anything dev-a got through would have too
        marker = mqtt_client(acl_broker, "dev-b")
        marker.publish("fieldnode/v1/dev-b/results/marker", b'{"marker": true}')
        got = watcher.wait_for_messages(1, topic="fieldnode/v1/dev-b/results/#")
        assert [json.loads(m.payload) for m in got] == [{"marker": True}]
        assert "Denied PUBLISH" in acl_broker.log_text()
    finally:
        link.stop()
        spool.close()


def test_the_journal_says_what_happened_to_the_link(broker, tmp_path, caplog):
    """A broker stop and start: the disconnect is logged once with a reason people can read (never paho's
    "Unspecified error"), the reconnect with the time offline and the messages waiting, and once when that backlog
    has been delivered."""
    import logging

    caplog.set_level(logging.INFO, logger="device.link.client")
    link, spool, _ = make_link(broker, tmp_path)
    link.start()
    try:
        assert link.wait_connected(10)
        link.publish_result("vibration", {"n": -1})
        wait_acked(link, 1)
        broker.stop()
        for _ in range(1000):
            if not link.connected:
                break
            threading.Event().wait(0.01)
        assert not link.connected
        ids = [link.publish_result("vibration", {"n": i}) for i in range(30)]
        spool.flush()
        broker.start()
        assert link.wait_connected(30)
        wait_acked(link, 31)
        for _ in range(1000):  # the backlog line follows the last PUBACK at the network thread's next turn
            if any("backlog" in r.getMessage() for r in caplog.records):
                break
            threading.Event().wait(0.01)
    finally:
        link.stop()
        spool.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "device.link.client"]
    lost = [m for m in lines if m.startswith("link: lost the connection")]
    assert len(lost) == 1, lines
    assert lost[0].startswith(f"link: lost the connection to {broker.url}: ")
    assert "Unspecified error" not in lost[0] and "disconnected: disconnected" not in lost[0]
    reason = lost[0][len(f"link: lost the connection to {broker.url}: "):]
    assert reason in ("the broker closed the connection", "the broker disconnected this client (Server shutting down)") \
        or reason.startswith("network error: "), lost[0]
    connected = [m for m in lines if m.startswith("link: connected to")]
    assert connected[0] == f"link: connected to {broker.url} (first connect), 0 message(s) waiting", connected
    assert len(connected) == 2 and connected[1].startswith(f"link: connected to {broker.url} after ")
    assert " s offline, " in connected[1] and connected[1].endswith(f", {len(ids)} message(s) waiting"), connected
    backlog = [m for m in lines if "backlog" in m]
    assert len(backlog) == 1 and backlog[0].startswith(f"link: the backlog of {len(ids)} message(s) is delivered ("), \
        lines
