"""The spool on a nearly full disk: a real 2 MB tmpfs, filled by the spool itself or by a ballast file.

Mounting needs root (CI runs the tests as root). A test that cannot mount fails with the reason: it never
skips, because a spool that only works on a roomy disk is the defect these tests exist to catch."""

from __future__ import annotations

import errno
import os

import pytest

from device.link.errors import SpoolError
from device.link.spool.spool import Spool
from drivers.sim.clock import SimClock

from tests.link.spoolhelp import E, R, T, all_messages  # noqa: F401
from tests.waiting import eventually

FS_BYTES = 2 * 1024 * 1024


@pytest.fixture
def small_fs(tmpfs):
    """A fresh tmpfs of FS_BYTES (the shared ``tmpfs`` fixture: root, never skipped)."""
    return tmpfs(FS_BYTES)


def fill(directory: str) -> str:
    """Writes a ballast file until the filesystem refuses more; returns its path."""
    ballast = os.path.join(directory, "ballast")
    chunk = b"\0" * 4096
    with open(ballast, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return ballast


def free_bytes(directory: str) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def wal_size(path: str) -> int:
    try:
        return os.path.getsize(path + "-wal")
    except FileNotFoundError:
        return 0


def test_a_spool_that_publishes_steadily_never_fills_a_small_disk_with_its_wal(small_fs):
    # Broker up: every message is acked soon after it is committed, so the spool stays small. Before the
    # fix the WAL grew towards its 4 MB auto-checkpoint on this 2 MB disk and every commit failed for good.
    path = os.path.join(small_fs, "spool", "spool.db")
    clock = SimClock()
    biggest_wal = 0
    with Spool(path, clock=clock) as s:
        for round_ in range(150):  # 150 x 40 x 500 B: 3 MB written in all, 1.5 times the disk
            ids = [s.put(R, "fieldnode/v1/d/results/vibration", os.urandom(500)) for _ in range(40)]
            assert s.flush() == 40, f"round {round_}"
            assert [m.id for m in s.batch(ids[0] - 1, 100)] == ids
            s.ack(ids)
            s.flush()
            biggest_wal = max(biggest_wal, wal_size(path))
        assert s.stats()["messages"] == 0
    assert biggest_wal <= FS_BYTES // 4, biggest_wal


def test_results_made_while_the_disk_is_full_are_committed_once_space_returns(small_fs):
    path = os.path.join(small_fs, "spool", "spool.db")
    events: list = []
    s = Spool(path, commit_interval_s=0.01, on_event=lambda kind, data: events.append((kind, data)))
    s.start()
    try:
        before = [s.put(R, "r", os.urandom(300)) for _ in range(200)]
        eventually(lambda: s.durable_id >= before[-1], timeout=10.0)
        ballast = fill(small_fs)
        during = [s.put(R, "r", os.urandom(300)) for _ in range(300)]  # the broker is down: nothing is acked
        eventually(lambda: any(k == "spool_error" for k, _ in events), timeout=10.0)
        assert s.durable_id < during[-1]  # not on disk yet: they wait in memory
        os.unlink(ballast)
        eventually(lambda: s.durable_id >= during[-1], timeout=10.0)  # by itself, nobody calls flush
        assert [m.id for m in all_messages(s)] == before + during  # nothing lost, order kept
        assert [k for k, _ in events] == ["spool_error"]  # reported once
        # The broker is back: everything is acknowledged and results keep coming. The deletes and the new rows
        # must not let the WAL refill the disk (before the fix it did, and the spool stalled for good).
        s.ack(before + during)
        for _ in range(100):  # 100 x 40 x 500 B: 2 MB more, the size of the whole disk
            ids = [s.put(R, "r", os.urandom(500)) for _ in range(40)]
            eventually(lambda: s.durable_id >= ids[-1], timeout=10.0)
            s.ack(ids)
            assert wal_size(path) <= FS_BYTES // 4
        assert [k for k, _ in events] == ["spool_error"]
    finally:
        s.close()


def test_the_spool_keeps_a_floor_of_free_space_refusing_telemetry_first(small_fs):
    path = os.path.join(small_fs, "spool", "spool.db")
    floor = 1024 * 1024
    with Spool(path, clock=SimClock(), min_free_bytes=floor) as s:
        results, refusals = [], []
        for i in range(300):  # 300 x 5 KB = 1.5 MB: more than the disk holds above its floor
            if i % 2:
                s.put(T, "m", os.urandom(5000))
            else:
                results.append(s.put(R, "m", os.urandom(5000)))
            try:
                s.flush()
            except SpoolError as e:
                refusals.append(str(e))
            assert free_bytes(small_fs) >= floor - 64 * 1024  # the floor holds (within one commit's pages)
        assert refusals and "nearly full" in refusals[0] and "wait in memory" in refusals[0]
        held = s.stats()["pending"]
        assert held > 0 and s.stats()["dropped"] == {"telemetry": s.stats()["dropped"]["telemetry"], "result": 0,
                                                     "event": 0}
        assert s.stats()["dropped"]["telemetry"] > 0  # telemetry is refused; results wait in memory
        # The broker acknowledges what was committed: the freed pages make room and the rest commits.
        s.ack([m.id for m in all_messages(s)])
        assert s.flush() == held and s.stats()["pending"] == 0
        s.ack([m.id for m in all_messages(s)])
        s.flush()
        assert s.stats()["messages"] == 0
    assert wal_size(path) <= FS_BYTES // 4


def test_the_budget_counts_the_index_and_wal_pages_not_only_payload(tmp_path):
    # Small results (100 B payloads, a realistic topic): rows and the two indexes cost about as much again as
    # the payload. Counting payload alone, a 1 MiB budget grew the file past 2 MiB.
    path = str(tmp_path / "spool.db")
    budget = 1024 * 1024
    with Spool(path, clock=SimClock(), max_bytes=budget) as s:
        for _ in range(300):  # 300 x 100 x 100 B: 3 MB of payload offered, the broker down
            for _ in range(100):
                s.put(R, "fieldnode/v1/d/results/vibration", os.urandom(100))
            s.flush()
        assert s.stats()["dropped"]["result"] > 0
        on_disk = os.path.getsize(path) + wal_size(path)
    # Beyond the budget: an empty spool's fixed pages, its 16-page WAL and one commit group's pages.
    assert on_disk <= budget + 256 * 1024, on_disk
