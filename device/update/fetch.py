"""How an update's bytes reach the board, with the same checks whichever way they came.

Two kinds of bytes travel:

* **Metadata** goes through python-tuf's fetcher interface (``FetcherInterface._fetch(url)``), so every TUF
  check (signatures, thresholds, versions, expiry, lengths) is python-tuf's own whichever the path:
  :class:`DirectoryFetcher` for a directory (a USB stick, a mounted share: ``file://`` URLs), python-tuf's
  ``Urllib3Fetcher`` for HTTP(S), and the MQTT fetcher of the link. A missing file is always
  ``DownloadHTTPError(..., 404)``: python-tuf ends its walk of ``N+1.root.json`` on 404 or 403 only, so any other
  error for a missing file would never end it.
* **Targets** (the encrypted models) are downloaded by :func:`download_target`, not by python-tuf, whose
  ``download_target`` streams into an unnamed temporary file, cannot resume and never fsyncs. Ours writes
  into ``<partial_dir>/<sha256>.part`` (named by the signed hash, so a partial file can only ever continue
  the same target), caps the length while streaming, fsyncs, resumes from the partial file's size after a
  dropped connection, a broker restart or a reboot, and checks the finished file with
  ``TargetFile.verify_length_and_hashes`` before anything else reads it. Only then is it renamed to
  ``<partial_dir>/<sha256>``. A :class:`RangeSource` says how to read a URL from an offset: HTTP ``Range``
  (:class:`HttpSource`), a seek (:class:`DirectorySource`), or MQTT chunk offsets.
"""

from __future__ import annotations

import errno
import logging
import os
import random
from typing import Callable, Iterator, Protocol
from urllib.parse import unquote, urlparse

from tuf.api.exceptions import DownloadHTTPError, LengthOrHashMismatchError
from tuf.ngclient import FetcherInterface

from device.clock import SYSTEM_CLOCK, backoff_delay
from device.statefile import fsync_dir
from device.update.errors import DownloadError, HashMismatch, NoSpace, SizeError

log = logging.getLogger(__name__)

CHUNK = 64 * 1024


