"""The client's seams to python-tuf: its exceptions translated into the update family, the role being read, the
trusted set, and the "not before" clock guard.

Everything that touches python-tuf's private state lives in :func:`trusted_set` and :func:`updater`, and only
there.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import re
from typing import Iterator
from urllib.parse import unquote, urlparse

from tuf.api import exceptions as tuf_exc
from tuf.ngclient import FetcherInterface

from device.statefile import set_aside, write_atomic
from device.update.errors import (ClockError, DownloadError, ExpiredError, HashMismatch, MetadataError, NoSpace,
                                  RollbackError, SignatureError, SizeError, StoreError, ThresholdError, UpdateError)

log = logging.getLogger(__name__)

CLOCK_SLACK_S = 300.0  # an NTP step of a few minutes back is not a board that lost its time
MAX_STATE_BYTES = 4096
_SIGNED_BY = re.compile(r"(\S+) was signed by (\d+)/(\d+) keys")
_EXPIRED = re.compile(r"(\S+?)(?:\.json)? is expired")
_ROLE_FILE = re.compile(r"(?:[0-9]+\.)?(.+)\.json\Z")


class RoleTracking(FetcherInterface):
    """Wraps the delivery path's fetcher: remembers which metadata file was asked for last (so an error can name
    its role), and turns any exception raised while its bytes stream into a ``DownloadError``, as python-tuf's
    ``fetch()`` does for exceptions raised before the first byte."""

    def __init__(self, inner: FetcherInterface) -> None:
        self.inner = inner
        self.last_url: str | None = None

    def _fetch(self, url: str) -> Iterator[bytes]:  # never called: fetch() is overridden to wrap inner.fetch()
        return self.inner.fetch(url)

    def fetch(self, url: str) -> Iterator[bytes]:
        self.last_url = url
        try:
            chunks = self.inner.fetch(url)
        except tuf_exc.DownloadError as exc:
            if isinstance(exc.__cause__, UpdateError):  # a refusal (a stick's link or FIFO): said as it is
                raise exc.__cause__ from None
            raise
        return _guarded(url, chunks)

    def role(self) -> str:
        """The role of the metadata file fetched last (``root`` before any)."""
        if not self.last_url:
            return "root"
        m = _ROLE_FILE.match(os.path.basename(urlparse(self.last_url).path))
        return unquote(m.group(1)) if m else "metadata"


def _guarded(url: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
    try:
        yield from chunks
    except (tuf_exc.DownloadError, UpdateError):
        raise
    except Exception as exc:  # a pulled stick, a reset connection: a download failure like any other
        raise tuf_exc.DownloadError(f"{url}: {type(exc).__name__}: {exc}") from exc


def map_tuf_error(exc: BaseException, role: str) -> UpdateError:
    """One of our codes for an exception raised by python-tuf while reading ``role``'s metadata.

    Returns:
        The error to raise (``raise map_tuf_error(exc, role) from exc``).
    """
    text = str(exc) or type(exc).__name__
    if isinstance(exc, tuf_exc.UnsignedMetadataError):
        m = _SIGNED_BY.search(text)
        if m and int(m.group(2)) > 0:
            return ThresholdError(f"{m.group(1)} metadata is signed by {m.group(2)} of the {m.group(3)} trusted keys "
                                  f"its threshold needs ({text})")
        name = m.group(1) if m else role
        return SignatureError(f"{name} metadata carries no valid signature of the keys it must be signed by: a wrong "
                              f"key or altered bytes ({text})")
    if isinstance(exc, tuf_exc.BadVersionNumberError):  # EqualVersionNumberError included
        return RollbackError(f"{role} metadata is older than what this board already trusts: replayed or rolled "
                             f"back ({text})")
    if isinstance(exc, tuf_exc.ExpiredMetadataError):
        m = _EXPIRED.search(text)  # "Final root.json is expired" comes while the timestamp is read
        role = m.group(1) if m else role
        return ExpiredError(f"{role} metadata has expired ({text}): the repository was not re-signed, or its files "
                            f"are being held back (a freeze)")
    if isinstance(exc, tuf_exc.LengthOrHashMismatchError):
        return HashMismatch(f"{role} metadata is not the file its signed length and hash name ({text})")
    if isinstance(exc, tuf_exc.DownloadLengthMismatchError):
        return SizeError(f"{role} metadata is longer than allowed ({text})")
    if isinstance(exc, tuf_exc.DownloadError):
        return DownloadError(f"{role} metadata could not be fetched ({text})")
    if isinstance(exc, OSError):  # python-tuf writing its metadata directory
        cls = NoSpace if exc.errno == errno.ENOSPC else StoreError
        return cls(f"cannot keep {role} metadata on the board ({exc.strerror or exc})")
    # DeserializationError, another RepositoryError, ValueError/KeyError/TypeError from a malformed document.
    return MetadataError(f"{role} metadata is malformed or inconsistent ({type(exc).__name__}: {text})")


def trusted_set(updater):
    """python-tuf's verified metadata of a refreshed ``Updater`` (``root``, ``targets``... and ``reference_time``).

    python-tuf has no public way to list the targets of the trusted top-level targets role or to judge expiry at
    a time other than its own ``datetime.now()``: this is the one place that reaches into its private state, so a
    change of python-tuf breaks here, loudly, and nowhere else.
    """
    trusted = updater._trusted_set  # noqa: SLF001 (see the docstring)
    if not hasattr(trusted, "reference_time"):
        raise MetadataError("this python-tuf keeps no reference_time: the board cannot judge expiry at its clock")
    return trusted


def updater(metadata_dir: str, metadata_url: str, fetcher: FetcherInterface, bootstrap: bytes):
    """python-tuf's ``Updater`` whose every metadata write goes through our atomic writer.

    python-tuf persists each verified file with a rename but no fsync (``Updater._persist_file``); after a power
    cut the file can come back empty, python-tuf then drops it, and the next refresh accepts any validly signed
    older timestamp or snapshot: rollback protection would fall back to expiry. Written through
    :func:`~device.statefile.write_atomic` instead (fsync of the file, ``os.replace``, fsync of the directory),
    each file is durable the moment python-tuf has accepted it, also during a refresh that is refused later (a
    timestamp accepted before the snapshot is refused stays trusted). Like :func:`trusted_set`, this reaches into
    python-tuf's private API, and checks that it is still there.

    Raises:
        MetadataError: This python-tuf has no ``_persist_file`` to override.
    """
    from tuf.ngclient import Updater

    if not callable(vars(Updater).get("_persist_file")):
        raise MetadataError("this python-tuf has no Updater._persist_file: the board cannot keep its trusted "
                            "metadata durably")

    class DurableUpdater(Updater):
        def _persist_file(self, filename: str, data: bytes) -> None:
            write_atomic(filename, data, mode=0o644)  # public metadata; durable before python-tuf moves on

    return DurableUpdater(metadata_dir, metadata_url, fetcher=fetcher, bootstrap=bootstrap)


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class NotBefore:
    """The persisted "not before" time: the latest wall-clock time a successful refresh ran at.

    A board without a real-time clock can boot in 1970 (or at its last shutdown); judged at such a time,
    expired metadata looks fresh and a replayed repository goes unnoticed. The only trustworthy evidence of
    the present the board keeps is that it once refreshed successfully at a time it believed then, so a clock
    that reads earlier than that (by more than :data:`CLOCK_SLACK_S`) is refused before python-tuf judges
    expiry. A corrupt state file is set aside and counts as no evidence.
    """

    def __init__(self, path: str, slack_s: float = CLOCK_SLACK_S) -> None:
        self.path = path
        self.slack_s = slack_s

    def read(self, now: float) -> float | None:
        """The stored time, or None (no file, or a corrupt one, set aside)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_STATE_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):  # never refreshed (or no directory yet: refresh says so)
            return None
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot read the update clock state ({exc.strerror or exc})") from exc
        try:
            value = json.loads(raw.decode()) if len(raw) <= MAX_STATE_BYTES else None
            seen = value["not_before"] if isinstance(value, dict) else None
            if isinstance(seen, bool) or not isinstance(seen, (int, float)) or not 0 <= seen < 2**40:
                raise ValueError("no not_before time")
        except (ValueError, KeyError) as exc:
            log.warning("update clock state %s is corrupt (%s); %s", self.path, exc, set_aside(self.path, now))
            return None
        return float(seen)

    def check(self, now: float) -> None:
        """Refuses a clock that reads earlier than the time the board has already seen.

        Raises:
            ClockError: ``now`` is before the stored time minus the slack.
        """
        seen = self.read(now)
        if seen is not None and now < seen - self.slack_s:
            raise ClockError(f"the clock reads {_iso(now)}, but this board already refreshed its updates at "
                             f"{_iso(seen)}: it cannot judge whether signed metadata has expired. Set the time "
                             f"(NTP, a real-time clock, or `date -s`); if the clock was wrong at that refresh, "
                             f"delete {self.path}")

    def advance(self, now: float) -> None:
        """Records a successful refresh at ``now`` (never moves the stored time back). Best effort: a state file
        that cannot be written costs the guard one piece of evidence, not the refresh that succeeded."""
        seen = self.read(now)
        value = now if seen is None else max(seen, now)
        doc = {"not_before": value, "utc": _iso(value)}
        try:
            write_atomic(self.path, json.dumps(doc).encode() + b"\n", mode=0o644)
        except OSError as exc:
            log.warning("cannot record the refresh time in %s (%s)", self.path, exc.strerror or exc)
