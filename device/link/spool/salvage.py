"""Salvage from a corrupt spool file: repair it in place, or stream its readable rows into another file.

One damaged page must not cost the messages on every other page. :mod:`device.link.spool.open` decides what
to do; this module does the reading and writing, never holding more than a chunk of rows in memory:

* :func:`repair_in_place` handles the common case, damage confined to the indexes: when the table and the
  meta table read whole, the index entries are dropped from the schema (nothing walks their damaged pages
  again), the indexes are built afresh and ``PRAGMA quick_check`` must then pass. No copy, no space beyond
  the new index pages, nothing lost. The old index pages stay in the file as unused
  pages (``Page N is never used``: a leak of a few pages, not damage; :func:`device.link.spool.db.open_file`
  accepts it).
* :func:`salvage` and :func:`merge` stream every readable row into another spool file: the table in id
  order, forwards until a read fails, then backwards from the end until a read fails, so a bad leaf page
  costs only the rows on it; then both covering indexes, which hold every row's id even when table pages are
  lost: each id the destination does not hold yet is fetched on its own, so rows stranded between two bad
  table pages are still found. Rows are written in chunks as they are read; only the ids of lost or
  malformed rows are kept in memory.

Every readable, well-formed row (known kind, sane fields) keeps its own id, so ids never go back and the
publisher resends them in order. Rows are lost only when their page is unreadable or the row itself is
malformed. How many were lost is exact when the table or an index could be read whole; otherwise it is a
lower bound and said to be one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import urllib.parse
from dataclasses import dataclass

from device.link.spool import db as spooldb

_COLUMNS = "id, kind, topic, payload, qos, retain, created, size"
_INDEXES = ("messages_kind", "messages_created")
_INDEX_SCANS = (  # every id each covering index holds, in both directions (the second starts past a bad page)
    ("SELECT id FROM messages INDEXED BY messages_kind WHERE kind > -1 ORDER BY kind, id",
     "SELECT id FROM messages INDEXED BY messages_kind WHERE kind > -1 ORDER BY kind DESC, id DESC"),
    ("SELECT id FROM messages INDEXED BY messages_created WHERE created > -1e300 ORDER BY created, kind",
     "SELECT id FROM messages INDEXED BY messages_created WHERE created > -1e300 ORDER BY created DESC, kind DESC"),
)
_CHUNK_ROWS = 256  # rows buffered before they are written: memory stays a chunk, whatever the spool's size
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Salvaged:
    """What a salvage saved.

    Attributes:
        rows: Rows written to the destination (or kept in place).
        lost: Rows known lost (unreadable or malformed); exact when ``lost_exact``, else a lower bound.
        lost_exact: Whether every row of the corrupt file is accounted for (its table or an index read whole).
        last_id: The highest id the corrupt file shows (meta ``last_id``, rows, index entries); 0 for none.
        meta: The meta table as far as it could be read (drop counters live there).
        problem: Why nothing could be read or written (not a database, not a spool, no space), or "".
        no_space: The destination could not be written for lack of space: the rows are still in the source.
    """

    rows: int
    lost: int
    lost_exact: bool
    last_id: int
    meta: dict
    problem: str = ""
    no_space: bool = False

    def summary(self) -> str:
        """For the log line: ``N message(s) salvaged, M lost`` (``at least M`` when not exact), and why not."""
        lost = str(self.lost) if self.lost_exact else f"at least {self.lost}"
        return f"{self.rows} message(s) salvaged, {lost} lost" + (f" ({self.problem})" if self.problem else "")

    def counts(self) -> dict:
        """For the ``spool_corrupt`` event: ``salvaged`` and ``lost``; ``lost`` is None when it cannot be known,
        with ``lost_at_least`` beside it."""
        if self.lost_exact:
            return {"salvaged": self.rows, "lost": self.lost}
        return {"salvaged": self.rows, "lost": None, "lost_at_least": self.lost}


def open_ro(path: str) -> sqlite3.Connection:
    """Opens ``path`` read-only (its bytes stay as they were); raises sqlite3.Error."""
    return sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True)


def check_schema(db: sqlite3.Connection) -> str:
    """Returns "" when ``db`` holds this spool schema, else why not (its schema unreadable, another schema)."""
    try:
        # Read the schema even when a root page it names lies past the end (a truncated file): on a read-only
        # connection the pragma only relaxes the schema check, it cannot write anything.
        db.execute("PRAGMA writable_schema = ON")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        columns = [r[1] for r in db.execute("PRAGMA table_info(messages)")]
    except sqlite3.Error as e:
        return f"its schema cannot be read: {e}"
    if version != spooldb.SCHEMA_VERSION or columns != [c.strip() for c in _COLUMNS.split(",")]:
        return "it is not a spool of this schema"
    return ""


def last_id(db: sqlite3.Connection) -> int:
    """The highest id a (possibly corrupt) spool shows without a scan: meta ``last_id`` and the table's last row."""
    best = _read_meta(db).get("last_id", 0)
    with contextlib.suppress(sqlite3.DatabaseError, TypeError):
        best = max(best, db.execute("SELECT MAX(id) FROM messages").fetchone()[0] or 0)
    return best


