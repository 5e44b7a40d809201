"""The SQLite file under the spool: its rows (:class:`Kind`, :class:`Message`), open and check it, create the schema.

:mod:`device.link.spool.spool` holds the queue logic; this module knows the file. :func:`open_file` connects with
``journal_mode=WAL`` and ``synchronous=FULL``, runs ``PRAGMA quick_check``, checks the schema version and
reads back what the spool needs to resume (last id, totals per kind, drop counters). It raises the sqlite3
error or :class:`Corrupt`; :func:`is_corruption` tells the caller whether moving the file aside
(:func:`device.statefile.move_aside` with :data:`SIDE_SUFFIXES`) is the right answer or the error is environmental (permissions, disk full, locked).
"""

from __future__ import annotations

import enum
import sqlite3
from dataclasses import dataclass

SCHEMA_VERSION = 1
SIDE_SUFFIXES = ("-wal", "-shm", "-journal")  # every side file SQLite may keep next to the database
# Covering indexes: budget, age expiry and the totals read (kind, id|created, size) without payload pages.
SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY, kind INTEGER NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
    qos INTEGER NOT NULL, retain INTEGER NOT NULL, created REAL NOT NULL, size INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS messages_kind ON messages(kind, id, size);
CREATE INDEX IF NOT EXISTS messages_created ON messages(created, kind, size);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class Kind(enum.IntEnum):
    """What a message is; the value is its drop priority (lowest is dropped first when over budget)."""

    TELEMETRY = 0
    RESULT = 1
    EVENT = 2


KIND_NAMES = {k: k.name.lower() for k in Kind}


@dataclass(frozen=True)
class Message:
    """A committed message as the publisher sees it. ``created`` is wall-clock seconds from the spool's clock."""

    id: int
    kind: Kind
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created: float


class Connection(sqlite3.Connection):
    """A Python-level subclass, so a test can make one sqlite call raise (the C type's methods are read-only)."""


class Corrupt(Exception):
    """The file opened but is not a usable spool (quick_check failed, foreign or unknown schema, bad kind)."""


@dataclass(frozen=True)
class FileState:
    """What an opened spool file holds: enough to resume without scanning payloads.

    Attributes:
        last_id: The highest id ever committed: max(meta ``last_id``, max(id in rows)).
        counts: Rows per kind value.
        sizes: Payload bytes per kind value.
        oldest: The smallest ``created``, or None when empty.
        meta: The whole meta table (drop counters live there).
    """

    last_id: int
    counts: dict
    sizes: dict
    oldest: float | None
    meta: dict


def is_corruption(err: BaseException) -> bool:
    """Whether ``err`` means the file itself is bad (move it aside) rather than the environment.

    Args:
        err: An exception from :func:`open_file` or from a query.

    Returns:
        True for :class:`Corrupt` and sqlite3's plain ``DatabaseError`` (SQLITE_CORRUPT, SQLITE_NOTADB).
        I/O, disk full, locked, cannot-open and permission errors are ``OperationalError``: never corruption,
        so they never cost the operator the file.
    """
    return isinstance(err, Corrupt) or type(err) is sqlite3.DatabaseError


def check_ok(lines: list) -> bool:
    """Whether a ``PRAGMA quick_check`` report means a usable file.

    ``ok``, or only ``Page N is never used``: pages no b-tree and no freelist refers to, which a repair in
    place leaves behind (the old index pages). They are space leaked, not damage: every row is reachable.
    """
    text = [ln for line in lines for ln in str(line).splitlines() if not ln.startswith("*** in database")]
    return text == ["ok"] or bool(text) and all(ln.startswith("Page ") and ln.endswith(" is never used")
                                                 for ln in text)


