"""How an update's bytes reach the board, with the same checks whichever way they came.

Two kinds of bytes travel:

* **Metadata** goes through python-tuf's fetcher interface (``FetcherInterface._fetch(url)``), so every TUF
  check (signatures, thresholds, versions, expiry, lengths) is python-tuf's own whichever the path:
  :class:`DirectoryFetcher` for a directory (a USB stick, a mounted share: ``file://`` URLs), :class:`HttpFetcher`
  for HTTP(S) (on :class:`HttpSource`: one pool, timeout and login for metadata, targets and grants), and the MQTT
  fetcher of the link. A directory is read through regular files inside it only (:func:`open_regular`). A
  missing file is always ``DownloadHTTPError(..., 404)``: python-tuf ends its walk of ``N+1.root.json`` on 404 or
  403 only, so any other error for a missing file would never end it.
* **Targets** (the encrypted models) are downloaded by :func:`download_target`, not by python-tuf, whose
  ``download_target`` streams into an unnamed temporary file, cannot resume and never fsyncs. Ours writes
  into ``<partial_dir>/<sha256>.part`` (named by the signed hash, so a partial file can only ever continue
  the same target), caps the length while streaming, fsyncs, resumes from the partial file's size after a
  dropped connection, a broker restart or a reboot, and checks the finished file with
  ``TargetFile.verify_length_and_hashes`` before anything else reads it. Only then is it renamed to
  ``<partial_dir>/<sha256>``. Every byte that arrives is kept (HTTP is read with ``read1``), the partial file is
  0600, and a finished file that no longer verifies is the board's damaged copy: removed and fetched again. A
  :class:`RangeSource` says how to read a URL from an offset: HTTP ``Range`` (:class:`HttpSource`), a seek
  (:class:`DirectorySource`), or MQTT chunk offsets.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import stat
from typing import Callable, Iterator, Protocol
from urllib.parse import unquote, urlparse

from tuf.api.exceptions import DownloadHTTPError, LengthOrHashMismatchError
from tuf.ngclient import FetcherInterface

from device.clock import SYSTEM_CLOCK, backoff_delay
from device.statefile import fsync_dir
from device.update.errors import DownloadError, HashMismatch, NoSpace, SizeError, UnsafeFile, UpdateError

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


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO opens at once (and is then refused) instead of waiting for a writer that never comes.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_regular(path: str, root: str | None = None) -> int:
    """Opens a regular file of a directory repository for reading, following no symbolic link.

    Every component below ``root`` is opened relative to its parent with ``O_NOFOLLOW``, and the file must be a
    regular file (``lstat`` before the open, ``fstat`` after it): a stick's symbolic link to a file of the board
    (its identity), a FIFO that would hang the install, or a device node is refused, never opened. ``root`` itself
    comes from the board's configuration and may be a link (a mount point's alias).

    Args:
        path: The file. root: The repository directory it must be inside (None: only the last component is
            checked).

    Returns:
        An open descriptor (the caller closes it).

    Raises:
        DownloadHTTPError: 404 for a missing file, 403 for one the board may not read.
        UnsafeFile: A symbolic link, a FIFO, a device or another special file, or a path that leaves ``root``.
    """
    if root is None:
        parent, parts = os.path.dirname(os.path.abspath(path)), [os.path.basename(path)]
    else:
        parent = os.path.realpath(root)
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
        parts = rel.split(os.sep)
        if os.path.isabs(rel) or parts[0] == os.pardir or rel == os.curdir:
            raise UnsafeFile(f"{path}: outside the repository directory {root}; refused")
    try:
        dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _http_error(path, exc) from exc
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                st = os.lstat(part, dir_fd=dfd)
            except OSError as exc:
                raise _http_error(path, exc) from exc
            what = _special(st.st_mode, directory=not last)
            if what:
                raise UnsafeFile(f"{path}: {'/'.join(parts[:i + 1])} is {what}, not a regular "
                                 f"{'file' if last else 'directory'} of the repository; refused (a directory "
                                 f"repository holds plain files only: make it again with `fieldnode repo export`)")
            try:
                fd = os.open(part, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=dfd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped for a link since the lstat
                    raise UnsafeFile(f"{path}: {part} changed into a link or special file while read; refused") \
                        from exc
                raise _http_error(path, exc) from exc
            os.close(dfd)
            dfd = fd
        fd, dfd = dfd, -1
    finally:
        if dfd >= 0:
            os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeFile(f"{path}: {_special(st.st_mode, False) or 'not a regular file'}; refused")
    os.set_blocking(fd, True)
    return fd


def _special(mode: int, directory: bool) -> str | None:
    """What a file is when it is not what a repository holds there (a directory, or a regular file), else None."""
    if directory and stat.S_ISDIR(mode):
        return None
    if not directory and stat.S_ISREG(mode):
        return None
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISREG, "a file")):
        if test(mode):
            return name
    return "a special file"


def _http_error(path: str, exc: OSError) -> DownloadHTTPError:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return DownloadHTTPError(f"{path}: permission denied", 403)
    return DownloadHTTPError(f"{path}: no such file ({exc.strerror or exc})", 404)


def _read_from(path: str, offset: int, chunk: int, root: str | None) -> Iterator[bytes]:
    f = os.fdopen(open_regular(path, root), "rb")

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
    """python-tuf's fetcher for metadata in a directory (a USB stick): ``file://`` URLs or plain paths.

    Args:
        root: The repository directory; every file read must be a regular file inside it (:func:`open_regular`).
    """

    def __init__(self, chunk_size: int = CHUNK, root: str | None = None) -> None:
        self.chunk_size = chunk_size
        self.root = root

    def _fetch(self, url: str) -> Iterator[bytes]:
        return _read_from(local_path(url), 0, self.chunk_size, self.root)


class RangeSource(Protocol):
    """Reads a target's bytes from ``offset`` on (the resumable half of a delivery path)."""

    def read(self, url: str, offset: int) -> Iterator[bytes]:
        """Yields the bytes of ``url`` from ``offset``; raises :class:`DownloadHTTPError` (404) for a missing file,
        anything else for a transport failure (the download resumes after it)."""


