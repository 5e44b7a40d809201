"""The link and the spool sleep until there is work (issue "An agent that sleeps"), against a real mosquitto.

* a row put into the spool is published without any poll: the spool's commit wakes the network thread;
* while nothing new is committed, turns of the network thread (here: births asked for again) read nothing from
  the spool, where a polling link ran a query at every turn;
* the spool's listeners hear of new durable rows, not of commits that only delete;
* the commit thread commits acks alone, and rows past ``max_age_s``, with no put to wake it.

Nothing here measures time: each check waits for a positive event (:func:`tests.waiting.eventually`).
"""

from __future__ import annotations

import json

from device.link.client import Link
from device.link.spool.spool import Kind, Spool
from tests.waiting import eventually

STATE = "fieldnode/v1/dev-a/state"
RESULTS = "fieldnode/v1/dev-a/results/vibration"


class CountingSpool(Spool):
    """A real spool that counts the link's reads."""

    reads = 0

    def batch(self, after_id: int, limit: int):
        self.reads += 1
        return super().batch(after_id, limit)


def _link(broker, spool: Spool) -> Link:
    return Link(broker.url, "dev-a", spool, backoff=(0.05, 0.5), keepalive_s=60)


def test_a_committed_row_wakes_the_link_and_is_published(broker, tmp_path, mqtt_client):
    watcher = mqtt_client(broker)
    watcher.subscribe(RESULTS)
    spool = Spool(str(tmp_path / "spool.db"), commit_interval_s=3600)  # acks alone would wait an hour
    spool.start()
    link = _link(broker, spool)
    link.start()
    try:
        assert link.wait_connected(10)
        first = link.publish_result("vibration", {"n": 1})
        got = watcher.wait_for_messages(1)
        assert json.loads(got[0].payload)["id"] == first
        second = link.publish_result("vibration", {"n": 2})  # the link was asleep again: the commit wakes it
        got = watcher.wait_for_messages(2)
        assert [json.loads(m.payload)["id"] for m in got] == [first, second]
    finally:
        link.stop()
        spool.close()


def test_turns_without_new_rows_do_not_read_the_spool(broker, tmp_path, mqtt_client):
    watcher = mqtt_client(broker)
    watcher.subscribe("fieldnode/v1/dev-a/#")
    spool = CountingSpool(str(tmp_path / "spool.db"), commit_interval_s=0.02)
    spool.start()
    link = _link(broker, spool)
    link.start()
    try:
        assert link.wait_connected(10)
        link.publish_result("vibration", {"n": 1})
        watcher.wait_for_messages(1, topic=RESULTS)
        eventually(lambda: link.counters["acked"] == 1, what="the PUBACK of the one result")
        before = spool.reads
        for n in range(2, 12):  # each birth is a turn of the network thread, seen at the broker
            link.refresh_birth()
            watcher.wait_for_messages(n, topic=STATE)
        assert spool.reads == before, f"{spool.reads - before} spool reads with nothing new committed"
        link.publish_result("vibration", {"n": 2})  # and a new row is read again
        watcher.wait_for_messages(2, topic=RESULTS)
        assert spool.reads > before
    finally:
        link.stop()
        spool.close()


def test_listeners_hear_of_new_rows_not_of_deletes(tmp_path):
    spool = Spool(str(tmp_path / "spool.db"))
    heard: list[int] = []
    spool.on_durable(lambda: heard.append(spool.durable_id))
    try:
        mark = spool.readable_mark
        mid = spool.put(Kind.RESULT, "t/results/x", b"{}")
        spool.flush()
        assert heard == [mid] and spool.readable_mark != mark
        spool.ack([mid])
        spool.flush()  # only deletes
        assert heard == [mid]
        spool.off_durable(heard.append)  # an unknown listener is ignored
    finally:
        spool.close()


def test_the_commit_thread_commits_acks_alone(tmp_path):
    spool = Spool(str(tmp_path / "spool.db"), commit_interval_s=0.05)
    spool.start()
    try:
        mid = spool.put(Kind.RESULT, "t/results/x", b"{}")
        eventually(lambda: spool.durable_id == mid, what="the put committed")
        spool.ack([mid])  # no put follows: the ack's own deadline wakes the thread
        eventually(lambda: spool.stats()["messages"] == 0, what="the acked row deleted",
                   detail=spool.stats)
    finally:
        spool.close()


def test_the_commit_thread_wakes_for_rows_past_their_age(tmp_path):
    spool = Spool(str(tmp_path / "spool.db"), commit_interval_s=3600, max_age_s=0.2)
    spool.start()
    try:
        mid = spool.put(Kind.TELEMETRY, "t/telemetry", b"{}")
        eventually(lambda: spool.durable_id == mid, what="the put committed")
        eventually(lambda: spool.stats()["messages"] == 0, what="the row past max_age_s dropped",
                   detail=spool.stats)
        assert spool.stats()["dropped"]["telemetry"] == 1
    finally:
        spool.close()


def test_rows_committed_while_offline_do_not_cut_the_backoff_short(tmp_path):
    from tests.link.broker import free_port

    spool = Spool(str(tmp_path / "spool.db"), commit_interval_s=0.02)
    spool.start()
    link = Link(f"mqtt://127.0.0.1:{free_port()}", "dev-a", spool, backoff=(3600.0, 3600.0))  # nobody listens
    link.start()
    try:
        eventually(lambda: link.counters["connect_failures"] == 1, what="the first connect refused")
        for n in range(5):  # each commit wakes the network thread: the backoff must go on
            mid = link.publish_result("vibration", {"n": n})
            eventually(lambda: spool.durable_id >= mid, what="the row committed")
    finally:
        link.stop()  # a stop does end the backoff
        spool.close()
    assert link.counters["connect_failures"] == 1