def totals(db: sqlite3.Connection, kinds: tuple) -> tuple[dict, dict]:
    """Counts rows and payload bytes per kind from the covering index.

    Args:
        db: An open spool connection.
        kinds: The kinds the caller knows (int values; an IntEnum's members work and become the keys).

    Returns:
        ``(counts, sizes)``, each a dict keyed by every member of ``kinds``.

    Raises:
        Corrupt: A row has a kind outside ``kinds``.
        sqlite3.Error: The query failed.
    """
    counts, sizes = dict.fromkeys(kinds, 0), dict.fromkeys(kinds, 0)
    for k, n, b in db.execute("SELECT kind, COUNT(*), COALESCE(SUM(size), 0) FROM messages GROUP BY kind"):
        if k not in kinds:
            raise Corrupt(f"unknown message kind {k!r} in the spool")
        counts[k], sizes[k] = n, b
    return counts, sizes


def open_file(path: str, kinds: tuple) -> tuple[sqlite3.Connection, FileState]:
    """Opens (or creates) a spool file, checks it and reads its state.

    Args:
        path: The database file; its directory must exist.
        kinds: The kinds the caller knows, lowest drop priority first (any other value is corruption).

    Returns:
        The connection (autocommit mode, usable from any thread under the caller's lock) and its state.

    Raises:
        Corrupt: quick_check failed, the schema is foreign or unknown, or a row has an unknown kind.
        sqlite3.Error: The open or a query failed; see :func:`is_corruption`.
    """
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=Connection)
    try:
        db.execute("PRAGMA busy_timeout = 2000")  # a diag reader must not fail our commit at once
        # Check before anything writes: a file we refuse is moved aside exactly as we found it.
        check = [str(r[0]) for r in db.execute("PRAGMA quick_check(5)")]
        if not check_ok(check):
            raise Corrupt("quick_check: " + "; ".join(check))
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = sorted(r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        if version == 0 and tables:
            raise Corrupt(f"not a spool: it holds the tables {tables} and no spool schema version")
        if version not in (0, SCHEMA_VERSION):
            raise Corrupt(f"unknown spool schema version {version} (this agent knows {SCHEMA_VERSION})")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"journal_mode is {mode!r}, WAL is required")
        db.execute("PRAGMA synchronous = FULL")
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        if version == 0 or not {"messages_kind", "messages_created"} <= indexes:
            # A fresh file, or a repair in place that a crash stopped before it rebuilt the indexes.
            db.executescript(f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        meta = {k: int(v) for k, v in db.execute("SELECT key, value FROM meta")}
        max_row = db.execute("SELECT MAX(id) FROM messages").fetchone()[0] or 0
        counts, sizes = totals(db, kinds)
        oldest = db.execute("SELECT MIN(created) FROM messages").fetchone()[0]
    except BaseException:
        db.close()
        raise
    return db, FileState(max(meta.get("last_id", 0), max_row), counts, sizes, oldest, meta)


@dataclass(frozen=True)
class Committed:
    """The state after :func:`commit`: dicts keyed like the ones passed in."""

    last_id: int
    counts: dict
    sizes: dict
    dropped: dict
    oldest: float | None


def commit(db: sqlite3.Connection, rows: list, acks: set, *, counts: dict, sizes: dict, dropped: dict,
           cutoff: float, max_bytes: int, recount: bool = False) -> Committed:
    """Writes one group commit: the new rows, the acked deletes, age expiry and the budget, in ONE transaction.

    Args:
        db: An open spool connection in autocommit mode.
        rows: ``(id, kind, topic, payload, qos, retain, created, size)`` tuples.
        acks: Ids to delete (unknown ids are ignored).
        counts: Rows per kind before this commit, keyed by kind in drop-priority order (lowest first).
        sizes: Payload bytes per kind before this commit.
        dropped: Drop counters per kind before this commit; they are persisted in meta with the drops.
        cutoff: Rows with ``created`` below this wall time are dropped whatever their kind.
        max_bytes: Payload budget: over it, whole kinds are trimmed oldest first in ``counts`` order.
        recount: Count totals from the table instead of trusting ``counts``/``sizes`` (after a failed commit).

    Returns:
        The new totals, counters, oldest ``created`` and the highest id written (0 without rows).

    Raises:
        sqlite3.Error: The transaction failed and was rolled back.
        Corrupt: ``recount`` found a kind outside ``counts``.
    """
    counts, sizes, dropped = dict(counts), dict(sizes), dict(dropped)
    last_id = max((r[0] for r in rows), default=0)
    max_vars = _max_variables(db)
    db.execute("BEGIN IMMEDIATE")
    try:
        if rows:
            # Multi-row INSERTs rather than executemany: the sqlite3 module releases the GIL around every
            # statement step, and a busy producer thread makes each release cost up to the interpreter's
            # switch interval (5 ms); a row per step would let a fast producer outrun the commit thread.
            per = max(1, min(2048, max_vars // 8))  # 2048: bounds the flattened parameter list
            for n in range(0, len(rows), per):
                chunk = rows[n:n + per]
                # OR IGNORE: a retried batch whose failed COMMIT did land must not fail on its own rows.
                db.execute("INSERT OR IGNORE INTO messages(id, kind, topic, payload, qos, retain, created, size)"
                           " VALUES " + ",".join(["(?,?,?,?,?,?,?,?)"] * len(chunk)),
                           [v for r in chunk for v in r])
            db.execute("INSERT INTO meta(key, value) VALUES ('last_id', ?) ON CONFLICT(key) DO UPDATE"
                       " SET value = MAX(value, excluded.value)", (last_id,))
        for r in rows:
            counts[r[1]] += 1
            sizes[r[1]] += r[7]
        ids = sorted(acks)
        per = min(max_vars, 16384)
        for n in range(0, len(ids), per):
            chunk = ids[n:n + per]
            marks = ",".join("?" * len(chunk))
            for k, c, b in db.execute(f"SELECT kind, COUNT(*), SUM(size) FROM messages WHERE id IN ({marks})"
                                      " GROUP BY kind", chunk):
                counts[k] -= c
                sizes[k] -= b
            db.execute(f"DELETE FROM messages WHERE id IN ({marks})", chunk)
        if recount:
            counts, sizes = totals(db, tuple(counts))
        expired = db.execute("SELECT kind, COUNT(*), SUM(size) FROM messages WHERE created < ? GROUP BY kind",
                             (cutoff,)).fetchall()
        if expired:
            db.execute("DELETE FROM messages WHERE created < ?", (cutoff,))
            for k, c, b in expired:
                counts[k] -= c
                sizes[k] -= b
                dropped[k] += c
        _enforce_budget(db, counts, sizes, dropped, max_bytes)
        db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                       [(f"dropped_{getattr(k, 'name', str(k)).lower()}", n) for k, n in dropped.items()])
        oldest = db.execute("SELECT MIN(created) FROM messages").fetchone()[0]
        db.execute("COMMIT")
    except BaseException:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite already rolled back (the error ended the transaction)
        raise
    return Committed(last_id, counts, sizes, dropped, oldest)


def _max_variables(db: sqlite3.Connection) -> int:
    """How many ``?`` one statement may hold (SQLITE_MAX_VARIABLE_NUMBER: 999 before SQLite 3.32, 32766 after)."""
    getlimit = getattr(db, "getlimit", None)  # Python 3.11+
    if getlimit is not None:
        return getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    return 32766 if sqlite3.sqlite_version_info >= (3, 32, 0) else 999


def _enforce_budget(db: sqlite3.Connection, counts: dict, sizes: dict, dropped: dict, max_bytes: int) -> None:
    excess = sum(sizes.values()) - max_bytes
    for kind in counts:  # drop-priority order: the caller's dicts are keyed lowest priority first
        if excess <= 0:
            return
        cut, n, freed = None, 0, 0
        cur = db.execute("SELECT id, size FROM messages WHERE kind = ? ORDER BY id", (int(kind),))
        for mid, size in cur:
            cut, n, freed = mid, n + 1, freed + size
            if freed >= excess:
                break
        cur.close()
        if n:
            # One range delete on the (kind, id, size) index instead of n single-row deletes.
            db.execute("DELETE FROM messages WHERE kind = ? AND id <= ?", (int(kind), cut))
            counts[kind] -= n
            sizes[kind] -= freed
            dropped[kind] += n
            excess -= freed