def repair_in_place(path: str, kinds: tuple) -> Salvaged | None:
    """Rebuilds the indexes of ``path`` in place when its table and meta table read whole.

    Args:
        path: The corrupt spool (closed by the caller).
        kinds: The message kinds the spool knows (a row of another kind is damage a copy must handle).

    Returns:
        What was kept (every row), when ``PRAGMA quick_check`` passes afterwards; None when the damage is not
        confined to the indexes (the file is then unchanged, or has only its indexes rebuilt).
    """
    try:
        ro = open_ro(path)
    except sqlite3.Error:
        return None
    try:
        if check_schema(ro):
            return None
        kinds_ok = frozenset(int(k) for k in kinds)
        good = 0
        try:
            report = " ".join(str(r[0]) for r in ro.execute("PRAGMA quick_check(20)")).lower()
            if "freelist" in report:
                return None  # not the indexes: leave the file as found for the copy set aside
            for row in ro.execute(f"SELECT {_COLUMNS} FROM messages NOT INDEXED ORDER BY id"):
                if not _well_formed(row, kinds_ok):
                    return None  # a damaged row, not a damaged page: the copy keeps the original for a post-mortem
                good += 1
            meta = {str(k): v for k, v in ro.execute("SELECT key, value FROM meta NOT INDEXED")}
        except sqlite3.Error:
            return None  # table pages are damaged: only a copy can save the rest
        top = last_id(ro)
    finally:
        ro.close()
    try:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("PRAGMA writable_schema = ON")
            marks = ",".join("?" * len(_INDEXES))
            db.execute(f"DELETE FROM sqlite_master WHERE type = 'index' AND name IN ({marks})", _INDEXES)
        finally:
            db.close()
        # A new connection reads the schema without the indexes: nothing below walks their damaged pages.
        db = sqlite3.connect(path, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous = FULL")
            db.executescript(f"BEGIN IMMEDIATE; {spooldb.SCHEMA} COMMIT;")
            check = [str(r[0]) for r in db.execute("PRAGMA quick_check(20)")]
        finally:
            db.close()
    except sqlite3.Error:
        return None
    if not spooldb.check_ok(check):
        return None
    return Salvaged(good, 0, True, top, {k: v for k, v in meta.items() if isinstance(v, int)})


def live_bytes(path: str) -> int:
    """What a copy of ``path``'s rows may take: its used pages (the file's size when they cannot be read)."""
    size = os.path.getsize(path)
    with contextlib.suppress(OSError):
        size += os.path.getsize(path + "-wal")
    with contextlib.suppress(sqlite3.Error):
        db = open_ro(path)
        try:
            pages, free, page = db.execute(
                "SELECT * FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()").fetchone()
            size = min(size, (pages - free) * page)
        finally:
            db.close()
    return size


def salvage(src: str, dst: str, kinds: tuple) -> Salvaged:
    """Streams the readable rows of the corrupt spool ``src`` into a new spool file ``dst``.

    ``src`` is opened read-only and never written. ``dst`` (and any side file next to it) is replaced; it is
    written with a rollback journal, fsynced and closed, so the caller can rename it over the spool once the
    corrupt file is set aside. When nothing can be read, or ``dst`` cannot be written, ``dst`` is removed and
    ``problem`` says why (``no_space`` when the disk was full: the rows are still in ``src``).

    Args:
        src: The corrupt spool (closed by the caller).
        dst: Where the salvaged spool goes.
        kinds: The message kinds the spool knows (a row with another kind is malformed).

    Returns:
        What was saved and what was lost.
    """
    remove(dst)
    try:
        out = _pour_file(src, dst, kinds, fresh=True)
    except (sqlite3.Error, OSError, WriteFailed) as e:
        remove(dst)
        return Salvaged(0, 0, False, 0, {}, f"the salvaged copy cannot be written: {e}", no_space=_is_full(e))
    if out.problem:
        remove(dst)
    return out


def merge(src: str, dst: str, kinds: tuple) -> Salvaged:
    """Streams the readable rows of a set-aside spool ``src`` into the working spool ``dst`` (closed by the caller).

    Rows ``dst`` already holds are kept as they are, so an interrupted merge can simply run again. Each chunk
    is its own transaction and the WAL is checkpointed as it goes, so the merge never needs more than the rows'
    own space.

    Returns:
        What was merged; ``problem`` when it could not be (``no_space`` when the disk was full).
    """
    try:
        return _pour_file(src, dst, kinds, fresh=False)
    except (sqlite3.Error, OSError, WriteFailed) as e:
        return Salvaged(0, 0, False, 0, {}, f"cannot merge into {dst}: {e}", no_space=_is_full(e))


def _pour_file(src: str, dst: str, kinds: tuple, *, fresh: bool) -> Salvaged:
    try:
        src_db = open_ro(src)
    except sqlite3.Error as e:
        return Salvaged(0, 0, False, 0, {}, f"cannot open it read-only: {e}")
    try:
        problem = check_schema(src_db)
        if problem:
            return Salvaged(0, 0, False, 0, {}, problem)
        meta = _read_meta(src_db)
        out = sqlite3.connect(dst, isolation_level=None)
        try:
            if fresh:
                out.execute("PRAGMA journal_mode = DELETE")  # no WAL beside a file that is about to be renamed
                out.execute("PRAGMA synchronous = OFF")  # one fsync at the end: a crash leaves the original
                out.executescript(f"{spooldb.SCHEMA} PRAGMA user_version = {spooldb.SCHEMA_VERSION};")
            else:
                out.execute("PRAGMA synchronous = NORMAL")  # the marker goes only after the final checkpoint
                out.execute("PRAGMA wal_autocheckpoint = 64")
                out.execute(f"PRAGMA journal_size_limit = {64 * 4096}")
            sink = _Sink(out)
            lost, exact, top = _pour(src_db, sink, frozenset(int(k) for k in kinds))
            sink.flush()
            top = max(top, meta.get("last_id", 0))
            out.execute("INSERT INTO meta(key, value) VALUES ('last_id', ?) ON CONFLICT(key) DO UPDATE"
                        " SET value = MAX(value, excluded.value)", (top,))
            if not fresh:
                # The drop counters the set-aside file still owed the operator (a fresh copy leaves them to the
                # caller, which adds them in memory).
                out.executemany("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE"
                                " SET value = value + excluded.value",
                                [(k, v) for k, v in meta.items() if k.startswith("dropped_")])
                out.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            out.close()
    finally:
        src_db.close()
    if fresh:
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return Salvaged(sink.rows, lost, exact, top, meta)


class _Sink:
    """Writes rows to a spool connection a chunk at a time (INSERT OR IGNORE: rows it holds stay)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.rows = 0
        self._buf: list[tuple] = []
        self._bytes = 0

    def add(self, row: tuple) -> None:
        self._buf.append(row)
        self._bytes += len(row[3])
        if len(self._buf) >= _CHUNK_ROWS or self._bytes >= _CHUNK_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    cur = self.db.executemany(
                        f"INSERT OR IGNORE INTO messages({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)", self._buf)
                    self.db.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        self.db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise WriteFailed(e) from e
            self.rows += max(0, cur.rowcount)
            self._buf, self._bytes = [], 0

    def has(self, mid: int) -> bool:
        if any(r[0] == mid for r in self._buf):
            return True
        try:
            return self.db.execute("SELECT 1 FROM messages WHERE id = ?", (mid,)).fetchone() is not None
        except sqlite3.Error as e:
            raise WriteFailed(e) from e


class WriteFailed(Exception):
    """The destination of a salvage failed (disk full, I/O): not a damaged row of the source."""

    def __init__(self, err: BaseException) -> None:
        super().__init__(str(err))
        self.err = err


def _pour(db: sqlite3.Connection, sink: _Sink, kinds: frozenset) -> tuple[int, bool, int]:
    """Streams every readable row into ``sink``: ``(rows lost, whether that count is exact, highest id seen)``."""
    malformed: set[int] = set()
    top = 0

    def keep(row: tuple) -> None:
        nonlocal top
        if isinstance(row[0], int):
            top = max(top, row[0])
        if _well_formed(row, kinds):
            sink.add(row)
        else:
            malformed.add(row[0])

    if _scan(db, f"SELECT {_COLUMNS} FROM messages NOT INDEXED ORDER BY id",
             f"SELECT {_COLUMNS} FROM messages NOT INDEXED ORDER BY id DESC", keep):
        return len(malformed), True, top
    lost: set[int] = set()

    def find(r: tuple) -> None:  # an id an index holds: is its row written already, readable, or lost?
        nonlocal top
        mid = r[0]
        if not isinstance(mid, int) or mid in malformed or mid in lost or sink.has(mid):
            return
        top = max(top, mid)
        try:
            row = db.execute(f"SELECT {_COLUMNS} FROM messages WHERE id = ?", (mid,)).fetchone()
        except sqlite3.DatabaseError:
            row = None  # its page is unreadable
        if row is None:
            lost.add(mid)
        else:
            keep(row)

    exact = False
    for forward, backward in _INDEX_SCANS:
        exact = _scan(db, forward, backward, find) or exact
    return len(malformed) + len(lost), exact, top


def _scan(db: sqlite3.Connection, forward: str, backward: str, take) -> bool:
    """Runs ``forward`` to the end, or until a read fails and then ``backward`` until a read fails.

    Returns:
        True if the forward scan read everything.
    """
    try:
        for row in db.execute(forward):
            take(row)
    except sqlite3.DatabaseError:
        pass  # the source's page is unreadable (a failing destination raises WriteFailed instead)
    else:
        return True
    with contextlib.suppress(sqlite3.DatabaseError):
        for row in db.execute(backward):
            take(row)
    return False


def _well_formed(row: tuple, kinds: frozenset) -> bool:
    mid, kind, topic, payload, qos, retain, created, size = row
    return (isinstance(mid, int) and mid > 0 and kind in kinds and isinstance(topic, str) and bool(topic)
            and isinstance(payload, bytes) and size == len(payload) and qos in (0, 1, 2) and retain in (0, 1)
            and isinstance(created, (int, float)))


def _read_meta(db: sqlite3.Connection) -> dict:
    meta: dict[str, int] = {}
    with contextlib.suppress(sqlite3.DatabaseError):
        for k, v in db.execute("SELECT key, value FROM meta"):
            if isinstance(k, str) and isinstance(v, int):
                meta[k] = v
    return meta


def _is_full(err: BaseException) -> bool:
    err = getattr(err, "err", err)
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(err, sqlite3.Error) and "full" in str(err).lower()  # SQLITE_FULL: "database or disk is full"


def remove(path: str) -> None:
    """Removes ``path`` and its side files, if present."""
    for suffix in ("",) + spooldb.SIDE_SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)
