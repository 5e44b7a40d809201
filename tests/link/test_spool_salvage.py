"""A corrupt spool gives up only what cannot be read: real SQLite files damaged on disk, page by page.

The page to damage is found the way a post-mortem would: the index's root page from ``sqlite_master`` and the
table's leaf pages from their b-tree headers (type 0x0D), whose cells name the rows they hold. Nothing is
hard-coded to one SQLite build's layout."""

from __future__ import annotations

import os
import sqlite3

import pytest

from device.link.spool.spool import Kind, Spool
from drivers.sim.clock import EPOCH, SimClock

from tests.link.spoolhelp import E, R, T, all_messages  # noqa: F401
from tests.link.spoolhelp import clock, path  # noqa: F401 (fixtures)

TOPIC = "fieldnode/v1/d/results/vibration"


def write_spool(path: str, clock: SimClock, n: int, size: int = 20) -> list[tuple[int, Kind, bytes]]:
    """Commits ``n`` messages of mixed kinds, closes the spool (WAL checkpointed into the file) and returns them."""
    out = []
    with Spool(path, clock=clock) as s:
        for i in range(n):
            kind = (T, R, E)[i % 3]
            payload = b"%06d" % i + b"x" * (size - 6)
            out.append((s.put(kind, TOPIC, payload), kind, payload))
            clock.advance(0.5)
    return out


def page_size(path: str) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA page_size").fetchone()[0]
    finally:
        db.close()


def root_page(path: str, name: str) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
    finally:
        db.close()


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    v = 0
    for i in range(9):
        b = buf[at + i]
        if i == 8:
            return (v << 8) | b, at + 9
        v = (v << 7) | (b & 0x7F)
        if not b & 0x80:
            return v, at + i + 1
    raise AssertionError("unreachable")


