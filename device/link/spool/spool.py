"""The durable on-disk spool: every result, event and telemetry record is written here before it is published.

Workflow: producers call :meth:`Spool.put`, which only appends to an in-memory pending batch and returns the
message id. A background thread (``spool``, :meth:`Spool.start`) calls :meth:`Spool.flush` as soon as a put
arrives (classic group commit: while one commit and its fsync run, and for a 4 ms breather before the next, later
puts gather into the next), and ``commit_interval_s`` after the first ack of a batch for acks alone, so deletes
stay batched. It sleeps on a condition otherwise: until a put, an ack's interval, the oldest row's ``max_age_s``,
or a failed commit's retry (every interval) is due. Listeners (:meth:`Spool.on_durable`; the link's wake-up)
are called when new rows are durable. While the reader acks what it reads, a commit of new rows also sets the
deadline for their acks: ``commit_interval_s`` after that commit, what was acked by then is deleted. An ack wakes
the thread only when it sleeps past the ack's own deadline, so a message read and acked at once costs the thread
two wake-ups (its put, its delete), not three.
A flush writes the whole batch, the pending acks (DELETE) and the budget enforcement in ONE SQLite
transaction. The MQTT publisher reads committed messages in id order with :meth:`Spool.batch`, publishes them
at QoS 1 and calls :meth:`Spool.ack` on PUBACK; acked rows go away at the next commit.

Ids are unique and strictly increasing, across restarts and even across a spool reset:
``id = max(last_id + 1, int(clock.time() * 1e6))``. ``last_id`` is persisted in the ``meta`` table in the same
transaction as the rows, so a clock that steps backwards (no RTC, NTP correction) cannot reuse an id, and the
clock floor keeps a fresh spool (after corruption) above the ids the broker has already seen.

What survives what:

* The file is SQLite in WAL mode with ``synchronous=FULL``: a COMMIT returns only after the WAL is fsynced,
  so a committed transaction survives a process crash AND a power cut (if the storage honours fsync; cheap SD
  cards that lie about flushes void every software guarantee). Transactions are atomic and commit in id
  order: after a crash the spool holds a prefix of the batches, never half a batch, so no message is missing
  between two committed ones.
* The loss window is the pending batch: messages put since the last commit started live only in memory and
  are lost on a crash or power cut. At a board's pace that is about one commit (put to durable: 5.4 ms p50 on
  the build VM); under a flood it is the commit in progress plus the one gathering. ``durable_id`` tells which
  ids are safe. A SIGKILL loses the same window; it cannot tear a commit.
* Group commit keeps the fsync count at one per commit, not one per message (FULL costs an fsync per commit,
  about 6k commits/s at best, so one per message would not keep up with a flood).
* A file that is not a database, fails ``PRAGMA quick_check`` or raises a corruption error is recovered
  (:mod:`device.link.spool.open`): repaired in place when only its indexes are bad, else every readable row
  is copied with its id into a fresh file and the original (with its -wal/-shm) is moved aside to
  ``<path>.corrupt-<UTC YYYYmmddTHHMMSSZ>``; ``on_event("spool_corrupt", ...)`` says how, and how many
  messages were salvaged and lost. Recovery runs at open or on the commit thread, never on the publisher's:
  :meth:`Spool.batch` returns nothing while it is due or running. Environmental errors (permissions, disk
  full, I/O errors, a locked file) are NOT corruption: they raise :class:`SpoolError`, the file stays put.

The budget (``max_bytes``) counts what the rows cost on disk: payload, table and index pages and the WAL's
bound, and a floor of free space is kept on the filesystem (:mod:`device.link.spool.disk`: the WAL is bounded,
so a nearly full disk never stalls the spool for good). Over budget, telemetry goes first, then results, then
events, oldest first; rows older than ``max_age_s`` go whatever their kind. Drops are counted per kind in
``meta`` and survive restarts until :meth:`Spool.pop_dropped` hands them to the link. ``created`` is wall
time: a board without an RTC that stamps messages before its clock is set may see them expire early.

The commit thread needs the GIL for every statement it runs, so a commit is a few multi-row statements, not a
statement per row: a CPU-bound Python thread would otherwise stretch each GIL hand-over to the switch interval.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from typing import Callable, Iterable

from device.threads import Thread

from device.clock import SYSTEM_CLOCK
from device.link.spool import db as spooldb, disk as spooldisk, open as spoolopen
from device.link.spool.db import KIND_NAMES as _KIND_NAMES
from device.link.spool.db import Kind, Message
from device.link.errors import SpoolCorrupt, SpoolError

log = logging.getLogger(__name__)


_MIN_GAP_S = 0.004  # least time between two commits started by puts
_LONGEST_SLEEP_S = 3600.0  # the commit thread's longest sleep with nothing due (a bound, not a pace)


class Spool:
    """A durable, ordered, budgeted message queue in one SQLite file.

    Args:
        path: The database file; its directory is created.
        clock: Wall time for ids and ``created`` (:data:`device.clock.SYSTEM_CLOCK` by default).
        commit_interval_s: Period of the background group commit (> 0).
        max_bytes: Budget of the spool on disk (> 0): payload, rows, indexes and the WAL's bound beyond an empty
            spool (:mod:`device.link.spool.disk`); a single payload may not exceed it.
        max_age_s: Committed messages older than this are dropped (> 0).
        on_event: ``callable(kind: str, data: dict)`` for ``spool_corrupt`` and ``spool_error``; it may be
            called from the commit thread.
        min_free_bytes: Free space to leave on the filesystem (:mod:`device.link.spool.disk`); None for twice
            the WAL's bound.

    Raises:
        ValueError: A parameter is out of range.
        SpoolError: The file cannot be opened (permissions, disk, locked); corruption is recovered instead.
    """

    def __init__(self, path: str, *, clock=SYSTEM_CLOCK, commit_interval_s: float = 0.05,
                 max_bytes: int = 64 * 1024 * 1024, max_age_s: float = 7 * 86400,
                 on_event: Callable[[str, dict], None] | None = None, min_free_bytes: int | None = None) -> None:
        if not isinstance(path, str) or not path:
            raise ValueError(f"path must be a non-empty str, got {path!r}")
        for name, v, types in (("commit_interval_s", commit_interval_s, (int, float)), ("max_bytes", max_bytes, int),
                               ("max_age_s", max_age_s, (int, float))):
            if isinstance(v, bool) or not isinstance(v, types) or not v > 0:
                raise ValueError(f"{name} must be a number > 0, got {v!r}")
        if min_free_bytes is not None and (isinstance(min_free_bytes, bool) or not isinstance(min_free_bytes, int)
                                           or min_free_bytes < 0):
            raise ValueError(f"min_free_bytes must be an int >= 0 or None, got {min_free_bytes!r}")
        self.path = os.path.abspath(path)
        self._min_free = min_free_bytes
        self._clock = clock
        self._interval = float(commit_interval_s)
        self._max_bytes = max_bytes
        self._max_age = float(max_age_s)
        self._on_event = on_event
        # _lock guards the in-memory state that put()/ack() touch and must never wait for I/O;
        # _db_lock serialises every use of the connection (a commit holds it across its fsync).
        self._lock = threading.Lock()
        self._db_lock = threading.RLock()
        self._pending: list[tuple] = []
        self._pending_bytes = 0
        self._acks: set[int] = set()
        self._dropped = {k: 0 for k in Kind}
        self._dropped_dirty = False
        self._count = {k: 0 for k in Kind}
        self._bytes = {k: 0 for k in Kind}
        self._oldest: float | None = None
        self._resync = False
        self._last_id = 0
        self._durable_id = 0
        self._commits = 0
        self._last_commit_ms = 0.0
        self._corrupt_recoveries = 0
        self._recovery_due: BaseException | None = None  # corruption batch() found, for the commit thread
        self._recovering = False
        self._closed = False
        self._stop = threading.Event()
        self._wakeup = threading.Condition(self._lock)  # the commit thread sleeps on it; put/close (ack) notify
        self._dirty_since: float | None = None  # monotonic time the first ack (or drop count) began to wait
        self._retry_at: float | None = None  # monotonic time a failed commit is tried again
        self._asleep_until: float | None = None  # monotonic end of the commit thread's wait (None: not waiting)
        self._acks_at: float | None = None  # monotonic time the acks of the last commit's rows are deleted
        self._acking = False  # acks arrived since the last commit of new rows: the reader is live
        self._listeners: list[Callable[[], None]] = []
        self._readable = 0  # readable_mark
        self._unheard = False  # the listeners are yet to hear of a change (the commit thread tells them)
        self._thread: threading.Thread | None = None
        self._wakeups = 0  # times the commit thread came back from a wait
        self._file = spoolopen.SpoolFile(self.path, max_bytes, min_free_bytes, clock, self._emit)
        opened = self._file.open()
        self._corrupt_recoveries += opened.outcome is not None
        self._adopt(opened, at_open=True)

    @property
    def durable_id(self) -> int:
        """The highest id known committed (0 for none): every message up to it survives a crash."""
        return self._durable_id

    @property
    def wakeups(self) -> int:
        """How many times the commit thread has come back from a wait (on a notify or its deadline)."""
        return self._wakeups

    @property
    def readable_mark(self) -> int:
        """Changes whenever :meth:`batch` may return rows it did not before (a commit of new rows, a recovery):
        a reader whose last read reached the end need not read again while it stays the same."""
        return self._readable

    def on_durable(self, listener: Callable[[], None]) -> None:
        """Calls ``listener()`` (on the committing thread; it must not block) whenever :attr:`readable_mark`
        changes."""
        self._listeners.append(listener)

    def off_durable(self, listener: Callable[[], None]) -> None:
        """Stops calling ``listener`` (unknown ones are ignored)."""
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    def _readable_changed(self) -> None:
        self._readable += 1
        if threading.current_thread() is self._thread:
            self._unheard = True  # told as the commit thread goes to sleep: the reader it wakes finds the GIL free
        else:
            self._tell()

    def _tell(self) -> None:
        self._unheard = False
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # a broken listener must not break the commit
                log.exception("spool listener failed")

    # -- producer side -------------------------------------------------------------------------------

    def put(self, kind: Kind, topic: str, payload: bytes | Callable[[int], bytes], qos: int = 1,
            retain: bool = False) -> int:
        """Queues a message for the next commit; no I/O happens on the caller's thread.

        Args:
            kind: The message's :class:`Kind` (its drop priority).
            topic: The MQTT topic: a non-empty str without wildcards or NUL.
            payload: The bytes to publish, at most ``max_bytes`` long; or ``make(id) -> bytes``, called with the
                message's id under the spool's lock, so a payload can carry its own id (results do, so
                consumers can order and de-duplicate them).
            qos: MQTT QoS 0, 1 or 2.
            retain: The MQTT retain flag.

        Returns:
            The message id, unique and greater than every id assigned before (also across restarts).

        Raises:
            ValueError: A field is malformed; the message names it.
            SpoolError: The spool is closed.
        """
        if not isinstance(kind, Kind):
            raise ValueError(f"kind must be a Kind, got {kind!r}")
        if not isinstance(topic, str) or not topic:
            raise ValueError(f"topic must be a non-empty str, got {topic!r}")
        if "+" in topic or "#" in topic or "\x00" in topic:
            raise ValueError(f"topic must not contain wildcards (+, #) or NUL, got {topic!r}")
        try:
            encoded = len(topic.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise ValueError(f"topic must be valid UTF-8, got {topic!r}") from e
        if encoded > 65535:
            raise ValueError(f"topic is {encoded} bytes long, MQTT allows 65535")
        build = payload if callable(payload) else None
        if build is None:
            self._check_payload(payload)
        if isinstance(qos, bool) or qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        if not isinstance(retain, bool):
            raise ValueError(f"retain must be a bool, got {retain!r}")
        with self._lock:
            if self._closed:
                raise SpoolError(f"spool {self.path} is closed")
            now = self._clock.time()
            mid = max(self._last_id + 1, int(now * 1e6))
            if build is not None:
                payload = build(mid)
                self._check_payload(payload)
            self._last_id = mid
            self._pending.append((mid, int(kind), topic, payload, qos, int(retain), now, len(payload)))
            self._pending_bytes += len(payload)
            if len(self._pending) == 1:  # the first of a batch wakes the commit thread; later ones join it
                self._wakeup.notify()
        return mid

    def _check_payload(self, payload: object) -> None:
        if not isinstance(payload, bytes):
            raise ValueError(f"payload must be bytes, got {type(payload).__name__}")
        if len(payload) > self._max_bytes:
            raise ValueError(f"payload of {len(payload)} bytes exceeds the spool budget of {self._max_bytes}")

    # -- publisher side ------------------------------------------------------------------------------

    def batch(self, after_id: int, limit: int) -> list[Message]:
        """Returns committed messages with ``id > after_id`` in id order, skipping ids acked but not yet deleted.

        Args:
            after_id: The highest id the caller already has (0 for all).
            limit: Maximum number of messages (>= 0).

        Returns:
            Up to ``limit`` messages, oldest id first; none while a corrupt file waits for (or is in) recovery,
            which this call never runs: the commit thread does (or the next :meth:`flush`).

        Raises:
            ValueError: ``after_id`` or ``limit`` is not an int, or ``limit`` is negative.
            SpoolError: The read failed, or the spool is closed.
        """
        for name, v in (("after_id", after_id), ("limit", limit)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an int, got {v!r}")
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        if limit == 0:
            return []
        with self._lock:
            acked = {i for i in self._acks if i > after_id}
        with self._db_lock:
            if self._recovery_due is not None or self._recovering:
                return []
            self._check_open()
            try:
                rows = self._file.db.execute(
                    "SELECT id, kind, topic, payload, qos, retain, created FROM messages"
                    " WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit + len(acked))).fetchall()
            except (sqlite3.Error, spooldb.Corrupt) as e:
                if not spooldb.is_corruption(e):
                    raise SpoolError(f"cannot read from spool {self.path}: {e}") from e
                log.error("spool %s: corrupt (%s); the commit thread recovers it", self.path, e)
                self._recovery_due = e
                with self._lock:
                    self._wakeup.notify()
                return []
        out = [Message(r[0], Kind(r[1]), r[2], bytes(r[3]), r[4], bool(r[5]), r[6]) for r in rows
               if r[0] not in acked]
        return out[:limit]

    def ack(self, ids: Iterable[int]) -> None:
        """Marks messages as delivered; they are deleted at the next commit. Unknown ids are ignored.

        Args:
            ids: Message ids the broker acknowledged.

        Raises:
            ValueError: An id is not an int.
        """
        got = []
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int):
                raise ValueError(f"ack ids must be ints, got {i!r}")
            got.append(i)
        with self._lock:
            if got:
                self._acking = True
                self._mark_dirty_locked()  # deleted commit_interval_s from the first ack on
            self._acks.update(got)

    def pop_dropped(self) -> dict[str, int]:
        """Returns the drop counters per kind and resets them (durably at the next commit).

        Returns:
            ``{"telemetry": n, "result": n, "event": n}``.
        """
        with self._db_lock, self._lock:  # not while a commit is writing the old values
            out = {_KIND_NAMES[k]: n for k, n in self._dropped.items()}
            self._dropped = {k: 0 for k in Kind}
            self._dropped_dirty = True
            self._mark_dirty_locked()
        return out

    def _mark_dirty_locked(self) -> None:
        """Acks or drop counters wait for a commit: the commit thread commits them an interval from now.

        The thread is woken only when it sleeps past that deadline; awake, it sees the deadline before it sleeps.
        """
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()
            if self._asleep_until is not None and self._asleep_until > self._dirty_since + self._interval:
                self._wakeup.notify()

    # -- commit --------------------------------------------------------------------------------------

    def flush(self) -> int:
        """Commits the pending batch, the pending acks and the budget in one transaction.

        A corrupt file found by :meth:`batch` is recovered first, on the caller's thread.

        Returns:
            The number of messages committed.

        Raises:
            SpoolError: The write failed (disk full, I/O error, closed); the batch and acks are kept for the
                next flush. SpoolCorrupt if the file turned out corrupt: the message says what became of it.
        """
        if self._recovery_due is not None:
            self._recover(self._recovery_due)
        total = 0
        while True:  # again only when held rows may fit in the pages the acks just freed
            n, again = self._flush_once()
            total += n
            if not again:
                return total

    def _flush_once(self) -> tuple[int, bool]:
        err, grew = None, False
        with self._db_lock:
            self._check_open()
            with self._lock:
                rows, self._pending, self._pending_bytes = self._pending, [], 0
                acks, self._acks, self._dirty_since, self._acks_at = self._acks, set(), None, None
                dirty, self._dropped_dirty = self._dropped_dirty, False
            # Near the floor of free space: telemetry is refused, what does not fit waits (one statvfs).
            room = self._file.disk.admit(rows, Kind.TELEMETRY)
            if room.low:
                rows = room.rows
                with self._lock:
                    self._hold_locked(room.held)
                    self._dropped[Kind.TELEMETRY] += len(room.refused)
                    dirty = dirty or bool(room.refused)
            if rows or acks or dirty or self._maintenance_due():
                t0 = time.perf_counter()
                try:
                    grew = self._commit(rows, acks)
                except (sqlite3.Error, spooldb.Corrupt) as e:
                    err = e
                    with self._lock:
                        self._hold_locked(rows)
                        self._acks |= acks
                        self._dropped_dirty = self._dropped_dirty or dirty
                        if acks or dirty:
                            self._mark_dirty_locked()
                    self._resync = True  # a failed COMMIT leaves our running totals in doubt
                    if not spooldb.is_corruption(e):
                        spooldisk.checkpoint(self._file.db)  # give the WAL's pages back to a full disk
                        raise SpoolError(f"cannot write to spool {self.path}: {e}") from e
                else:
                    self._commits += 1
                    self._last_commit_ms = (time.perf_counter() - t0) * 1000.0
        if grew:  # outside the lock: a reader woken by it does not wait for this commit to let go
            with self._lock:
                if self._acking:  # the reader acks what it reads: these rows' acks are deleted an interval from now
                    self._acks_at, self._acking = time.monotonic() + self._interval, False
            self._readable_changed()
        if err is not None:  # outside the lock: batch() returns nothing meanwhile instead of waiting
            out = self._recover(err)
            raise SpoolCorrupt(f"spool {self.path} was corrupt ({err}); {out.how}"
                               + (f", the damaged file is kept at {out.moved_to}" if out.moved_to else "")) from err
        if room.held and not acks:
            raise SpoolError(f"{room.low}; {len(room.held)} message(s) wait in memory for room")
        return len(rows), bool(room.held)

    def _hold_locked(self, rows: list) -> None:
        # Uncommitted rows go back in front of the batch (their ids are lower), under the budget.
        if rows:
            self._pending[:0] = rows
            self._pending_bytes += sum(r[7] for r in rows)
            self._trim_pending_locked()

    def _maintenance_due(self) -> bool:
        if sum(self._bytes.values()) > self._file.disk.payload_limit() or self._resync:
            return True
        return self._oldest is not None and self._oldest < self._clock.time() - self._max_age

    def _commit(self, rows: list[tuple], acks: set[int]) -> bool:
        """Commits; True when the durable id grew."""
        done = spooldb.commit(self._file.db, rows, acks, counts=self._count, sizes=self._bytes, dropped=self._dropped,
                              cutoff=self._clock.time() - self._max_age, max_bytes=self._file.disk.payload_limit(),
                              recount=self._resync)
        # Only now is it durable: publish the new state.
        grew = done.last_id > self._durable_id
        self._durable_id = max(self._durable_id, done.last_id)
        self._count, self._bytes, self._oldest, self._resync = done.counts, done.sizes, done.oldest, False
        with self._lock:
            # pop_dropped cannot run during a commit (it takes _db_lock), so these are the values we wrote.
            self._dropped = done.dropped
        try:
            self._file.disk.measure(self._file.db, sum(done.sizes.values()))
        except sqlite3.Error as e:  # committed all the same; the last measurement stands
            log.debug("spool %s: page counts not read: %s", self.path, e)
        return grew

    def _trim_pending_locked(self) -> None:
        # While commits fail (disk full) the batch grows in RAM; hold it to the same budget and priority.
        excess = self._pending_bytes - self._max_bytes
        for kind in Kind:
            if excess <= 0:
                return
            keep = []
            for r in self._pending:
                if excess > 0 and r[1] == kind:
                    excess -= r[7]
                    self._pending_bytes -= r[7]
                    self._dropped[kind] += 1
                    self._dropped_dirty = True
                    self._mark_dirty_locked()
                else:
                    keep.append(r)
            self._pending = keep

    # -- the file ------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolError(f"spool {self.path} is closed")
        if self._file.db is None:
            raise SpoolError(f"spool {self.path} has no open file: its recovery failed (retried at the next flush)")

    def _adopt(self, opened: spoolopen.Opened, at_open: bool) -> None:
        """Takes over what the file holds after an open or a recovery; at runtime the counters in memory are
        newer than the file's, except for what a recovery set aside."""
        st, out = opened.state, opened.outcome
        with self._db_lock:
            self._count, self._bytes, self._oldest = st.counts, st.sizes, st.oldest
            self._durable_id = max(self._durable_id, st.last_id)
            with self._lock:
                # max(): after a runtime recovery the ids already handed out still bound the next one.
                self._last_id = max(self._last_id, st.last_id, out.saved.last_id if out else 0)
                for k in Kind:
                    self._dropped[k] += st.meta.get(f"dropped_{_KIND_NAMES[k]}", 0) if at_open else 0
                    if at_open and out is not None and out.how != spoolopen.IN_PLACE:
                        # a file repaired in place still holds its own counters; a copy's come from the old file
                        self._dropped[k] += out.saved.meta.get(f"dropped_{_KIND_NAMES[k]}", 0)
                self._dropped_dirty = self._dropped_dirty or not at_open or (
                    out is not None and out.how != spoolopen.IN_PLACE)
                if self._dropped_dirty:
                    self._mark_dirty_locked()

    def _recover(self, err: BaseException) -> spoolopen.Outcome:
        """Recovers the corrupt file on this thread (the commit thread); batch() waits for nothing meanwhile.

        Raises:
            SpoolError: The file cannot be set aside or the recovered one opened (retried at the next flush).
        """
        with self._db_lock:
            self._recovery_due, self._recovering = err, True
        try:
            with self._lock:
                last_id = self._last_id
            opened = self._file.recover(err, last_id)
            self._corrupt_recoveries += 1
            self._resync = False
            self._adopt(opened, at_open=False)
            self._recovery_due = None
            return opened.outcome
        finally:
            self._recovering = False
            self._readable_changed()  # what batch() withheld meanwhile (or the recovered file) is there to read

    def _emit(self, kind: str, data: dict) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(kind, data)
        except Exception:  # a broken listener must not break the spool
            log.exception("spool event listener failed on %s", kind)

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the background group-commit thread (idempotent).

        Raises:
            SpoolError: The spool is closed.
        """
        with self._db_lock:
            self._check_open()
            if self._thread is None:
                self._thread = Thread(target=self._run, name="spool", daemon=True)
                self._thread.start()

    def _due_locked(self) -> float:
        """Seconds until the commit thread has work (0: now), under ``_lock``."""
        now = time.monotonic()
        if self._retry_at is not None:  # a commit failed: everything waits for the retry
            return self._retry_at - now
        if self._pending or self._recovery_due is not None:
            return 0.0
        due = _LONGEST_SLEEP_S
        if self._dirty_since is not None:
            due = self._dirty_since + self._interval - now
        if self._acks_at is not None:  # the last rows' acks (if any came) are deleted then; else nothing happens
            due = min(due, self._acks_at - now)
        if self._oldest is not None:  # rows past max_age_s go at a commit
            due = min(due, self._oldest + self._max_age - self._clock.time() + 0.001)
        return due

    def _sleep(self) -> tuple[bool, bool]:
        """Sleeps until a commit is due or the spool closes: ``(closing, slept)``."""
        slept = False
        if self._unheard:
            self._tell()
        with self._lock:
            while not self._stop.is_set():
                due = self._due_locked()
                if due <= 0:
                    return False, slept
                self._asleep_until = time.monotonic() + due
                try:
                    self._wakeup.wait(due)
                finally:
                    self._asleep_until = None
                self._wakeups += 1
                slept = True
        return True, slept

    def _run(self) -> None:
        failing = False
        while True:
            # Group commit: a put wakes the thread at once; while one commit (and its fsync) runs, later
            # puts gather into the next one. Acks alone wait for the interval, so deletes stay batched.
            closing, slept = self._sleep()
            if closing:
                break
            # Under a flood (work was waiting as the last commit ended), a short breather lets the next group
            # grow: fewer, larger commits. A put that found the thread asleep is committed at once.
            if not slept and self._stop.wait(min(_MIN_GAP_S, self._interval)):
                break
            try:
                self.flush()
            except Exception as e:  # the commit thread must outlive any single failure
                with self._lock:
                    self._retry_at = time.monotonic() + self._interval
                if not failing:
                    log.warning("spool commit failed, will retry: %s", e)
                    self._emit("spool_error", {"error": str(e), "path": self.path})
                failing = True
            else:
                with self._lock:
                    self._retry_at = None
                if failing:
                    log.info("spool commits resumed on %s", self.path)
                failing = False

    def close(self) -> None:
        """Stops the commit thread, flushes what is pending and closes the file (idempotent).

        Raises:
            SpoolError: The final flush failed; the pending messages are lost.
        """
        if self._closed:
            return
        self._stop.set()
        with self._lock:
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join()
        with self._db_lock:
            if self._closed:
                return
            try:
                self.flush()
            finally:
                with self._lock:
                    self._closed = True
                self._file.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """A snapshot for status and diag.

        Returns:
            A dict: messages, bytes, oldest_age_s, by_kind, bytes_by_kind, dropped, pending, pending_bytes,
            commits, last_commit_ms, durable_id, corrupt_recoveries, path.
        """
        with self._lock:
            pending, pending_bytes = len(self._pending), self._pending_bytes
            dropped = {_KIND_NAMES[k]: n for k, n in self._dropped.items()}
        oldest = self._oldest
        return {
            "messages": sum(self._count.values()),
            "bytes": sum(self._bytes.values()),
            "oldest_age_s": 0.0 if oldest is None else max(0.0, self._clock.time() - oldest),
            "by_kind": {_KIND_NAMES[k]: n for k, n in self._count.items()},
            "bytes_by_kind": {_KIND_NAMES[k]: n for k, n in self._bytes.items()},
            "dropped": dropped,
            "pending": pending,
            "pending_bytes": pending_bytes,
            "commits": self._commits,
            "last_commit_ms": self._last_commit_ms,
            "durable_id": self._durable_id,
            "corrupt_recoveries": self._corrupt_recoveries,
            "path": self.path,
        }
