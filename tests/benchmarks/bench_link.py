"""Link throughput: results per second through the whole path against raw paho, same broker, same run.

One JSON line (issue "MQTT link"):

* ``rate`` – results per second through the agent's path: ``Link.publish_result`` (a spool put), group
  commit to SQLite (WAL, synchronous=FULL), publish at QoS 1 with the in-flight window, PUBACK, delete at
  the next commit; timed from the first put until the spool is empty.
* ``raw_rate`` – a bare paho QoS 1 publish loop of the same payloads, same window, same loopback mosquitto.
* ``ratio``: the median over five alternating pairs of ``rate / raw_rate`` (target >= 0.6 on the 2-core
  build machine); ``rate`` and ``raw_rate`` are the medians of their trials.
* ``replay_rate`` – results per second drained after an outage (the broker stopped while the results were
  spooled, then restarted), from the reconnect until the spool is empty.
* ``spool_rss_mb`` – how much a fresh process's RSS grows to open a spool and commit an outage's backlog
  of ``N`` results into it (SQLite and its page cache included).

A run that goes wrong (no mosquitto, raw paho or the link not finishing, the spool not draining, the link not
reconnecting after the outage) prints an ``error`` line and exits 1. Run with ``make bench``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import paho.mqtt.client as mqtt  # noqa: E402

from device.link.client import Link  # noqa: E402
from device.link.spool.spool import Spool  # noqa: E402
from tests.link.broker import Broker, BrokerError  # noqa: E402

N = 20000
WINDOW = 64
PAIRS = 5
RESULT = {"model": "vibration", "variant": "full", "label": "bearing_fault", "score": 0.98731,
          "scores": {"normal": 0.00412, "imbalance": 0.00311, "bearing_fault": 0.98731, "loose_mount": 0.00546},
          "latency_ms": 0.412}


def raw_paho(broker: Broker, payloads: list[bytes]) -> float:
    done = threading.Event()
    acked = [0]

    def on_publish(c, u, mid, rc, props):
        acked[0] += 1
        if acked[0] == len(payloads):
            done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-raw", protocol=mqtt.MQTTv5)
    c.on_publish = on_publish
    c.max_inflight_messages_set(WINDOW)
    c.max_queued_messages_set(0)
    c.connect(broker.host, broker.port)
    c.loop_start()
    t0 = time.perf_counter()
    for p in payloads:
        c.publish("fieldnode/v1/bench-raw/results/vibration", p, qos=1)
    assert done.wait(300), "raw paho did not finish"
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    return len(payloads) / dt


def drained(spool: Spool, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = spool.stats()
        if st["messages"] == 0 and st["pending"] == 0:
            return
        time.sleep(0.002)
    raise AssertionError("the spool did not drain")


def through_link(broker: Broker, tmp: str, n: int) -> float:
    spool = Spool(os.path.join(tmp, f"spool-{time.monotonic_ns()}.db"))
    spool.start()
    link = Link(broker.url, "bench-dev", spool, inflight=WINDOW, backoff=(0.05, 0.5))
    link.start()
    assert link.wait_connected(30)
    t0 = time.perf_counter()
    for i in range(n):
        link.publish_result("vibration", dict(RESULT, n=i))
    drained(spool)
    dt = time.perf_counter() - t0
    link.stop()
    spool.close()
    return n / dt


_RSS_PROBE = """
import json, os, sys
sys.path.insert(0, sys.argv[3])
from device.link.spool.spool import Kind, Spool
def rss():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('VmRSS:')) / 1024.0
payload = bytes(int(sys.argv[2]))
before = rss()
s = Spool(sys.argv[1])
for i in range(int(sys.argv[4])):
    s.put(Kind.RESULT, 'fieldnode/v1/x/results/vibration', payload)
s.flush()
batch = s.batch(0, 64)
print(json.dumps({'grown_mb': rss() - before}))
s.close()
"""


def spool_rss(tmp: str, n: int, payload_bytes: int) -> float:
    """RSS growth of a fresh process that opens a spool and commits ``n`` results into it."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, os.path.join(tmp, f"rss-{time.monotonic_ns()}.db"),
                          str(payload_bytes), os.path.dirname(os.path.dirname(HERE)), str(n)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["grown_mb"]


def replay(broker: Broker, tmp: str, n: int) -> float:
    broker.stop()
    spool = Spool(os.path.join(tmp, f"replay-{time.monotonic_ns()}.db"))
    spool.start()
    link = Link(broker.url, "bench-dev", spool, inflight=WINDOW, backoff=(0.05, 0.2))
    link.start()
    for i in range(n):
        link.publish_result("vibration", dict(RESULT, n=i))
    spool.flush()
    broker.restart()
    assert link.wait_connected(60)
    t0 = time.perf_counter()
    drained(spool)
    dt = time.perf_counter() - t0
    link.stop()
    spool.close()
    return n / dt


def main() -> int:
    import logging

    logging.basicConfig(level=logging.ERROR)  # the outage's "cannot connect" warnings are expected here
    try:
        line = measure()
    except (AssertionError, BrokerError) as e:
        print(json.dumps({"bench": "link", "error": f"{type(e).__name__}: {e}"[:500]}))
        return 1
    print(json.dumps(line))
    return 0


def measure() -> dict:
    """The figures (see the module docstring).

    Raises:
        AssertionError: A run did not finish (see the message).
        BrokerError: mosquitto is missing or did not start.
    """
    payloads = [json.dumps({"id": 1767225600000000 + i, **RESULT, "n": i}, separators=(",", ":")).encode()
                for i in range(N)]
    with tempfile.TemporaryDirectory(prefix="fieldnode-bench-link-") as tmp:
        broker = Broker(os.path.join(tmp, "broker"), "plain",
                        extra_config=("max_queued_messages 0", "max_inflight_messages 0")).start()
        try:
            raws, links, replays, rss = [], [], [], []
            for _ in range(PAIRS):  # alternate, so drift in the VM hits both alike; one ratio per pair
                raws.append(raw_paho(broker, payloads))
                links.append(through_link(broker, tmp, N))
            for _ in range(3):
                replays.append(replay(broker, tmp, N))
                rss.append(spool_rss(tmp, N, len(payloads[0])))
        finally:
            broker.stop()
    raw, rate = statistics.median(raws), statistics.median(links)
    ratios = sorted(x / y for x, y in zip(links, raws))
    ratio = statistics.median(ratios)
    return {
        "bench": "link", "results": N, "payload_bytes": len(payloads[0]), "inflight": WINDOW,
        "rate": round(rate), "raw_rate": round(raw), "ratio": round(ratio, 3),
        "ratio_pairs": [round(x, 3) for x in ratios],
        "rate_trials": [round(x) for x in links], "raw_rate_trials": [round(x) for x in raws],
        "replay_rate": round(statistics.median(replays)), "replay_trials": [round(x) for x in replays],
        "spool_rss_mb": round(statistics.median(rss), 1), "target_ratio": ">= 0.6",
        "figures": ["rate", "raw_rate", "replay_rate", "spool_rss_mb"],
        "met": ratio >= 0.6,
    }


if __name__ == "__main__":
    sys.exit(main())
