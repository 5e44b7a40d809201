"""Where and how a corrupt spool is recovered: on the commit thread (never the publisher's), streaming (a chunk of
rows in memory, not the spool), without counting rows as lost when there is no space to copy them, and picking
up what a crash left between the two renames of a salvage. Real SQLite files damaged on disk."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import tracemalloc

from device.link.spool import open as spoolopen, disk as spooldisk
from device.link.spool.spool import Spool

from tests.link.spoolhelp import E, R, all_messages  # noqa: F401
from tests.link.spoolhelp import clock, path  # noqa: F401 (fixtures)
from tests.link.test_spool_salvage import TOPIC, open_recording, root_page, smash, table_leaves, write_spool
from tests.waiting import eventually


def _smash_a_table_leaf(path: str, nth: int = 3) -> set[int]:
    """Smashes the ``nth`` table leaf in id order (index pages intact): a copy is needed. Returns its ids."""
    messages_root = root_page(path, "messages")
    leaves = {no: ids for no, ids in table_leaves(path).items() if ids and ids[0] > 1000 and no != messages_root}
    order = sorted(leaves, key=lambda no: leaves[no][0])
    smash(path, order[nth])
    return set(leaves[order[nth]])


def test_batch_on_the_network_thread_never_runs_the_recovery(path, clock, mocker):
    written = write_spool(path, clock, 3000, size=1500)  # larger than SQLite's page cache: reads go to disk
    threads: list[str] = []
    real = spoolopen.recover

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    mocker.patch.object(spoolopen, "recover", side_effect=recording)
    s, events = open_recording(path, clock)
    lost = _smash_a_table_leaf(path)  # damaged under the open spool, as bit rot would
    s.start()
    try:
        assert s.batch(0, 1_000_000) == []  # the corruption is found, the recovery left to the commit thread
        assert threads in ([], ["spool"])  # never this thread, whatever the commit thread has done yet
        eventually(lambda: events, timeout=10.0)
        assert threads == ["spool"] and events[0][0] == "spool_corrupt"
        eventually(lambda: s.batch(0, 1) != [], timeout=10.0)
        assert [m.id for m in all_messages(s)] == [w[0] for w in written if w[0] not in lost]
        assert events[0][1]["lost"] == len(lost)
    finally:
        s.close()


def test_a_salvage_streams_rows_instead_of_holding_the_spool_in_memory(path, clock):
    written = write_spool(path, clock, 400, size=20_000)  # 8 MB of payload
    db = sqlite3.connect(path)
    db.execute("UPDATE messages SET kind = 9 WHERE id = ?", (written[5][0],))  # a damaged row: a copy is needed
    db.commit()
    db.close()
    tracemalloc.start()
    try:
        s, events = open_recording(path, clock)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    with s:
        assert peak < 3_000_000, peak  # a chunk of rows (about 1 MB), not the 8 MB spool
        assert events[0][1]["how"] == spoolopen.COPIED and events[0][1]["salvaged"] == 399
        assert [m.id for m in all_messages(s)] == [w[0] for i, w in enumerate(written) if i != 5]


def test_no_space_to_salvage_keeps_the_rows_and_merges_them_when_room_returns(path, clock):
    written = write_spool(path, clock, 1500, size=100)
    lost = _smash_a_table_leaf(path)
    # A floor of free space above what the filesystem has: no copy fits without eating into it.
    floor = 2 * shutil.disk_usage(os.path.dirname(path)).free
    events: list = []
    with Spool(path, clock=clock, min_free_bytes=floor, on_event=lambda k, d: events.append((k, d))) as s:
        data = events[0][1]
        assert data["how"] == spoolopen.NO_SPACE and "no space to salvage" in data["problem"], data
        assert data["lost"] is None and data["salvaged"] == 0  # not counted lost: they are still on disk
        assert data["unsalvaged"] == data["moved_to"] and os.path.exists(data["moved_to"])
        assert all_messages(s) == [] and s.stats()["messages"] == 0
    with open(path + ".unsalvaged") as f:
        assert f.read().strip() == os.path.basename(data["moved_to"])
    events.clear()
    with Spool(path, clock=clock, on_event=lambda k, d: events.append((k, d))) as again:  # room again
        assert [(k, d["how"]) for k, d in events] == [("spool_corrupt", spoolopen.MERGED)]
        assert events[0][1]["salvaged"] == 1500 - len(lost) and events[0][1]["lost"] == len(lost)
        assert [m.id for m in all_messages(again)] == [w[0] for w in written if w[0] not in lost]
        assert again.stats()["messages"] == 1500 - len(lost)
        later = again.put(E, "e", b"new")
        assert later > written[-1][0]
    assert not os.path.exists(path + ".unsalvaged")
    events.clear()
    with Spool(path, clock=clock, on_event=lambda k, d: events.append((k, d))) as third:
        assert events == [] and len(all_messages(third)) == 1500 - len(lost) + 1  # merged once


def test_a_salvaged_copy_left_by_a_crash_between_the_renames_is_adopted(path, clock):
    written = write_spool(path, clock, 30)
    # The crash came after the corrupt file was set aside and before the copy was renamed into place.
    os.replace(path, path + ".salvage")
    s, events = open_recording(path, clock)
    with s:
        assert [(k, d["how"]) for k, d in events] == [("spool_corrupt", spoolopen.ADOPTED)]
        assert events[0][1]["salvaged"] == 30
        assert [m.id for m in all_messages(s)] == [w[0] for w in written]
    assert not os.path.exists(path + ".salvage")


def test_a_partial_salvage_copy_beside_the_spool_is_removed_and_the_spool_kept(path, clock):
    written = write_spool(path, clock, 30)
    with open(path + ".salvage", "wb") as f:  # the crash came while the copy was being written
        f.write(b"SQLite format 3\x00 half a copy")
    s, events = open_recording(path, clock)
    with s:
        assert events == [] and [m.id for m in all_messages(s)] == [w[0] for w in written]
    assert not os.path.exists(path + ".salvage")


def test_flush_loops_instead_of_recursing_while_acks_free_room(path, clock, mocker):
    s = Spool(path, clock=clock, min_free_bytes=0)
    ids = [s.put(R, TOPIC, b"x") for _ in range(3)]
    s.flush()
    real = spooldisk.DiskBudget.admit
    calls = {"n": 0}

    def held_while_acks_arrive(self, rows, telemetry):
        calls["n"] += 1
        if calls["n"] <= 3000 and rows:  # the floor holds every row back while an ack arrives each time
            s.ack([ids[0]])
            return spooldisk.Admission([], rows, [], "the disk is nearly full")
        return real(self, rows, telemetry)

    mocker.patch.object(spooldisk.DiskBudget, "admit", held_while_acks_arrive)
    s.put(R, TOPIC, b"y")
    s.ack([ids[0]])
    assert s.flush() == 1  # 3000 rounds, one stack frame
    assert calls["n"] > 3000
    mocker.stopall()
    s.close()
