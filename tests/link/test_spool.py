"""The durable spool against real SQLite files: ordering, ids across restarts, group commit, budget, age,
malformed input, and a writer process killed with SIGKILL in the middle of its commits.
Corrupt files and disk errors are in test_spool_recovery.py."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading

import pytest

from device.link.errors import SpoolError
from device.link.spool.spool import Kind, Message, Spool
from drivers.sim.clock import EPOCH, SimClock

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spool_writer.py")
from tests.link.spoolhelp import E, R, T, all_messages  # noqa: F401
from tests.link.spoolhelp import clock, path  # noqa: F401 (fixtures)
from tests.waiting import eventually
ZERO = {"telemetry": 0, "result": 0, "event": 0}


# -- basic flow ----------------------------------------------------------------------------------------


def test_put_flush_batch_ack_flush_deletes(path, clock):
    with Spool(path, clock=clock) as s:
        ids = [s.put(R, "fieldnode/v1/d/result", b"r%d" % i) for i in range(5)]
        assert s.batch(0, 10) == []  # nothing committed yet: nothing may be published
        assert s.flush() == 5
        msgs = s.batch(0, 10)
        assert [m.id for m in msgs] == ids
        assert msgs[0] == Message(ids[0], R, "fieldnode/v1/d/result", b"r0", 1, False, EPOCH)
        assert [m.id for m in s.batch(ids[1], 2)] == ids[2:4]
        s.ack(ids[:3] + [12345, ids[0]])  # unknown and repeated ids are harmless
        assert [m.id for m in s.batch(0, 10)] == ids[3:]  # acked but not yet deleted: not handed out again
        s.flush()
        assert s.stats()["messages"] == 2
    with Spool(path, clock=clock) as s:
        assert [m.payload for m in all_messages(s)] == [b"r3", b"r4"]


def test_group_commit_writes_many_puts_in_one_transaction(path, clock):
    with Spool(path, clock=clock) as s:
        ids = [s.put(T, "t/x", b"%d" % i, qos=0, retain=True) for i in range(1000)]
        assert s.stats()["commits"] == 0 and s.stats()["pending"] == 1000
        assert s.flush() == 1000
        st = s.stats()
        assert st["commits"] == 1 and st["pending"] == 0
        assert s.durable_id == ids[-1] == st["durable_id"]
        assert s.flush() == 0 and s.stats()["commits"] == 1  # nothing to do: no empty transaction
        msgs = all_messages(s)
        assert [m.id for m in msgs] == ids and all(m.qos == 0 and m.retain for m in msgs)


def test_ids_strictly_increase_across_reopen_when_the_clock_goes_backwards(path):
    with Spool(path, clock=SimClock()) as s:
        first = [s.put(R, "r", b"a") for _ in range(3)]
    assert first == [int(EPOCH * 1e6) + i for i in range(3)]  # the clock floor, then +1 at the same instant
    behind = SimClock(epoch=EPOCH - 3600)  # a board without RTC boots an hour in the past
    with Spool(path, clock=behind) as s:
        assert s.durable_id == first[-1]
        second = [s.put(R, "r", b"b") for _ in range(3)]
        s.flush()
        s.ack(first + second)  # every row deleted: only the meta table still knows the last id
    assert second == [first[-1] + 1 + i for i in range(3)]
    with Spool(path, clock=SimClock(epoch=EPOCH - 7200)) as s:
        assert all_messages(s) == []
        third = s.put(E, "e", b"c")
    assert third == second[-1] + 1
    with Spool(path, clock=SimClock(epoch=EPOCH + 10)) as s:  # a clock ahead of the floor wins
        assert s.put(E, "e", b"d") == int((EPOCH + 10) * 1e6)
    with Spool(path) as s:
        assert [m.id for m in all_messages(s)] == [third, int((EPOCH + 10) * 1e6)]


def test_last_id_recovered_from_rows_when_meta_is_behind(path, clock):
    with Spool(path, clock=clock) as s:
        ids = [s.put(R, "r", b"x") for _ in range(3)]
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = 1 WHERE key = 'last_id'")
    db.commit()
    db.close()
    with Spool(path, clock=clock) as s:
        assert s.durable_id == ids[-1]
        assert s.put(R, "r", b"y") == ids[-1] + 1


def test_background_thread_commits_and_close_flushes_the_rest(path):
    s = Spool(path, commit_interval_s=0.01)
    s.start()
    s.start()  # idempotent
    first = s.put(E, "e", b"1")
    eventually(lambda: s.durable_id >= first, timeout=10.0)
    assert s.stats()["commits"] >= 1 and isinstance(s.stats()["last_commit_ms"], float)
    last = [s.put(R, "r", b"%d" % i) for i in range(100)][-1]
    s.close()
    s.close()  # idempotent
    with Spool(path) as s2:
        msgs = all_messages(s2)
        assert msgs[0].id == first and msgs[-1].id == last and len(msgs) == 101


def test_concurrent_producers_keep_unique_ordered_ids(path):
    s = Spool(path, commit_interval_s=0.005)
    s.start()
    got: dict[int, list[int]] = {}

    def produce(t: int) -> None:
        got[t] = [s.put(R, f"r/{t}", b"%d" % i) for i in range(500)]

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    s.close()
    with Spool(path) as s2:
        msgs = all_messages(s2)
    assert len(msgs) == 2000 and len({m.id for m in msgs}) == 2000
    for t in range(4):
        mine = [m for m in msgs if m.topic == f"r/{t}"]
        assert [m.id for m in mine] == got[t]  # each producer's messages in its own order
        assert [int(m.payload) for m in mine] == list(range(500))


def test_stats_snapshot(path, clock):
    with Spool(path, clock=clock, max_bytes=10_000) as s:
        assert s.stats()["oldest_age_s"] == 0.0
        s.put(T, "t", b"12345")
        s.put(E, "e", b"123")
        s.flush()
        s.put(R, "r", b"1")
        clock.advance(30)
        st = s.stats()
    assert st["messages"] == 2 and st["bytes"] == 8 and st["oldest_age_s"] == 30.0
    assert st["by_kind"] == {"telemetry": 1, "result": 0, "event": 1}
    assert st["bytes_by_kind"] == {"telemetry": 5, "result": 0, "event": 3}
    assert st["pending"] == 1 and st["pending_bytes"] == 1 and st["dropped"] == ZERO
    assert st["corrupt_recoveries"] == 0 and st["path"] == path and st["commits"] == 1


# -- budget and age --------------------------------------------------------------------------------------


def test_budget_drops_telemetry_then_oldest_results_events_last(path, clock):
    p = b"x" * 100
    with Spool(path, clock=clock, max_bytes=1000) as s:
        ids = {}
        for i in range(5):
            for k in (T, R, E):
                ids[(k, i)] = s.put(k, "a/b", p)
        s.flush()
        assert s.stats()["dropped"] == {"telemetry": 5, "result": 0, "event": 0}
        assert s.stats()["bytes"] == 1000
        for i in (5, 6):
            ids[(E, i)] = s.put(E, "a/b", p)
        s.flush()
        assert [m.id for m in all_messages(s) if m.kind == R] == [ids[(R, i)] for i in (2, 3, 4)]
        ids[(T, 5)] = s.put(T, "a/b", p)
        for i in (7, 8, 9):
            ids[(E, i)] = s.put(E, "a/b", p)
        s.flush()
        assert s.stats()["dropped"] == {"telemetry": 6, "result": 5, "event": 0}
        for i in (10, 11):
            ids[(E, i)] = s.put(E, "a/b", p)
        s.flush()
        assert [m.id for m in all_messages(s)] == [ids[(E, i)] for i in range(2, 12)]
        assert s.stats()["dropped"] == {"telemetry": 6, "result": 5, "event": 2}
        assert s.stats()["bytes"] == 1000 and s.stats()["by_kind"] == {"telemetry": 0, "result": 0, "event": 10}
    with Spool(path, clock=clock, max_bytes=1000) as s:  # the counters survive a restart
        assert s.stats()["dropped"] == {"telemetry": 6, "result": 5, "event": 2}
        assert s.pop_dropped() == {"telemetry": 6, "result": 5, "event": 2}


def test_budget_drops_just_enough_with_uneven_sizes(path, clock):
    with Spool(path, clock=clock, max_bytes=100) as s:
        small = s.put(T, "t", b"a" * 10)
        s.put(T, "t", b"b" * 50)
        kept_t = s.put(T, "t", b"c" * 30)
        r = s.put(R, "r", b"d" * 40)
        s.flush()  # 130 bytes: dropping the first two telemetry messages (60) is enough
        assert [m.id for m in all_messages(s)] == [kept_t, r]
        assert s.stats()["dropped"]["telemetry"] == 2 and small < kept_t


def test_lowered_budget_is_enforced_at_the_first_flush_after_reopen(path, clock):
    with Spool(path, clock=clock) as s:
        ids = [s.put(R, "r", b"x" * 100) for _ in range(10)]
    with Spool(path, clock=clock, max_bytes=300) as s:
        assert s.flush() == 0  # nothing pending, but the budget is due
        assert [m.id for m in all_messages(s)] == ids[-3:]
        assert s.stats()["dropped"] == {"telemetry": 0, "result": 7, "event": 0}


def test_put_rejects_a_payload_larger_than_the_budget(path, clock):
    with Spool(path, clock=clock, max_bytes=10) as s:
        with pytest.raises(ValueError, match="payload .* exceeds"):
            s.put(E, "e", b"x" * 11)
        assert s.put(E, "e", b"x" * 10) > 0


def test_age_expiry_drops_any_kind_and_runs_when_idle(path, clock):
    with Spool(path, clock=clock, max_age_s=100) as s:
        s.put(E, "e", b"old event")
        s.put(R, "r", b"old result")
        s.flush()
        clock.advance(60)
        t = s.put(T, "t", b"young")
        s.flush()
        clock.advance(50)  # the first two are now 110 s old
        e = s.put(E, "e", b"new")
        s.flush()
        assert [m.id for m in all_messages(s)] == [t, e]
        assert s.stats()["dropped"] == {"telemetry": 0, "result": 1, "event": 1}
        clock.advance(101)
        commits = s.stats()["commits"]
        s.flush()  # nothing pending: expiry alone is worth a commit
        assert all_messages(s) == [] and s.stats()["commits"] == commits + 1
        assert s.stats()["dropped"] == {"telemetry": 1, "result": 1, "event": 2}
    with Spool(path, clock=clock) as s:
        assert s.stats()["dropped"] == {"telemetry": 1, "result": 1, "event": 2}


def test_pop_dropped_resets_durably_at_the_next_commit(path, clock):
    with Spool(path, clock=clock, max_bytes=5) as s:
        s.put(T, "t", b"12345")
        s.put(T, "t", b"12345")
        s.flush()
        assert s.pop_dropped() == {"telemetry": 1, "result": 0, "event": 0}
        assert s.pop_dropped() == ZERO
        assert s.stats()["dropped"] == ZERO
        s.flush()  # the reset alone is worth a commit
    with Spool(path, clock=clock) as s:
        assert s.pop_dropped() == ZERO


# -- malformed input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    ({"kind": 1}, "kind"),
    ({"kind": None}, "kind"),
    ({"topic": ""}, "topic"),
    ({"topic": None}, "topic"),
    ({"topic": b"a/b"}, "topic"),
    ({"topic": "a/+/b"}, "topic"),
    ({"topic": "a/#"}, "topic"),
    ({"topic": "a\x00b"}, "topic"),
    ({"topic": "a" * 65536}, "topic"),
    ({"topic": "a/\udc80"}, "topic"),
    ({"payload": "text"}, "payload"),
    ({"payload": bytearray(b"x")}, "payload"),
    ({"payload": None}, "payload"),
    ({"qos": 3}, "qos"),
    ({"qos": -1}, "qos"),
    ({"qos": True}, "qos"),
    ({"qos": "1"}, "qos"),
    ({"retain": 1}, "retain"),
])
def test_put_rejects_malformed_fields(path, clock, kwargs, field):
    args = {"kind": R, "topic": "a/b", "payload": b"x", "qos": 1, "retain": False, **kwargs}
    with Spool(path, clock=clock) as s:
        with pytest.raises(ValueError, match=field):
            s.put(**args)
        assert s.stats()["pending"] == 0


@pytest.mark.parametrize("kwargs,field", [
    ({"commit_interval_s": 0}, "commit_interval_s"),
    ({"commit_interval_s": "fast"}, "commit_interval_s"),
    ({"max_bytes": 0}, "max_bytes"),
    ({"max_bytes": 1.5}, "max_bytes"),
    ({"max_bytes": True}, "max_bytes"),
    ({"max_age_s": -1}, "max_age_s"),
])
def test_constructor_rejects_bad_parameters(path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        Spool(path, **kwargs)
    assert not os.path.exists(path)


@pytest.mark.parametrize("bad", ["", None, 3])
def test_constructor_rejects_a_bad_path(bad):
    with pytest.raises(ValueError, match="path"):
        Spool(bad)


@pytest.mark.parametrize("after_id,limit,field", [
    ("0", 10, "after_id"), (0, -1, "limit"), (0, 2.0, "limit"), (None, 1, "after_id"), (0, True, "limit"),
])
def test_batch_rejects_bad_arguments(path, clock, after_id, limit, field):
    with Spool(path, clock=clock) as s:
        with pytest.raises(ValueError, match=field):
            s.batch(after_id, limit)
        s.put(R, "r", b"x")
        s.flush()
        assert s.batch(0, 0) == []


@pytest.mark.parametrize("ids", [["1"], [1.0], [None], [True]])
def test_ack_rejects_non_int_ids(path, clock, ids):
    with Spool(path, clock=clock) as s:
        mid = s.put(R, "r", b"x")
        s.flush()
        with pytest.raises(ValueError, match="ack ids"):
            s.ack([mid] + ids)
        s.flush()
        assert [m.id for m in all_messages(s)] == [mid]  # a rejected call acks nothing


def test_a_closed_spool_refuses_work(path, clock):
    s = Spool(path, clock=clock)
    s.close()
    for call in (lambda: s.put(R, "r", b"x"), s.flush, lambda: s.batch(0, 1), s.start):
        with pytest.raises(SpoolError, match="closed"):
            call()


# -- crash ---------------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigkill_mid_commit_loses_nothing_that_was_reported_durable(tmp_path):
    path = str(tmp_path / "spool.db")
    prev_max = 0
    for run in range(3):  # the same file each time: later runs open a file a kill left with its WAL
        proc = subprocess.Popen([sys.executable, WRITER, path, "100000000"], stdout=subprocess.PIPE, text=True)
        reported = []
        try:
            for line in proc.stdout:
                if line.startswith("durable "):
                    reported.append(int(line.split()[1]))
                    if len(reported) >= 4:
                        break
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        assert len(reported) >= 4, f"run {run}: the writer reported {reported}"
        with Spool(path) as s:
            msgs = all_messages(s)
            ids = [m.id for m in msgs]
            assert ids == sorted(set(ids)) and ids[0] > prev_max  # ordered, no duplicates, above every old id
            # Every batch the writer saw committed is there, and nothing is missing in between.
            assert [int(m.payload) for m in msgs] == list(range(len(msgs)))
            assert reported[-1] in ids
            s.ack(ids)  # the next run starts from an empty spool (and the delete goes through a reopen too)
        prev_max = ids[-1]


def test_writer_that_finishes_closes_with_everything_durable(tmp_path):
    path = str(tmp_path / "spool.db")
    out = subprocess.run([sys.executable, WRITER, path, "50"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    last = out.stdout.splitlines()[-1]
    with Spool(path) as s:
        msgs = all_messages(s)
    assert [int(m.payload) for m in msgs] == list(range(50)) and last == f"done {msgs[-1].id}"


def test_a_put_wakes_the_commit_thread_at_once(tmp_path):
    """Group commit starts on the first put, not at the next interval (here an hour away); acks alone wait."""
    s = Spool(str(tmp_path / "eager.db"), commit_interval_s=3600)
    s.start()
    try:
        mid = s.put(Kind.RESULT, "fieldnode/v1/x/results/m", b"r")
        for _ in range(3000):
            if s.durable_id >= mid:
                break
            threading.Event().wait(0.01)
        assert s.durable_id >= mid
        commits = s.stats()["commits"]
        s.ack([mid])
        threading.Event().wait(0.2)
        assert s.stats()["commits"] == commits and s.stats()["messages"] == 1  # the delete waits for a put or the interval
    finally:
        s.close()


def test_a_message_published_and_acked_costs_the_commit_thread_two_wakeups(tmp_path):
    """The link reads each commit as it is told of it and acks it: the commit thread wakes for the put, then once
    to delete the ack, an interval after the commit. The ack that arrives meanwhile does not wake it."""
    s = Spool(str(tmp_path / "wake.db"), commit_interval_s=0.5)
    told, acked, stop = threading.Event(), threading.Event(), threading.Event()

    def link() -> None:  # the link's network thread: read what became durable and ack it (as PUBACKs would)
        cursor = 0
        while not stop.is_set():
            if told.wait(0.05):
                told.clear()
                got = s.batch(cursor, 100)
                if got:
                    cursor = got[-1].id
                    s.ack([m.id for m in got])
                    acked.set()

    s.on_durable(told.set)
    reader = threading.Thread(target=link, name="test-link", daemon=True)
    reader.start()
    s.start()
    n = 6
    try:
        for i in range(n):
            acked.clear()
            s.put(Kind.RESULT, "fieldnode/v1/x/results/m", b"r%d" % i)
            assert acked.wait(30), f"message {i} was not read"
            eventually(lambda: s.stats()["messages"] == 0, what=f"the delete of message {i}")
        wakeups = s.wakeups
        assert s.stats()["commits"] == 2 * n  # each put committed at once, each ack deleted in a commit of its own
    finally:
        stop.set()
        reader.join()
        s.close()
    # The first message finds the link not yet acking: its ack wakes the thread to set the delete's deadline. One
    # more is slack for a wait that ends a hair before its deadline; three a message (each ack woke it) is too many.
    assert wakeups <= 2 * n + 2, f"{wakeups} wake-ups for {n} messages"