class DirectorySource:
    """Targets from a directory (a USB stick): a seek to the offset, regular files inside ``root`` only."""

    def __init__(self, chunk_size: int = CHUNK, root: str | None = None) -> None:
        self.chunk_size = chunk_size
        self.root = root

    def read(self, url: str, offset: int) -> Iterator[bytes]:
        return _read_from(local_path(url), offset, self.chunk_size, self.root)


class HttpSource:
    """Targets over HTTP(S) with ``Range: bytes=<offset>-`` (urllib3, which python-tuf already brings); also the
    metadata, through :class:`HttpFetcher`, so one pool, one timeout and one login serve the three.

    A server that ignores the range (``200`` to a request from an offset) is read from the start and the
    bytes before the offset are skipped, so resuming never depends on the server's help.

    Args:
        timeout_s: Connect timeout and the longest gap between two received bytes.
        pool: A ``urllib3.PoolManager`` to use (tests pass one; TLS settings come with it).
        credentials: ``USER:PASSWORD``, sent as HTTP Basic authentication with every request
            (``update.credentials_file``).
    """

    def __init__(self, timeout_s: float = 30.0, pool=None, chunk_size: int = CHUNK,
                 credentials: str | None = None) -> None:
        import urllib3

        self._urllib3 = urllib3
        # No redirects: they would carry the credentials to whatever host a redirect names.
        self.pool = pool or urllib3.PoolManager(retries=urllib3.Retry(total=2, redirect=0 if credentials else 3,
                                                                      read=0))
        self.timeout_s = timeout_s
        self.chunk_size = chunk_size
        self._auth = urllib3.util.make_headers(basic_auth=credentials) if credentials else {}

    def read(self, url: str, offset: int) -> Iterator[bytes]:
        u3 = self._urllib3
        headers = dict(self._auth)
        if offset:
            headers["Range"] = f"bytes={offset}-"
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
                while True:
                    # read1: whatever has arrived, at most a chunk. read(chunk) (and stream()) would hold up to a
                    # chunk back until it is whole, and lose it when the link drops: a link that drops more often
                    # than every chunk would never complete.
                    data = response.read1(self.chunk_size)
                    if not data:
                        return
                    if skip:
                        cut = min(skip, len(data))
                        data, skip = data[cut:], skip - cut
                    if data:
                        yield data
            finally:
                response.release_conn()

        return chunks()


class HttpFetcher(FetcherInterface):
    """python-tuf's fetcher for metadata over HTTP(S), through an :class:`HttpSource` (its timeout, its login).

    A missing file is the server's 404, which ends python-tuf's walk of ``N+1.root.json``.
    """

    def __init__(self, source: HttpSource) -> None:
        self.source = source

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self.source.read(url, 0)


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
        try:
            _verify(target, done)
            return done
        except HashMismatch as exc:  # the board's own copy, damaged since it was verified: not the repository's
            os.remove(done)
            log.warning("the local copy %s of %s no longer matches its signed hash (%s): removed, downloading it "
                        "again", done, target.path, exc)
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
            except UpdateError:  # a refusal (a stick's link or FIFO), not a transport failure: no retry
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
    """Appends ``chunks`` to ``path`` (fsynced however the stream ends); returns the size on disk. The partial file
    is 0600 whatever the umask: it is a ciphertext on its way, no one else's to read."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "ab") as f:
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
