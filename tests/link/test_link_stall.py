"""The link when acknowledgements stop on a live connection: against a real mosquitto with small queues, repeated
floods of QoS 0 commands used to leave the results' in-flight window full for good (results at 0/s while the link
said connected); results must resume without a manual reconnect. And a broker that stops answering (SIGSTOP) makes
the link report itself unhealthy, reset its session, and deliver everything once the broker is back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from device.link.client import Link
from device.link.commands import Dispatcher, Registry, register_builtin
from device.link.spool.spool import Spool
from tests.link.broker import Broker
from tests.link.conftest import MqttTestClient, run_broker
from tests.waiting import eventually

CMD = "fieldnode/v1/dev-a/cmd/ping"


@pytest.fixture
def small_queue_broker(tmp_path_factory) -> Broker:
    """mosquitto with tiny per-client queues, so a command flood overflows the board's queue quickly."""
    yield from run_broker(tmp_path_factory, "plain", None,
                          extra_config=["max_queued_messages 5", "max_inflight_messages 2"])


def _link(broker: Broker, tmp_path, **kw) -> tuple[Link, Spool]:
    registry = Registry()
    register_builtin(registry, version="test")
    spool = Spool(str(tmp_path / "spool.db"), commit_interval_s=0.02)
    spool.start()
    link = Link(broker.url, "dev-a", spool, backoff=(0.05, 0.5), dispatcher=Dispatcher(registry), **kw)
    link.start()
    assert link.wait_connected(20)
    return link, spool


FLOOD = """
import sys, time
import paho.mqtt.client as mqtt
host, port, topic, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="flooder", protocol=mqtt.MQTTv5)
c.connect(host, port)
c.loop_start()
until = time.monotonic() + seconds
while time.monotonic() < until:
    for _ in range(1000):
        c.publish(topic, b"{}", qos=0)
c.disconnect()
c.loop_stop()
"""


def flood(broker: Broker, seconds: float) -> None:
    """Floods the board's command topic with QoS 0 commands from another process (as an attacker's machine would)
    for ``seconds``."""
    subprocess.run([sys.executable, "-c", FLOOD, broker.host, str(broker.port), CMD, str(seconds)], check=True,
                   timeout=seconds + 60)


class Producer:
    """Puts results into the link as the agent's inference loop does, until stopped."""

    def __init__(self, link: Link, pause_s: float) -> None:
        self.link, self.pause_s, self.ids = link, pause_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.ids.append(self.link.publish_result("vibration", {"label": "normal"}))
            self._stop.wait(self.pause_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_results_resume_after_command_floods_without_a_manual_reconnect(small_queue_broker, tmp_path):
    broker = small_queue_broker
    watcher = MqttTestClient(broker, client_id="watcher")
    watcher.connect()
    watcher.subscribe("fieldnode/v1/dev-a/results/#")
    link, spool = _link(broker, tmp_path, ack_timeout_s=3.0)
    producer = Producer(link, 0.0005)
    log = open(broker.log_path, "rb")  # read as it grows: the whole log is large under a flood
    try:
        # Floods of QoS 0 commands until the broker drops outgoing messages (its per-client queue is full) or the
        # board's acknowledgements stop, and a few more floods after that.
        dropped = stalled = False
        pause = threading.Event()
        for n in range(12):
            flood(broker, 4.0)
            pause.wait(3.0)  # a breather between floods, as an attacker's script takes (load, not synchronisation)
            dropped = dropped or b"Outgoing messages are being dropped" in log.read()
            stalled = stalled or link.counters["ack_timeouts"] > 0
            if (dropped or stalled) and n >= 5:
                break
        assert dropped or stalled, broker.log_tail()

        # After the floods: results flow to the fleet again, well past what one in-flight window holds.
        received = len(watcher.messages())
        eventually(lambda: len(watcher.messages()) >= received + 2000, timeout=90, what=lambda: f"results stopped: {len(watcher.messages()) - received} since the floods, {link.status()}")
        assert link.connected
    finally:
        log.close()
        producer.stop()
        watcher.close()
        link.stop()
        spool.close()


def test_a_broker_that_stops_acknowledging_makes_the_link_unhealthy_until_acks_flow_again(broker, tmp_path):
    """SIGSTOP freezes mosquitto: the connection stays open but nothing is acknowledged. Past ``ack_timeout_s`` the
    link says it is unhealthy and resets its session; once the broker runs again the spool is replayed, every result
    arrives (duplicates dropped by id) and the link is healthy again."""
    watcher = MqttTestClient(broker, client_id="watcher")
    watcher.connect()
    watcher.subscribe("fieldnode/v1/dev-a/results/#")
    link, spool = _link(broker, tmp_path, ack_timeout_s=1.0)
    producer = Producer(link, 0.01)
    frozen = False
    try:
        eventually(lambda: link.counters["acked"] >= 20, timeout=20, what=lambda: str(link.status()))
        assert link.healthy and not link.status()["acks_stalled"]
        os.kill(broker.pid, signal.SIGSTOP)
        frozen = True
        eventually(lambda: not link.healthy, timeout=30, what=lambda: str(link.status()))
        status = link.status()
        assert status["acks_stalled"] and status["healthy"] is False and status["ack_stall_s"] >= 0
        eventually(lambda: link.counters["ack_timeouts"] >= 1 and link.counters["disconnects"] >= 1, timeout=30, what=lambda: str(link.status()))
        os.kill(broker.pid, signal.SIGCONT)
        frozen = False
        eventually(lambda: link.healthy and link.connected, timeout=60, what=lambda: str(link.status()))
        producer.stop()
        ids = list(producer.ids)
        eventually(lambda: {json.loads(m.payload)["id"] for m in watcher.messages()} >= set(ids), timeout=60, what=lambda: f"{len(watcher.messages())} messages for {len(ids)} results")
        spool.flush()
        eventually(lambda: spool.flush() or spool.stats()["messages"] == 0, timeout=30, what=lambda: str(spool.stats()))
        assert link.status()["acks_stalled"] is False
    finally:
        if frozen:
            os.kill(broker.pid, signal.SIGCONT)
        producer.stop()
        watcher.close()
        link.stop()
        spool.close()


def test_ack_timeout_must_be_positive(broker, tmp_path):
    spool = Spool(str(tmp_path / "spool.db"))
    try:
        for bad in (0, -1.0):
            with pytest.raises(ValueError, match="ack_timeout_s"):
                Link(broker.url, "dev-a", spool, ack_timeout_s=bad)
    finally:
        spool.close()
