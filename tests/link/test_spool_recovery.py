"""The spool's failure paths against real files: corrupt databases of every kind moved aside (with an event and a
usable fresh spool), environmental errors that must NOT count as corruption, and disk errors during a commit
that keep the pending batch. Errors are real where SQLite can produce them (SQLITE_FULL through
max_page_count); pytest-mock injects only the ones it cannot (an I/O error, corruption found mid-write)."""

from __future__ import annotations

import os
import sqlite3

import pytest

from device.link.spool import db as spooldb
from device.link.errors import SpoolCorrupt, SpoolError
from device.link.spool.spool import Spool
from drivers.sim.clock import EPOCH, SimClock

from tests.link.spoolhelp import E, R, T, all_messages  # noqa: F401
from tests.link.spoolhelp import clock, path  # noqa: F401 (fixtures)
from tests.waiting import eventually


def make_real_spool(path: str, n: int = 2000) -> bytes:
    """Writes a real multi-page spool, closes it (the WAL is checkpointed into the file) and returns its bytes."""
    with Spool(path, clock=SimClock()) as s:
        for i in range(n):
            s.put(R, "fieldnode/v1/d/result", b"%06d" % i + b"x" * 94)
    with open(path, "rb") as f:
        return f.read()


# -- corrupt files -----------------------------------------------------------------------------------------


def _open_corrupt(path: str, clock: SimClock) -> tuple[Spool, list]:
    events: list = []
    s = Spool(path, clock=clock, on_event=lambda kind, data: events.append((kind, data)))
    return s, events


def _assert_recovered(s: Spool, events: list, path: str, original: bytes, clock: SimClock,
                      salvaged: int | None = 0) -> None:
    """The event, the copy kept aside, and a working spool holding exactly the salvaged rows.

    ``salvaged`` is the number of rows that must have been saved; None when it depends on the file's layout
    (then only "some, and the event says how many" is checked)."""
    assert len(events) == 1 and events[0][0] == "spool_corrupt"
    moved = events[0][1]["moved_to"]
    assert moved == path + ".corrupt-20260101T000000Z"  # UTC stamp from the spool's clock
    assert events[0][1]["error"]
    with open(moved, "rb") as f:
        assert f.read() == original  # kept for a post-mortem, byte for byte
    kept = [m.id for m in all_messages(s)]
    assert s.stats()["corrupt_recoveries"] == 1 and s.stats()["messages"] == len(kept) == events[0][1]["salvaged"]
    assert len(kept) > 0 if salvaged is None else len(kept) == salvaged
    mid = s.put(E, "e", b"after")
    assert mid >= int(clock.time() * 1e6) and mid > max(kept, default=0)  # ids never go back
    s.flush()
    assert all_messages(s)[-1].payload == b"after"
    s.close()
    with Spool(path, clock=clock) as again:  # the fresh spool is a good one
        assert [m.id for m in all_messages(again)] == kept + [mid] and again.stats()["corrupt_recoveries"] == 0


def test_random_bytes_file_is_moved_aside_and_its_stale_wal_never_replayed(path, clock):
    os.makedirs(os.path.dirname(path))
    original = os.urandom(8192)
    for suffix, data in (("", original), ("-wal", b"stale wal"), ("-shm", b"stale shm")):
        with open(path + suffix, "wb") as f:
            f.write(data)
    s, events = _open_corrupt(path, clock)
    assert "not a database" in events[0][1]["error"]
    for suffix in ("-wal", "-shm"):  # moved aside, or discarded by SQLite as invalid: never the fresh spool's
        if os.path.exists(path + suffix):
            with open(path + suffix, "rb") as f:
                assert not f.read().startswith(b"stale")
    _assert_recovered(s, events, path, original, clock)