def table_leaves(path: str) -> dict[int, list[int]]:
    """Every table-leaf page of the file with the rowids of its cells (the messages table's pages have ids
    far above the meta table's few rows)."""
    size = page_size(path)
    with open(path, "rb") as f:
        data = f.read()
    leaves = {}
    for no in range(2, len(data) // size + 1):
        page = data[(no - 1) * size:no * size]
        if page[0] != 0x0D:
            continue
        cells = int.from_bytes(page[3:5], "big")
        ids = []
        for c in range(cells):
            at = int.from_bytes(page[8 + 2 * c:10 + 2 * c], "big")
            _, at = _varint(page, at)  # payload length
            ids.append(_varint(page, at)[0])
        leaves[no] = ids
    return leaves


def smash(path: str, page_no: int) -> bytes:
    """Writes random bytes over one whole page; returns the damaged file's bytes."""
    size = page_size(path)
    with open(path, "r+b") as f:
        f.seek((page_no - 1) * size)
        f.write(os.urandom(size))
    with open(path, "rb") as f:
        return f.read()


def open_recording(path: str, clock: SimClock) -> tuple[Spool, list]:
    events: list = []
    return Spool(path, clock=clock, on_event=lambda kind, data: events.append((kind, data))), events


@pytest.mark.parametrize("n", [44, 1500], ids=["one-page-index", "multi-page-index"])
@pytest.mark.parametrize("index", ["messages_kind", "messages_created"])
def test_a_corrupt_index_page_is_repaired_in_place_and_loses_no_message(path, clock, index, n):
    written = write_spool(path, clock, n)
    smash(path, root_page(path, index))
    s, events = open_recording(path, clock)
    with s:
        assert [k for k, _ in events] == ["spool_corrupt"]
        data = events[0][1]
        assert data["how"] == "repaired in place" and data["moved_to"] is None, data
        assert data["salvaged"] == n and data["lost"] == 0, data
        assert [p for p in os.listdir(os.path.dirname(path)) if ".corrupt-" in p or ".salvage" in p] == []
        got = all_messages(s)
        assert [(m.id, m.kind, m.payload) for m in got] == written  # same ids, same order, same payloads
        assert all(m.topic == TOPIC for m in got) and s.stats()["messages"] == n
        later = s.put(E, "e", b"after")
        assert later > written[-1][0]
    with Spool(path, clock=SimClock(epoch=EPOCH - 3600)) as again:  # a good spool now: no second recovery
        assert [m.id for m in all_messages(again)] == [w[0] for w in written] + [later]
        assert again.put(E, "e", b"x") == later + 1 and again.stats()["corrupt_recoveries"] == 0
        events_kept = sum(1 for w in written if w[1] == E)
        assert again.stats()["by_kind"]["event"] == events_kept + 1  # totals read from the rebuilt index


@pytest.mark.parametrize("pages", [1, 2], ids=["one-leaf", "two-leaves"])
def test_corrupt_table_pages_lose_only_their_rows(path, clock, pages):
    written = write_spool(path, clock, 1500, size=100)
    messages_root = root_page(path, "messages")
    leaves = {no: ids for no, ids in table_leaves(path).items() if ids and ids[0] > 1000 and no != messages_root}
    order = sorted(leaves, key=lambda no: leaves[no][0])  # leaves in id order
    assert len(order) >= 10, "the table must span many leaf pages"
    # Two leaves apart: the rows between them are reached through the indexes, one read each.
    hit = [order[3]] if pages == 1 else [order[3], order[7]]
    lost = {i for no in hit for i in leaves[no]}
    for no in hit:
        smash(path, no)
    s, events = open_recording(path, clock)
    with s:
        data = events[0][1]
        assert data["salvaged"] == 1500 - len(lost) and data["lost"] == len(lost), data
        assert "lost_at_least" not in data
        assert [m.id for m in all_messages(s)] == [w[0] for w in written if w[0] not in lost]
        assert [m.payload for m in all_messages(s)] == [w[2] for w in written if w[0] not in lost]


def test_a_malformed_row_is_counted_lost_and_the_rest_kept(path, clock):
    written = write_spool(path, clock, 6)
    db = sqlite3.connect(path)
    db.execute("UPDATE messages SET kind = 9 WHERE id = ?", (written[2][0],))
    db.commit()
    db.close()
    s, events = open_recording(path, clock)
    with s:
        assert "unknown message kind 9" in events[0][1]["error"]
        assert (events[0][1]["salvaged"], events[0][1]["lost"]) == (5, 1)
        assert [m.id for m in all_messages(s)] == [w[0] for i, w in enumerate(written) if i != 2]


def test_a_lost_count_that_cannot_be_known_is_a_lower_bound(path, clock):
    written = write_spool(path, clock, 1500, size=100)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)  # the table's tail and pages of both indexes are gone
    s, events = open_recording(path, clock)
    with s:
        data = events[0][1]
        assert data["lost"] is None and data["lost_at_least"] >= 0
        ids = [m.id for m in all_messages(s)]
        assert 0 < len(ids) < 1500 and data["salvaged"] == len(ids)
        assert set(ids) <= {w[0] for w in written} and ids == sorted(ids)


def test_salvaged_messages_are_published_to_a_real_broker(path, clock, broker, mqtt_client):
    from device.link.client import Link

    written = write_spool(path, clock, 44)
    smash(path, root_page(path, "messages_kind"))
    watcher = mqtt_client(broker)
    watcher.subscribe(TOPIC)
    events: list = []
    # The spool's clock is the one that wrote the rows: on the wall clock they are older than max_age_s, and the
    # commit thread drops them as soon as it starts.
    spool = Spool(path, clock=clock, commit_interval_s=0.02, on_event=lambda k, d: events.append((k, d)))
    spool.start()
    link = Link(broker.url, "d", spool, backoff=(0.05, 0.5), birth=lambda: {}, on_event=lambda k, d: None)
    link.start()
    try:
        got = watcher.wait_for_messages(len(written), topic=TOPIC)
        assert [m.payload for m in got] == [w[2] for w in written]  # every one, in id order
        assert events[0][0] == "spool_corrupt" and events[0][1]["salvaged"] == 44
    finally:
        link.stop()
        spool.close()


def test_drop_counters_survive_the_salvage(path, clock):
    with Spool(path, clock=clock, max_bytes=500) as s:
        for _ in range(10):
            s.put(T, "t", b"x" * 100)
    smash(path, root_page(path, "messages_kind"))
    s, events = open_recording(path, clock)
    with s:
        assert events[0][1]["salvaged"] == 5
        assert s.pop_dropped() == {"telemetry": 5, "result": 0, "event": 0}  # still owed to the operator
