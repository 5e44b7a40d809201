"""Salvage from a corrupt spool file: copy every row that can still be read into a fresh file.

One damaged page must not cost the messages on every other page. :func:`salvage` opens the corrupt file
read-only (its bytes stay as they were, for the post-mortem copy set aside afterwards) and reads what it can:

* the table in id order, forwards until a read fails, then backwards from the end until a read fails, so a
  bad leaf page costs only the rows on it;
* both covering indexes, which hold every row's id even when table pages are lost; each id not read yet is
  then fetched on its own, so rows stranded between two bad table pages are still found.

Every readable, well-formed row (known kind, sane fields) is written with its own id to a fresh file, so ids
never go back and the publisher resends them in order. Rows are lost only when their page is unreadable or
the row itself is malformed. How many were lost is exact when the table or an index could be read whole (a
complete list of ids); otherwise it is a lower bound and said to be one.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import urllib.parse
from dataclasses import dataclass

from device import statefile
from device.link import spooldb

_COLUMNS = "id, kind, topic, payload, qos, retain, created, size"
_INDEX_SCANS = (  # every id each covering index holds, in both directions (the second starts past a bad page)
    ("SELECT id FROM messages INDEXED BY messages_kind WHERE kind > -1 ORDER BY kind, id",
     "SELECT id FROM messages INDEXED BY messages_kind WHERE kind > -1 ORDER BY kind DESC, id DESC"),
    ("SELECT id FROM messages INDEXED BY messages_created WHERE created > -1e300 ORDER BY created, kind",
     "SELECT id FROM messages INDEXED BY messages_created WHERE created > -1e300 ORDER BY created DESC, kind DESC"),
)


@dataclass(frozen=True)
class Salvaged:
    """What :func:`salvage` saved.

    Attributes:
        rows: Rows written to the fresh file.
        lost: Rows known lost (unreadable or malformed); exact when ``lost_exact``, else a lower bound.
        lost_exact: Whether every row of the corrupt file is accounted for (its table or an index read whole).
        last_id: The highest id the corrupt file shows (meta ``last_id``, rows, index entries); 0 for none.
        meta: The meta table as far as it could be read (drop counters live there).
        problem: Why nothing could be read (not a database, not a spool, the copy failed), or "".
    """

    rows: int
    lost: int
    lost_exact: bool
    last_id: int
    meta: dict
    problem: str = ""


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


def replace(path: str, when: float, kinds: tuple) -> tuple[str, Salvaged]:
    """Replaces the corrupt spool ``path`` with a file of its readable rows; the original is set aside.

    The rows are copied first (the corrupt file is only read), then the file and its side files are set aside
    (:func:`device.statefile.move_aside`) and the copy is renamed into place. A crash between the two renames
    leaves no spool, so the next start begins a fresh one; the original and the copy (``<path>.salvage``)
    both stay on disk for a technician.

    Args:
        path: The corrupt spool (closed by the caller).
        when: Wall-clock seconds, for the set-aside name.
        kinds: The message kinds the spool knows.

    Returns:
        The path the corrupt file was moved to, and what was salvaged.

    Raises:
        OSError: The corrupt file cannot be moved aside or the copy cannot be renamed into place.
    """
    copy = path + ".salvage"
    saved = salvage(path, copy, kinds)
    target = statefile.move_aside(path, when, spooldb.SIDE_SUFFIXES)
    if os.path.exists(copy):
        os.replace(copy, path)
        statefile.fsync_dir(os.path.dirname(os.path.abspath(path)))
    return target, saved


def salvage(src: str, dst: str, kinds: tuple) -> Salvaged:
    """Copies the readable rows of the corrupt spool ``src`` into a new spool file ``dst``.

    ``src`` is opened read-only and never written. ``dst`` (and any side file a crash left next to it) is
    replaced; it is written with a rollback journal and ``synchronous=FULL`` and closed, so the caller can
    rename it over the spool once the corrupt file is set aside. When nothing can be read, or ``dst`` cannot
    be written, ``dst`` is removed and ``problem`` says why.

    Args:
        src: The corrupt spool (closed by the caller).
        dst: Where the salvaged spool goes.
        kinds: The message kinds the spool knows (a row with another kind is malformed).

    Returns:
        What was saved and what was lost.
    """
    _remove(dst)
    try:
        src_db = sqlite3.connect(f"file:{urllib.parse.quote(src)}?mode=ro", uri=True)
    except sqlite3.Error as e:
        return Salvaged(0, 0, False, 0, {}, f"cannot open it read-only: {e}")
    try:
        try:
            # Read the schema even when a root page it names lies past the end (a truncated file): on this
            # read-only connection the pragma only relaxes the schema check, it cannot write anything.
            src_db.execute("PRAGMA writable_schema = ON")
            version = src_db.execute("PRAGMA user_version").fetchone()[0]
            columns = [r[1] for r in src_db.execute("PRAGMA table_info(messages)")]
        except sqlite3.Error as e:
            return Salvaged(0, 0, False, 0, {}, f"its schema cannot be read: {e}")
        if version != spooldb.SCHEMA_VERSION or columns != [c.strip() for c in _COLUMNS.split(",")]:
            return Salvaged(0, 0, False, 0, {}, "it is not a spool of this schema")
        good, malformed, known, exact = _read(src_db, frozenset(int(k) for k in kinds))
        meta = _read_meta(src_db)
    finally:
        src_db.close()
    lost = len(known - set(good))  # known holds the malformed ids too
    last_id = max([meta.get("last_id", 0), *known, *malformed])
    try:
        _write(dst, [good[i] for i in sorted(good)], last_id)
    except (sqlite3.Error, OSError) as e:
        _remove(dst)
        return Salvaged(0, lost + len(good), exact, last_id, meta, f"the salvaged copy cannot be written: {e}")
    return Salvaged(len(good), lost, exact, last_id, meta)


def _read(db: sqlite3.Connection, kinds: frozenset) -> tuple[dict, set, set, bool]:
    """Reads every row it can: ``(good rows by id, malformed ids, every id seen, whether the set is complete)``."""
    good: dict[int, tuple] = {}
    malformed: set[int] = set()

    def keep(row: tuple) -> None:
        if _well_formed(row, kinds):
            good[row[0]] = row
        else:
            malformed.add(row[0])

    table_whole = _scan(db, f"SELECT {_COLUMNS} FROM messages NOT INDEXED ORDER BY id",
                        f"SELECT {_COLUMNS} FROM messages NOT INDEXED ORDER BY id DESC", keep)
    known = set(good) | malformed
    if table_whole:
        return good, malformed, known, True
    exact = False
    for forward, backward in _INDEX_SCANS:
        ids: list[int] = []
        exact = _scan(db, forward, backward, lambda r: ids.append(r[0])) or exact
        known.update(i for i in ids if isinstance(i, int))
    for mid in sorted(known - set(good) - malformed):  # ids stranded between bad table pages: one read each
        try:
            row = db.execute(f"SELECT {_COLUMNS} FROM messages WHERE id = ?", (mid,)).fetchone()
        except sqlite3.DatabaseError:
            continue  # its page is unreadable: lost
        if row is not None:
            keep(row)
    return good, malformed, known, exact


def _scan(db: sqlite3.Connection, forward: str, backward: str, take) -> bool:
    """Runs ``forward`` to the end, or until a read fails and then ``backward`` until a read fails.

    Returns:
        True if the forward scan read everything.
    """
    try:
        for row in db.execute(forward):
            take(row)
    except sqlite3.DatabaseError:
        pass
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


def _write(dst: str, rows: list, last_id: int) -> None:
    db = sqlite3.connect(dst, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = DELETE")  # no WAL beside a file that is about to be renamed
        db.execute("PRAGMA synchronous = FULL")
        db.executescript(f"BEGIN IMMEDIATE; {spooldb.SCHEMA} PRAGMA user_version = {spooldb.SCHEMA_VERSION};")
        db.executemany(f"INSERT INTO messages({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)", rows)
        db.execute("INSERT INTO meta(key, value) VALUES ('last_id', ?)", (last_id,))
        db.execute("COMMIT")
    finally:
        db.close()


def _remove(path: str) -> None:
    for suffix in ("",) + spooldb.SIDE_SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)