def test_truncated_real_spool_is_moved_aside_and_its_head_salvaged(path, clock):
    full = make_real_spool(path)
    with open(path, "r+b") as f:
        f.truncate(len(full) // 2)
    s, events = _open_corrupt(path, clock)
    _assert_recovered(s, events, path, full[: len(full) // 2], clock, salvaged=None)


@pytest.mark.parametrize("offset,length", [(0, 4096), (2048, 2048)], ids=["whole-page", "half-page"])
def test_real_spool_with_a_garbage_page_is_moved_aside(path, clock, offset, length):
    # A whole garbage page makes SQLite raise "malformed"; a half page passes the header checks and is
    # caught by quick_check's report instead: both paths end in the same recovery, which salvages the rest.
    data = bytearray(make_real_spool(path))
    page = 10 * 4096 + offset
    data[page:page + length] = os.urandom(length)
    with open(path, "wb") as f:
        f.write(data)
    s, events = _open_corrupt(path, clock)
    _assert_recovered(s, events, path, bytes(data), clock, salvaged=None)


def test_quick_check_failure_is_reported_in_the_event(path, clock):
    data = bytearray(make_real_spool(path))
    data[36:40] = (7).to_bytes(4, "big")  # header: 7 freelist pages that do not exist
    with open(path, "wb") as f:
        f.write(data)
    s, events = _open_corrupt(path, clock)
    assert "quick_check" in events[0][1]["error"] and "freelist" in events[0][1]["error"].lower()
    assert events[0][1]["lost"] == 0  # every row was readable
    _assert_recovered(s, events, path, bytes(data), clock, salvaged=2000)


@pytest.mark.parametrize("script,why", [
    ("CREATE TABLE photos (id INTEGER PRIMARY KEY, data BLOB);", "not a spool"),
    ("PRAGMA user_version = 99;", "schema version 99"),
])
def test_a_database_that_is_not_our_spool_is_moved_aside(path, clock, script, why):
    os.makedirs(os.path.dirname(path))
    db = sqlite3.connect(path)
    db.executescript(script)
    db.close()
    with open(path, "rb") as f:
        original = f.read()
    s, events = _open_corrupt(path, clock)
    assert why in events[0][1]["error"]
    _assert_recovered(s, events, path, original, clock)


def test_unknown_kind_in_a_row_is_corruption(path, clock):
    make_real_spool(path, n=3)
    db = sqlite3.connect(path)
    db.execute("UPDATE messages SET kind = 9")
    db.commit()
    db.close()
    with open(path, "rb") as f:
        original = f.read()
    s, events = _open_corrupt(path, clock)
    assert "unknown message kind 9" in events[0][1]["error"] and events[0][1]["lost"] == 3
    _assert_recovered(s, events, path, original, clock)


def test_two_recoveries_in_the_same_second_do_not_collide(path, clock):
    os.makedirs(os.path.dirname(path))
    for n in (1, 2):
        with open(path, "wb") as f:
            f.write(b"garbage %d" % n * 100)
        s, events = _open_corrupt(path, clock)
        s.close()
        suffix = "" if n == 1 else ".2"
        assert events[0][1]["moved_to"] == path + ".corrupt-20260101T000000Z" + suffix


def test_a_failing_event_listener_does_not_break_recovery(path, clock):
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(os.urandom(4096))

    def broken(kind, data):
        raise RuntimeError("listener bug")

    with Spool(path, clock=clock, on_event=broken) as s:
        assert s.stats()["corrupt_recoveries"] == 1
        s.put(E, "e", b"ok")


def test_an_unopenable_path_is_an_error_not_corruption(tmp_path, clock):
    path = tmp_path / "spool.db"
    path.mkdir()  # a directory where the file should be: SQLite cannot open it
    with pytest.raises(SpoolError, match=f"cannot open spool {path}"):
        Spool(str(path), clock=clock)
    assert os.listdir(tmp_path) == ["spool.db"]  # nothing moved aside


def test_an_uncreatable_directory_is_a_spool_error(tmp_path, clock):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(SpoolError, match="cannot create the spool directory"):
        Spool(str(blocker / "sub" / "spool.db"), clock=clock)


# -- disk errors ---------------------------------------------------------------------------------------------


def test_disk_full_keeps_the_batch_for_the_next_flush(path, clock):
    with Spool(path, clock=clock) as s:
        first = s.put(E, "e", b"committed")
        s.flush()
        pages = s._file.db.execute("PRAGMA page_count").fetchone()[0]
        s._file.db.execute(f"PRAGMA max_page_count = {pages + 2}")  # a real SQLITE_FULL, no mock
        ids = [s.put(R, "r", os.urandom(4000)) for _ in range(20)]
        s.ack([first])
        with pytest.raises(SpoolError, match="full") as err:
            s.flush()
        assert path in str(err.value) and isinstance(err.value.__cause__, sqlite3.OperationalError)
        assert s.durable_id == first and s.stats()["pending"] == 20
        assert [m.id for m in s.batch(0, 100)] == []  # the ack is kept too (and hides the acked row)
        s._file.db.execute("PRAGMA max_page_count = 1000000")
        assert s.flush() == 20
        assert [m.id for m in all_messages(s)] == ids and s.durable_id == ids[-1]
        assert s.stats()["messages"] == 20 and s.stats()["bytes"] == 80_000


def test_disk_io_error_keeps_the_batch_and_acks(path, clock, mocker):
    with Spool(path, clock=clock) as s:
        old = s.put(E, "e", b"old")
        s.flush()
        s.ack([old])
        ids = [s.put(R, "r", b"%d" % i) for i in range(10)]
        mocker.patch.object(spooldb.Connection, "executemany",
                            side_effect=sqlite3.OperationalError("disk I/O error"))
        for _ in range(2):
            with pytest.raises(SpoolError, match="disk I/O error") as err:
                s.flush()
            assert path in str(err.value) and not isinstance(err.value, SpoolCorrupt)
        assert s.stats()["pending"] == 10 and s.durable_id == old
        mocker.stopall()
        s.flush()
        assert [m.id for m in all_messages(s)] == ids
        assert s.stats()["messages"] == 10 and s.stats()["bytes"] == 10
    assert os.listdir(os.path.dirname(path)) == ["spool.db"]  # an I/O error never moves the file


def test_failing_commits_hold_the_pending_batch_to_the_budget(path, clock, mocker):
    with Spool(path, clock=clock, max_bytes=300) as s:
        mocker.patch.object(spooldb.Connection, "executemany",
                            side_effect=sqlite3.OperationalError("database or disk is full"))
        t = s.put(T, "t", b"x" * 100)
        r = [s.put(R, "r", b"x" * 100) for _ in range(3)]
        e = s.put(E, "e", b"x" * 100)
        with pytest.raises(SpoolError):
            s.flush()
        assert s.stats()["pending_bytes"] == 300
        assert s.stats()["dropped"] == {"telemetry": 1, "result": 1, "event": 0}
        mocker.stopall()
        s.flush()
        assert [m.id for m in all_messages(s)] == r[1:] + [e] and t < r[0]
    with Spool(path, clock=clock) as s:
        assert s.pop_dropped() == {"telemetry": 1, "result": 1, "event": 0}


def test_corruption_found_while_writing_starts_a_fresh_spool_and_keeps_the_batch(path, clock, mocker):
    events: list = []
    with Spool(path, clock=clock, on_event=lambda k, d: events.append((k, d))) as s:
        old = s.put(E, "e", b"old")
        s.flush()
        ids = [s.put(R, "r", b"%d" % i) for i in range(3)]
        mocker.patch.object(spooldb.Connection, "executemany",
                            side_effect=sqlite3.DatabaseError("database disk image is malformed"))
        with pytest.raises(SpoolCorrupt, match="repaired in place") as caught:
            s.flush()
        assert "fresh spool" not in str(caught.value)  # the message says what happened, nothing else
        mocker.stopall()
        assert [k for k, _ in events] == ["spool_corrupt"] and events[0][1]["moved_to"] is None
        assert events[0][1]["salvaged"] == 1 and events[0][1]["lost"] == 0  # the file itself was readable
        assert s.stats()["corrupt_recoveries"] == 1 and s.stats()["pending"] == 3
        s.flush()
        assert [m.id for m in all_messages(s)] == [old] + ids and ids[0] > old
        later = s.put(R, "r", b"later")
    with Spool(path, clock=SimClock(epoch=EPOCH - 60)) as s:  # the floor was written into the fresh file
        assert s.put(R, "r", b"x") == later + 1


def test_commit_thread_survives_errors_and_reports_once(path, mocker):
    events: list = []
    s = Spool(path, commit_interval_s=0.005, on_event=lambda k, d: events.append(k))
    patch = mocker.patch.object(spooldb.Connection, "executemany",
                                side_effect=sqlite3.OperationalError("disk I/O error"))
    s.start()
    mid = s.put(R, "r", b"x")
    eventually(lambda: patch.call_count >= 3, timeout=10.0)
    mocker.stopall()
    eventually(lambda: s.durable_id >= mid, timeout=10.0)
    s.close()
    assert events == ["spool_error"]
