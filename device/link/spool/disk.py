"""How much disk the spool may take: its budget counts the WAL and the indexes, and it leaves a floor free.

A spool on a small or shared filesystem must keep committing when the disk is nearly full, and start again by
itself when space returns. Three things see to it:

* The WAL is bounded. SQLite checkpoints it only once it holds ``wal_autocheckpoint`` pages (1000, about
  4 MB, by default): on a 2 MB filesystem it could never get there, so the WAL filled the disk and every later
  commit failed for good. :class:`DiskBudget` sizes the checkpoint to a sixteenth of the budget or of the
  filesystem (whichever is smaller, between 16 and 1000 pages) and sets ``journal_size_limit`` to match, so a
  checkpointed WAL gives its space back; after a failed commit the spool checkpoints with TRUNCATE.
* The budget covers what the rows cost on disk, not only their payload: the WAL's bound and the table and
  index pages, measured after each commit as bytes on disk per payload byte. Only an empty spool's fixed cost
  (its schema pages and a 16-page WAL) is outside it, so a budget of a few KB still means a few KB of payload.
* A floor of free space (twice the WAL's bound unless configured) is kept: checked with ``os.statvfs`` once
  per commit group. A group that would eat into it has its telemetry refused (counted as dropped) and its
  other messages committed only as far as the room goes, in id order; the rest wait in memory under the
  budget and commit as soon as room returns (acknowledged rows free pages the spool reuses).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass

_MIN_WAL_PAGES = 16  # SQLite's default auto-checkpoint is 1000: never more, and never a checkpoint per commit
_MAX_WAL_PAGES = 1000
_WAL_FRAME = 24  # bytes of header per page in the WAL (plus 32 for the file)
_ROW_COST = 128  # a row's own bytes on disk beyond payload and topic (cell, two index entries), generously
_MEASURE_MIN_PAGES = 16  # below this the page count is too coarse to tell the rows' cost per byte


@dataclass(frozen=True)
class Admission:
    """What a commit group may write now.

    Attributes:
        rows: The id-ordered prefix of the group to commit.
        held: The rest, to keep pending (a later id than every committed one).
        refused: Telemetry rows refused because the disk is at its floor (to count as dropped).
        low: Why rows were held or refused ("" when the whole group fits).
    """

    rows: list
    held: list
    refused: list
    low: str


class DiskBudget:
    """The spool's disk accounting for one file; every method is called under the spool's db lock.

    Args:
        path: The spool file (its directory must exist).
        max_bytes: The spool's budget in bytes.
        min_free_bytes: The floor of free space; None for twice the WAL's bound.

    Raises:
        OSError: The filesystem cannot be queried.
    """

    def __init__(self, path: str, max_bytes: int, min_free_bytes: int | None = None) -> None:
        self.directory = os.path.dirname(os.path.abspath(path))
        self.max_bytes = max_bytes
        st = os.statvfs(self.directory)
        self._fs_bytes = st.f_blocks * st.f_frsize
        self._min_free = min_free_bytes
        self.page_size = 4096
        self.wal_pages = _MIN_WAL_PAGES
        self._base_pages = 0
        self._live_pages = 0
        self._free_pages = 0  # the file's freelist: pages a commit reuses without growing the file
        self._per_byte = 1.0  # bytes on disk per payload byte beyond an empty spool, as last measured

    @property
    def wal_bytes(self) -> int:
        """The WAL's bound: the auto-checkpoint size (a commit larger than it can overshoot it once)."""
        return 32 + self.wal_pages * (self.page_size + _WAL_FRAME)

    @property
    def floor(self) -> int:
        """The free space the spool leaves on its filesystem."""
        return 2 * self.wal_bytes if self._min_free is None else self._min_free

    def configure(self, db: sqlite3.Connection, payload: int) -> None:
        """Bounds the WAL of a freshly opened connection and takes the first measurement.

        Args:
            db: The spool connection (WAL mode).
            payload: Payload bytes the file holds.

        Raises:
            sqlite3.Error: A pragma failed.
        """
        self.page_size = db.execute("PRAGMA page_size").fetchone()[0]
        self.wal_pages = max(_MIN_WAL_PAGES, min(_MAX_WAL_PAGES, min(self.max_bytes, self._fs_bytes) // 16
                                                 // self.page_size))
        db.execute(f"PRAGMA wal_autocheckpoint = {self.wal_pages}")
        db.execute(f"PRAGMA journal_size_limit = {self.wal_bytes}")
        # Builds with SECURE_DELETE (Debian's, among others) zero every freed page: a delete would write one
        # WAL page per page it frees, so acknowledging a backlog could alone overrun the WAL's bound. FAST
        # still clears deleted rows inside the b-tree pages a delete writes anyway; freed overflow pages keep
        # their bytes (payloads already published or expired) until they are reused.
        db.execute("PRAGMA secure_delete = FAST")
        # An empty spool's pages: page 1 plus one root per table and index. They are outside the budget.
        self._base_pages = 1 + db.execute("SELECT COUNT(*) FROM sqlite_master WHERE rootpage > 0").fetchone()[0]
        self.measure(db, payload)

    def measure(self, db: sqlite3.Connection, payload: int) -> None:
        """Reads the file's page counts after a commit: what the rows cost on disk per payload byte.

        Args:
            db: The spool connection.
            payload: Payload bytes the file now holds.

        Raises:
            sqlite3.Error: The query failed.
        """
        pages, free = db.execute("SELECT * FROM pragma_page_count(), pragma_freelist_count()").fetchone()
        self._live_pages, self._free_pages = pages - free, free
        extra = self._live_pages - self._base_pages
        if extra >= _MEASURE_MIN_PAGES and payload > 0:
            self._per_byte = max(1.0, extra * self.page_size / payload)

    def payload_limit(self) -> int:
        """The payload bytes the budget allows once the WAL's bound and the rows' overhead are counted."""
        wal_extra = (self.wal_pages - _MIN_WAL_PAGES) * self.page_size
        return max(0, int((self.max_bytes - wal_extra) / self._per_byte))

    def admit(self, rows: list, telemetry: int) -> Admission:
        """Decides how much of a commit group fits above the floor of free space (one ``statvfs``).

        Args:
            rows: The group, in id order (spool row tuples: size at index 7, topic at 2, kind at 1).
            telemetry: The kind value of telemetry, refused first.

        Returns:
            The rows to commit now, the rows to hold, the telemetry refused.
        """
        if not rows:
            return Admission(rows, [], [], "")
        try:
            st = os.statvfs(self.directory)
        except OSError:
            return Admission(rows, [], [], "")  # cannot tell: let SQLite's own errors speak
        free = st.f_bavail * st.f_frsize
        room = free - self.floor + self._free_pages * self.page_size
        cost = [int((r[7] + len(r[2]) + _ROW_COST) * self._per_byte) for r in rows]
        if sum(cost) <= room:
            return Admission(rows, [], [], "")
        low = (f"the disk is nearly full: {free} bytes free on {self.directory}, the spool keeps "
               f"{self.floor} free")
        refused = [r for r in rows if r[1] == telemetry]
        taken, used = 0, 0
        kept = [(r, c) for r, c in zip(rows, cost) if r[1] != telemetry]
        for r, c in kept:
            if used + c > room:
                break
            taken, used = taken + 1, used + c
        return Admission([r for r, _ in kept[:taken]], [r for r, _ in kept[taken:]], refused, low)


def checkpoint(db: sqlite3.Connection) -> None:
    """Checkpoints the WAL and truncates it to zero bytes, best effort (after a failed commit: frees the disk).

    Args:
        db: The spool connection, not inside a transaction.
    """
    with contextlib.suppress(sqlite3.Error):
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