def local_path(url: str) -> str:
    """The file a ``file://`` URL (or a plain path) names."""
    if url.startswith("file:"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise DownloadHTTPError(f"{url}: a file URL must name a local file", 404)
        return unquote(parsed.path)
    return url


def _read_from(path: str, offset: int, chunk: int) -> Iterator[bytes]:
    try:
        f = open(path, "rb")
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        raise DownloadHTTPError(f"{path}: no such file", 404) from exc
    except PermissionError as exc:
        raise DownloadHTTPError(f"{path}: permission denied", 403) from exc

    def chunks() -> Iterator[bytes]:
        with f:
            f.seek(offset)
            while True:
                data = f.read(chunk)
                if not data:
                    return
                yield data

    return chunks()


class DirectoryFetcher(FetcherInterface):
    """python-tuf's fetcher for metadata in a directory (a USB stick): ``file://`` URLs or plain paths."""

    def __init__(self, chunk_size: int = CHUNK) -> None:
        self.chunk_size = chunk_size

    def _fetch(self, url: str) -> Iterator[bytes]:
        return _read_from(local_path(url), 0, self.chunk_size)


class RangeSource(Protocol):
    """Reads a target's bytes from ``offset`` on (the resumable half of a delivery path)."""

    def read(self, url: str, offset: int) -> Iterator[bytes]:
        """Yields the bytes of ``url`` from ``offset``; raises :class:`DownloadHTTPError` (404) for a missing file,
        anything else for a transport failure (the download resumes after it)."""


class DirectorySource:
    """Targets from a directory (a USB stick): a seek to the offset."""

    def __init__(self, chunk_size: int = CHUNK) -> None:
        self.chunk_size = chunk_size

    def read(self, url: str, offset: int) -> Iterator[bytes]:
        return _read_from(local_path(url), offset, self.chunk_size)


class HttpSource:
    """Targets over HTTP(S) with ``Range: bytes=<offset>-`` (urllib3, which python-tuf already brings).

    A server that ignores the range (``200`` to a request from an offset) is read from the start and the
    bytes before the offset are skipped, so resuming never depends on the server's help.

    Args:
        timeout_s: Connect timeout and the longest gap between two received bytes.
        pool: A ``urllib3.PoolManager`` to use (tests pass one; TLS settings come with it).
    """

    def __init__(self, timeout_s: float = 30.0, pool=None, chunk_size: int = CHUNK) -> None:
        import urllib3

        self._urllib3 = urllib3
        self.pool = pool or urllib3.PoolManager(retries=urllib3.Retry(total=2, redirect=3, read=0))
        self.timeout_s = timeout_s
        self.chunk_size = chunk_size

    def read(self, url: str, offset: int) -> Iterator[bytes]:
        u3 = self._urllib3
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = self.pool.request("GET", url, headers=headers, preload_content=False,
                                     timeout=u3.Timeout(self.timeout_s))
        if response.status == 416 and offset:  # nothing past the offset: the caller checks the length
            response.release_conn()
            return iter(())
        if response.status >= 400:
            response.release_conn()
            raise DownloadHTTPError(f"{url}: HTTP {response.status}", response.status)
        skip = offset if offset and response.status == 200 else 0

        def chunks() -> Iterator[bytes]:
            nonlocal skip
            try:
                for data in response.stream(self.chunk_size):
                    if skip:
                        cut = min(skip, len(data))
                        data, skip = data[cut:], skip - cut
                    if data:
                        yield data
            finally:
                response.release_conn()

        return chunks()


def target_url(base_url: str, path: str, sha256: str, consistent: bool = True) -> str:
    """Where a target lives: ``<base>/<dir>/<sha256>.<name>`` in a consistent-snapshot repository (as
    python-tuf's ``download_target`` forms it), else ``<base>/<path>``."""
    base = base_url if base_url.endswith("/") else base_url + "/"
    if consistent:
        dirname, sep, basename = path.rpartition("/")
        path = f"{dirname}{sep}{sha256}.{basename}"
    return base + path


def download_target(target, url: str, source: RangeSource, partial_dir: str, *, attempts: int = 5,
                    backoff: tuple[float, float] = (0.5, 30.0), clock=SYSTEM_CLOCK,
                    progress: Callable[[int, int], None] | None = None,
                    rng: random.Random | None = None) -> str:
    """Downloads a TUF target into ``partial_dir``, resuming what an earlier attempt left, and verifies it.

    Args:
        target: The ``tuf.api.metadata.TargetFile`` from ``Updater.get_targetinfo`` (signed length and hashes).
        url: Where its bytes are (see :func:`target_url`).
        source: How to read ``url`` from an offset.
        partial_dir: Where the partial and finished files live (the update store's staging directory).
        attempts: Transport failures in a row before giving up; each attempt resumes from what is on disk.
        backoff: ``(min, max)`` seconds between attempts (doubling, with jitter).
        clock: Sleeps between attempts.
        progress: Called with ``(bytes on disk, length)`` after each chunk.
        rng: Randomness of the backoff jitter.

    Returns:
        The path of the verified file, ``<partial_dir>/<sha256>``.

    Raises:
        SizeError: The source sent more than the signed length (the partial file is discarded).
        HashMismatch: The finished file's length or hash is not the signed one (discarded).
        DownloadError: The file is missing at the source, or ``attempts`` failures in a row (the partial file is
            kept: the next call resumes it).
    """
    sha256 = target.hashes.get("sha256")
    if not sha256:
        raise HashMismatch(f"target {target.path} has no sha256 in its signed metadata")
    os.makedirs(partial_dir, exist_ok=True)
    done = os.path.join(partial_dir, sha256)
    if os.path.exists(done):
        _verify(target, done)
        return done
    partial = done + ".part"
    failures = 0
    while True:
        have = start = os.path.getsize(partial) if os.path.exists(partial) else 0
        if have > target.length:  # cannot be a prefix of the signed file
            os.remove(partial)
            have = start = 0
        problem = None
        if have < target.length:
            try:
                have = _append(source.read(url, have), partial, have, target.length, progress)
            except DownloadHTTPError as exc:
                if exc.status_code in (403, 404):
                    raise DownloadError(f"{target.path}: not found at {url} ({exc})") from exc
                problem = str(exc)
            except SizeError:
                os.remove(partial)
                raise
            except Exception as exc:  # a dropped connection, a broker gone, a pulled stick: resume
                if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):  # not the network's
                    raise NoSpace(f"{target.path}: no space left for the download in {partial_dir} (what arrived "
                                  f"is kept; the next attempt resumes there)") from exc
                problem = f"{type(exc).__name__}: {exc}"
                have = os.path.getsize(partial) if os.path.exists(partial) else 0
            if problem is None and have < target.length:
                problem = f"the source ended at byte {have} of {target.length}"
        if problem is not None:
            failures = 1 if have > start else failures + 1  # only failures without progress add up
            if failures >= attempts:
                raise DownloadError(f"{target.path}: {problem}; {have} of {target.length} bytes kept in "
                                    f"{partial}, the next attempt resumes there")
            log.info("download of %s interrupted (%s); resuming at byte %d", target.path, problem, have)
            clock.sleep(backoff_delay(failures - 1, backoff[0], backoff[1], rng or random.Random()))
            continue
        try:
            _verify(target, partial)
        except HashMismatch:
            os.remove(partial)
            raise
        os.replace(partial, done)
        fsync_dir(partial_dir)
        return done


def _append(chunks: Iterator[bytes], path: str, have: int, length: int,
            progress: Callable[[int, int], None] | None) -> int:
    """Appends ``chunks`` to ``path`` (fsynced however the stream ends); returns the size on disk."""
    with open(path, "ab") as f:
        try:
            for data in chunks:
                if have + len(data) > length:
                    raise SizeError(f"the source sent more than the signed length of {length} bytes")
                f.write(data)
                have += len(data)
                if progress is not None:
                    progress(have, length)
        finally:
            f.flush()
            os.fsync(f.fileno())
    return have


def _verify(target, path: str) -> None:
    try:
        with open(path, "rb") as f:
            target.verify_length_and_hashes(f)
    except LengthOrHashMismatchError as exc:
        raise HashMismatch(f"{target.path}: {exc}") from exc
