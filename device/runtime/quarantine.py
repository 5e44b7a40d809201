"""Crash accounting per model file, and the quarantine that follows too many crashes in a row.

A file is identified by its content (SHA-256), so a replaced file starts clean and a renamed copy of a bad
file stays quarantined. A success resets the file's count.

Only what the model causes is counted: a worker dying of a fault signal or an exit while it loads or serves the
file, or hanging. A worker killed from outside (SIGKILL from an operator or the OOM killer) is not, unless such
kills come at a rate: :data:`KILLS_PER_CRASH` of them within :data:`KILL_WINDOW_S` count one crash
(:meth:`Quarantine.killed`), so a model that is OOM-killed at every load is still quarantined in the end, while
a technician killing workers by hand never quarantines anything. Kills are counted in memory only.

With a ``path``, the state survives agent restarts and reboots: it is loaded when the :class:`Quarantine` is
made and rewritten (atomically: temporary file, fsync, rename, directory fsync) after every change. Changes
are rare (a worker crash, the first success of a file that had crashed, an operator's release), so no write
ever happens on the per-request path. The file is a small JSON object::

    {"version": 1,
     "entries": [{"path": "...", "sha256": "<64 hex>", "crashes": 3, "reason": "...", "since": 1712345678.5}],
     "counts": {"<64 hex>": 2}}

``entries`` are the quarantined files; ``counts`` the consecutive crashes per file digest. A file that
cannot be parsed is moved aside to ``<path>.corrupt-<UTC YYYYmmddTHHMMSSZ>`` for a technician and the quarantine
starts empty; an unreadable or unwritable file is logged and the quarantine carries on in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from device.runtime.errors import ModelQuarantined
from device.statefile import set_aside, short_error, write_atomic

log = logging.getLogger(__name__)

FILE_VERSION = 1
SHA256_RE = re.compile(r"[0-9a-f]{64}")  # how a file digest is written here and in commands
_ENTRY_FIELDS = ("path", "sha256", "crashes", "reason", "since")
KILLS_PER_CRASH = 5  # kills from outside of one file's workers, while loading or serving, that count one crash
KILL_WINDOW_S = 600.0  # ... when they come within this many seconds


@dataclass(frozen=True)
class QuarantineEntry:
    """A quarantined model file: where it was, its digest, why, and when (wall-clock seconds)."""

    path: str
    sha256: str
    crashes: int
    reason: str
    since: float


class Quarantine:
    """Counts consecutive worker crashes per model file and quarantines a file after ``threshold``.

    Args:
        threshold: consecutive crashes (or hangs) that quarantine a file.
        wall: returns wall-clock seconds, for the entry's timestamp and the name of a corrupt file moved aside.
        path: the JSON file that keeps the state across restarts; None keeps it in memory only. Its
            directory is created when missing.
        monotonic: returns monotonic seconds, for the window of kills from outside (:meth:`killed`).

    Raises:
        ValueError: ``threshold`` is below 1. A bad or unreadable state file never raises: it is logged.
    """

    def __init__(self, threshold: int = 3, wall=time.time, path: str | None = None,
                 monotonic=time.monotonic) -> None:
        if threshold < 1:
            raise ValueError("threshold must be >= 1")
        self.threshold = threshold
        self.path = path
        self._wall = wall
        self._monotonic = monotonic
        self._kills: dict[str, list[float]] = {}  # digest -> when its workers were killed from outside
        self._counts: dict[str, int] = {}
        self._entries: dict[str, QuarantineEntry] = {}
        self._digests: dict[tuple, str] = {}
        self._write_errors: set[str] = set()  # each distinct write failure is logged once
        self._lock = threading.Lock()
        if path is not None:
            self._load()

    def digest(self, path: str) -> str:
        """SHA-256 of the file, cached by (path, size, mtime)."""
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        d = self._digests.get(key)
        if d is None:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            d = self._digests[key] = h.hexdigest()
        return d

    def is_quarantined(self, path: str) -> bool:
        try:
            return self.digest(path) in self._entries
        except OSError:
            return False

    def check(self, path: str) -> None:
        """Raises ModelQuarantined when ``path`` is quarantined."""
        try:
            d = self.digest(path)
        except OSError:
            return
        e = self._entries.get(d)
        if e is not None:
            raise ModelQuarantined(
                f"model file {path} is quarantined after {e.crashes} consecutive worker crashes ({e.reason})"
            )

    def crashed(self, path: str, reason: str) -> bool:
        """Records a crash of ``path``; returns True when this crash quarantined it."""
        try:
            d = self.digest(path)
        except OSError:
            return False
        with self._lock:
            n = self._counts.get(d, 0) + 1
            self._counts[d] = n
            quarantined = n >= self.threshold and d not in self._entries
            if quarantined:
                self._entries[d] = QuarantineEntry(path, d, n, reason, self._wall())
            self._save()
        return quarantined

    def killed(self, path: str) -> bool:
        """Records that a worker loading or serving ``path`` was killed from outside (not by a fault of the
        model); returns True when this kill is the :data:`KILLS_PER_CRASH`-th within :data:`KILL_WINDOW_S`,
        and so counts as one crash (the caller then records it with :meth:`crashed`; the kills start over)."""
        try:
            d = self.digest(path)
        except OSError:
            return False
        now = self._monotonic()
        with self._lock:
            recent = [t for t in self._kills.get(d, ()) if now - t < KILL_WINDOW_S] + [now]
            counts = len(recent) >= KILLS_PER_CRASH
            self._kills[d] = [] if counts else recent
        return counts

    def succeeded(self, path: str) -> None:
        """Resets the crash count of ``path`` after it served a request."""
        try:
            d = self.digest(path)
        except OSError:
            return
        with self._lock:
            if self._counts.pop(d, None) is not None:
                self._save()

    def crashes(self, path: str) -> int:
        try:
            return self._counts.get(self.digest(path), 0)
        except OSError:
            return 0

    def entries(self) -> list[QuarantineEntry]:
        """The quarantined files."""
        return list(self._entries.values())

    def release(self, sha256: str) -> bool:
        """Lifts the quarantine of one file (an operator's decision); returns whether it was quarantined."""
        with self._lock:
            counted = self._counts.pop(sha256, None) is not None
            released = self._entries.pop(sha256, None) is not None
            if counted or released:
                self._save()
            return released

    # ----- the state file --------------------------------------------------------------------------------

    def _load(self) -> None:
        path = self.path
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("quarantine file %s: cannot read it (%s); starting with an empty quarantine", path,
                        short_error(exc))
            return
        try:
            entries, counts = parse_state(raw)
        except ValueError as exc:
            moved = set_aside(path, self._wall())
            log.warning("quarantine file %s: corrupt (%s); %s; starting with an empty quarantine", path, exc,
                        moved)
            return
        self._entries = {e.sha256: e for e in entries}
        self._counts = counts
        if entries:
            log.info("quarantine file %s: %d model file(s) stay quarantined: %s", path, len(entries),
                     ", ".join(f"{os.path.basename(e.path)} ({e.sha256[:12]})" for e in entries))

    def _save(self) -> None:
        """Writes the state (the caller holds ``_lock``); a failure is logged once per distinct error."""
        if self.path is None:
            return
        doc = {"version": FILE_VERSION,
               "entries": [asdict(e) for e in sorted(self._entries.values(), key=lambda e: (e.since, e.sha256))],
               "counts": dict(sorted(self._counts.items()))}
        try:
            write_atomic(self.path, (json.dumps(doc, indent=1) + "\n").encode("utf-8"))
        except OSError as exc:
            text = short_error(exc)
            if text not in self._write_errors:
                self._write_errors.add(text)
                log.warning("quarantine file %s: cannot write it (%s); the quarantine is kept in memory only "
                            "until the file can be written", self.path, text)


def parse_state(raw: bytes) -> tuple[list[QuarantineEntry], dict[str, int]]:
    """The entries and crash counts of a quarantine file's bytes.

    Args:
        raw: the file's content.

    Raises:
        ValueError: the content is not a version-1 quarantine file; the message says exactly what is wrong.
    """
    try:
        doc = json.loads(raw)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    except RecursionError as exc:
        raise ValueError("not JSON: nested too deeply") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"expected a JSON object, got {_kind(doc)}")
    if "version" not in doc:
        raise ValueError("no 'version' field")
    if type(doc["version"]) is not int or doc["version"] != FILE_VERSION:
        raise ValueError(f"version is {_show(doc['version'])}, this agent reads version {FILE_VERSION}")
    for key, kind in (("entries", list), ("counts", dict)):
        if key not in doc:
            raise ValueError(f"no '{key}' field")
        if not isinstance(doc[key], kind):
            raise ValueError(f"'{key}': expected a JSON {'array' if kind is list else 'object'}, "
                             f"got {_kind(doc[key])}")
    entries: list[QuarantineEntry] = []
    seen: set[str] = set()
    for i, e in enumerate(doc["entries"]):
        where = f"entries[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{where}: expected a JSON object, got {_kind(e)}")
        missing = [f for f in _ENTRY_FIELDS if f not in e]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        for f in ("path", "reason"):
            if not isinstance(e[f], str):
                raise ValueError(f"{where}.{f}: expected a string, got {_show(e[f])}")
        _check_sha256(e["sha256"], f"{where}.sha256")
        _check_count(e["crashes"], f"{where}.crashes")
        since = e["since"]
        if type(since) not in (int, float) or not math.isfinite(since):
            raise ValueError(f"{where}.since: expected a finite number (Unix seconds), got {_show(since)}")
        if e["sha256"] in seen:
            raise ValueError(f"{where}.sha256: {e['sha256']} is quarantined twice")
        seen.add(e["sha256"])
        entries.append(QuarantineEntry(e["path"], e["sha256"], e["crashes"], e["reason"], float(since)))
    counts: dict[str, int] = {}
    for sha, n in doc["counts"].items():
        _check_sha256(sha, "counts key")
        _check_count(n, f"counts[{sha[:12]}...]")
        if n:
            counts[sha] = n
    return entries, counts


def _check_sha256(value: Any, where: str) -> None:
    if not isinstance(value, str) or not SHA256_RE.fullmatch(value):
        raise ValueError(f"{where}: expected a SHA-256 digest (64 lowercase hex characters), got {_show(value)}")


def _check_count(value: Any, where: str) -> None:
    if type(value) is not int or value < 0:
        raise ValueError(f"{where}: expected a non-negative integer, got {_show(value)}")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else _kind(value)
    return text if len(text) <= 80 else text[:77] + "..."
