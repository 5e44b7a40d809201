"""Crash accounting per model file, and the quarantine that follows too many crashes in a row.

A file is identified by its content (SHA-256), so a replaced file starts clean and a renamed copy of a bad
file stays quarantined. A success resets the file's count.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass

from device.runtime.errors import ModelQuarantined


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
        wall: returns wall-clock seconds, for the entry's timestamp.
    """

    def __init__(self, threshold: int = 3, wall=time.time) -> None:
        if threshold < 1:
            raise ValueError("threshold must be >= 1")
        self.threshold = threshold
        self._wall = wall
        self._counts: dict[str, int] = {}
        self._entries: dict[str, QuarantineEntry] = {}
        self._digests: dict[tuple, str] = {}
        self._lock = threading.Lock()

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
            if n >= self.threshold and d not in self._entries:
                self._entries[d] = QuarantineEntry(path, d, n, reason, self._wall())
                return True
        return False

    def succeeded(self, path: str) -> None:
        """Resets the crash count of ``path`` after it served a request."""
        try:
            d = self.digest(path)
        except OSError:
            return
        with self._lock:
            self._counts.pop(d, None)

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
            self._counts.pop(sha256, None)
            return self._entries.pop(sha256, None) is not None
