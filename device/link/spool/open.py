"""What the spool does with a corrupt file, and with what a crash or a full disk left behind at the last one.

:func:`recover` runs on the spool's commit thread (or at open), with the spool's connection closed, never on
the publisher's thread. In order:

1. **Repair in place** (:func:`device.link.spool.salvage.repair_in_place`): when only index pages are bad
   (the table and meta read whole), the indexes are rebuilt in the same file and ``PRAGMA quick_check`` must
   pass. No copy and nothing lost (malformed rows aside); the event says ``how: "repaired in place"``.
2. **Copy**: the readable rows are streamed into ``<path>.salvage``, the corrupt file (with its side files)
   is set aside to ``<path>.corrupt-<UTC stamp>`` and the copy renamed into place. A copy needs about the
   space of the rows it holds, plus the spool's floor of free space; it is attempted only then.
3. **No space to salvage**: when the copy cannot fit (or the disk filled while writing it), the corrupt file
   is set aside all the same and a fresh spool started, so new messages stay durable; its rows are NOT
   counted as lost: the event says ``lost: None`` with ``problem: "no space to salvage: ..."`` and
   ``unsalvaged`` (the set-aside file). Its name is recorded in ``<path>.unsalvaged`` and the salvage is
   retried at every open: the rows are merged into the working spool, with their ids, once there is room.

A crash between the two renames of step 2 leaves ``<path>.salvage`` and no ``<path>``: :func:`leftovers`
adopts the copy at the next open (it is complete: it is renamed only after it was written, fsynced and
closed, and the original only moves after that). When both exist the crash came before the original moved,
so the copy is partial or stale and everything in it is still in ``<path>``: it is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from dataclasses import dataclass, replace as dc_replace
from typing import Callable

from device import statefile
from device.link.spool import db as spooldb, disk as spooldisk, salvage as spoolsalvage
from device.link.errors import SpoolError
from device.link.spool.db import Kind
from device.link.spool.salvage import Salvaged

log = logging.getLogger(__name__)

COPY_SUFFIX = ".salvage"
OWED_SUFFIX = ".unsalvaged"  # lists, one a line, the set-aside files whose rows are still to be salvaged

IN_PLACE = "repaired in place"
COPIED = "salvaged into a fresh file"
SET_ASIDE = "set aside, a fresh spool started"
NO_SPACE = "set aside, no space to salvage: a fresh spool started, the salvage is retried at the next open"
ADOPTED = "adopted the salvaged copy a crash left behind"
MERGED = "merged the rows of a spool set aside for lack of space"


@dataclass(frozen=True)
class Outcome:
    """What became of a corrupt spool (or of what an earlier recovery left behind).

    Attributes:
        how: One of the module's constants (IN_PLACE, COPIED, SET_ASIDE, NO_SPACE, ADOPTED, MERGED).
        moved_to: Where the corrupt file now is, or None when it was not moved.
        saved: What was salvaged and lost.
    """

    how: str
    moved_to: str | None
    saved: Salvaged

    def event(self) -> dict:
        """The fields of the ``spool_corrupt`` event (besides ``path`` and ``error``)."""
        out = {"how": self.how, "moved_to": self.moved_to, **self.saved.counts()}
        if self.saved.problem:
            out["problem"] = self.saved.problem
        if self.how == NO_SPACE:
            out["unsalvaged"] = self.moved_to
        return out


def recover(path: str, when: float, kinds: tuple, reserve: int) -> Outcome:
    """Repairs, salvages or sets aside the corrupt spool ``path`` (closed by the caller).

    Args:
        path: The spool file.
        when: Wall-clock seconds, for the set-aside name.
        kinds: The message kinds the spool knows.
        reserve: Free space the copy must leave on the filesystem (the spool's floor).

    Returns:
        What was done; ``path`` then holds a spool to open (or nothing, for a fresh one).

    Raises:
        OSError: The corrupt file cannot be set aside, or the copy cannot be renamed into place.
    """
    saved = spoolsalvage.repair_in_place(path, kinds)
    if saved is not None:
        return Outcome(IN_PLACE, None, saved)
    copy = path + COPY_SUFFIX
    need = spoolsalvage.live_bytes(path)
    free = _free_bytes(path)
    if free - need < reserve:
        saved = Salvaged(0, 0, False, 0, {}, f"no space to salvage: {need} bytes to copy, {free} free, "
                         f"{reserve} kept free", no_space=True)
    else:
        saved = spoolsalvage.salvage(path, copy, kinds)
    if saved.no_space:
        return _set_aside_owed(path, when, saved)
    target = statefile.move_aside(path, when, spooldb.SIDE_SUFFIXES)
    if os.path.exists(copy):
        os.replace(copy, path)
        statefile.fsync_dir(os.path.dirname(os.path.abspath(path)))
        return Outcome(COPIED, target, saved)
    return Outcome(SET_ASIDE, target, saved)


def _set_aside_owed(path: str, when: float, saved: Salvaged) -> Outcome:
    with contextlib.suppress(Exception):  # only the id floor is needed now; the rows stay where they are
        db = spoolsalvage.open_ro(path)
        try:
            saved = dc_replace(saved, last_id=spoolsalvage.last_id(db))
        finally:
            db.close()
    target = statefile.move_aside(path, when, spooldb.SIDE_SUFFIXES)
    _write_owed(path, _read_owed(path) + [os.path.basename(target)])
    return Outcome(NO_SPACE, target, saved)


def leftovers(path: str, kinds: tuple, reserve: int) -> list[Outcome]:
    """Finishes, at open, what a crash or a full disk left undone; call it before the spool is opened.

    Adopts a complete ``.salvage`` copy (or removes a partial one) and merges the rows of every file set aside
    for lack of space, if there is room now (a file that cannot be merged yet stays owed).

    Args:
        path: The spool file (closed).
        kinds: The message kinds the spool knows.
        reserve: Free space a merge must leave on the filesystem.

    Returns:
        One outcome per file adopted or merged, for the ``spool_corrupt`` events.

    Raises:
        OSError: The copy cannot be renamed into place.
    """
    out = []
    copy = path + COPY_SUFFIX
    if os.path.exists(copy):
        if os.path.exists(path):
            log.warning("spool %s: removing %s, an interrupted salvage of it (the spool itself is still there)",
                        path, copy)
            spoolsalvage.remove(copy)
        else:
            os.replace(copy, path)
            statefile.fsync_dir(os.path.dirname(os.path.abspath(path)))
            out.append(Outcome(ADOPTED, None, Salvaged(_count(path), 0, False, 0, {}, "a crash interrupted a "
                                                       "salvage: the salvaged copy was adopted")))
    owed = _read_owed(path)
    still = []
    for name in owed:
        src = os.path.join(os.path.dirname(path), name)
        if not os.path.exists(src):
            log.warning("spool %s: %s, owed a salvage, is gone; its rows cannot be salvaged", path, src)
            continue
        if not os.path.exists(path) or _free_bytes(path) - spoolsalvage.live_bytes(src) < reserve:
            still.append(name)
            continue
        saved = spoolsalvage.merge(src, path, kinds)
        if saved.problem:  # no room after all, or the spool itself is bad: retried at the next open
            log.warning("spool %s: the rows of %s are not merged yet: %s", path, src, saved.problem)
            still.append(name)
            continue
        out.append(Outcome(MERGED, src, saved))
    if owed != still:
        _write_owed(path, still)
    return out


def _count(path: str) -> int:
    with contextlib.suppress(Exception):
        db = spoolsalvage.open_ro(path)
        try:
            return db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        finally:
            db.close()
    return 0


def _free_bytes(path: str) -> int:
    st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    return st.f_bavail * st.f_frsize


def _read_owed(path: str) -> list[str]:
    try:
        with open(path + OWED_SUFFIX, encoding="utf-8") as f:
            # Only plain names in the spool's directory: the list can name nothing else.
            return [n for n in (ln.strip() for ln in f) if n and os.path.basename(n) == n]
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        log.warning("spool %s: cannot read %s: %s", path, path + OWED_SUFFIX, e)
        return []


def _write_owed(path: str, names: list[str]) -> None:
    marker = path + OWED_SUFFIX
    if not names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker)
        statefile.fsync_dir(os.path.dirname(os.path.abspath(path)))
        return
    tmp = marker + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(n + "\n" for n in names))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, marker)
    statefile.fsync_dir(os.path.dirname(os.path.abspath(path)))


@dataclass(frozen=True)
class Opened:
    """What the spool file holds once it is (re)opened: the state the :class:`Spool` takes over.

    Attributes:
        state: The file's counters, sizes, oldest message, last id and meta (:class:`spooldb.FileState`).
        outcome: What a recovery did before this open, or None when the file opened as it was.
    """

    state: spooldb.FileState
    outcome: Outcome | None = None


class SpoolFile:
    """The spool's file: its connection, its disk budget, and what is done when it is corrupt.

    It keeps no queue state of its own. :meth:`open` and :meth:`recover` return what the file holds
    (:class:`Opened`), and the :class:`device.link.spool.spool.Spool` adopts it under its own locks. The Spool
    serialises every call (its ``_db_lock``).

    Args:
        path: The database file (absolute).
        max_bytes: The spool's budget on disk. min_free: Free space to leave on the filesystem, or None.
        clock: Wall time for the name of a set-aside file.
        emit: ``emit(kind, data)`` for ``spool_corrupt`` events (never raises).
    """

    def __init__(self, path: str, max_bytes: int, min_free: int | None, clock,
                 emit: Callable[[str, dict], None]) -> None:
        self.path = path
        self.db: sqlite3.Connection | None = None
        self.disk: spooldisk.DiskBudget | None = None
        self._max_bytes, self._min_free, self._clock, self._emit = max_bytes, min_free, clock, emit

    def open(self) -> Opened:
        """Opens the file, first finishing what a crash or a full disk left undone; a corrupt file is recovered.

        Raises:
            SpoolError: The directory or file cannot be opened, or a recovery failed.
        """
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as e:
            raise SpoolError(f"cannot create the spool directory for {self.path}: {e}") from e
        try:
            self.disk = spooldisk.DiskBudget(self.path, self._max_bytes, self._min_free)
            # What a crash or a full disk left undone at the last recovery: an interrupted salvage, rows owed.
            done = leftovers(self.path, tuple(Kind), self.disk.floor)
        except OSError as e:
            raise SpoolError(f"cannot open spool {self.path}: {e}") from e
        for out in done:
            log.warning("spool %s: %s; %s", self.path, out.how, out.saved.summary())
            self._emit("spool_corrupt", {"path": self.path, "error": out.saved.problem or out.how, **out.event()})
        try:
            return Opened(self._take(*spooldb.open_file(self.path, tuple(Kind))))
        except (sqlite3.Error, spooldb.Corrupt) as e:
            if not spooldb.is_corruption(e):
                raise SpoolError(f"cannot open spool {self.path}: {e}") from e
            return self.recover(e, last_id=0)

    def recover(self, err: BaseException, last_id: int) -> Opened:
        """Closes the corrupt file, recovers it (:func:`recover`) and opens what is left.

        Args:
            err: The corruption found. last_id: The highest id the Spool has handed out: the recovered file
                never hands out a lower one.

        Raises:
            SpoolError: The file cannot be set aside or the recovered one opened (retried at the next flush).
        """
        db, self.db = self.db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                pass  # it is corrupt; closing is best effort
        try:
            out = recover(self.path, self._clock.time(), tuple(Kind), self.disk.floor)
        except OSError as e:
            raise SpoolError(f"spool {self.path} is corrupt ({err}) and cannot be moved aside: {e}") from e
        log.error("spool %s is corrupt (%s); %s%s; %s", self.path, err, out.how,
                  f", moved to {out.moved_to}" if out.moved_to else "", out.saved.summary())
        self._emit("spool_corrupt", {"error": str(err), "path": self.path, **out.event()})
        floor = max(last_id, out.saved.last_id)
        try:
            db, st = spooldb.open_file(self.path, tuple(Kind))
            if floor:
                # Persist the id floor now: the new file must never hand out ids below what was published.
                db.execute("INSERT INTO meta(key, value) VALUES ('last_id', ?) ON CONFLICT(key) DO UPDATE"
                           " SET value = MAX(value, excluded.value)", (floor,))
            return Opened(self._take(db, st), out)
        except (sqlite3.Error, spooldb.Corrupt) as e:
            raise SpoolError(f"cannot open the recovered spool at {self.path}: {e}") from e

    def close(self) -> None:
        """Closes the connection (idempotent); a failure is logged, not raised."""
        db, self.db = self.db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error as e:
                log.warning("closing spool %s: %s", self.path, e)

    def _take(self, db: sqlite3.Connection, st: spooldb.FileState) -> spooldb.FileState:
        try:
            self.disk.configure(db, sum(st.sizes.values()))
        except sqlite3.Error:
            db.close()
            raise
        self.db = db
        return st
