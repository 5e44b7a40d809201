"""Files that must survive a power cut: small JSON state files (envelope nonces, the model quarantine, the update
store), the update path's downloads and decrypted models, the repository tool's files and the installer's.

:class:`AtomicFile` is the one atomic writer: temporary file in the same directory, write, fsync, ``os.replace``,
directory fsync, and the mode asked for whatever the umask. A power cut leaves the old file or the new one and
never half of either, and a state file the agent cannot parse is set aside for a technician instead of being
overwritten.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import tempfile


class AtomicFile:
    """A file written whole or not at all: the one atomic writer of the agent, the update path and the tools.

    A temporary file in the destination's directory, created 0600 and then given ``mode`` with ``fchmod`` (so the
    mode is the one asked for whatever the umask); on a clean exit of the ``with`` block it is flushed, fsynced,
    renamed over :attr:`path` with ``os.replace`` and the directory fsynced; on an exception it is removed and
    :attr:`path` is untouched. The destination may be changed inside the block (a target named by its hash)::

        with AtomicFile(path, mode=0o644) as af:
            af.file.write(data)

    Attributes:
        path: Where the file goes on commit. file: The open binary file (``w+b``). tmp: The temporary file.
    """

    def __init__(self, path: str, mode: int = 0o600) -> None:
        self.path = path
        self.mode = mode
        directory = os.path.dirname(os.path.abspath(path))
        fd, self.tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            os.fchmod(fd, mode)
            self.file = os.fdopen(fd, "w+b")
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            raise

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
            return
        try:
            self.commit()
        except BaseException:
            self.discard()
            raise

    def sync(self) -> None:
        """Flushes and fsyncs what was written so far (commit does it too)."""
        self.file.flush()
        os.fsync(self.file.fileno())

    def commit(self) -> None:
        """fsync, ``os.replace`` onto :attr:`path`, fsync the directory."""
        self.sync()
        self.file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def discard(self) -> None:
        """Closes and removes the temporary file (the destination is untouched)."""
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replaces ``path`` with ``data`` through :class:`AtomicFile`: a temporary file in the same directory, write,
    fsync, ``os.replace``, directory fsync; ``mode`` whatever the umask.

    Args:
        path: the file to write; its directory is created when missing.
        data: the new content.
        mode: the new file's permissions.

    Raises:
        OSError: the directory or the file cannot be written (the old file is left as it was).
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with AtomicFile(path, mode) as af:
        af.file.write(data)


def write_temp(path: str, data: bytes, mode: int = 0o600) -> str:
    """Writes ``data`` to a new temporary file beside ``path``, with ``mode``, flushed and fsynced.

    Returns:
        The temporary file's path; the caller renames or links it into place (and unlinks it on failure).

    Raises:
        OSError: the file cannot be created or written (nothing is left behind then).
    """
    af = AtomicFile(path, mode)
    try:
        af.file.write(data)
        af.sync()
        af.file.close()
    except BaseException:
        af.discard()
        raise
    return af.tmp


def fsync_dir(directory: str) -> None:
    """Fsyncs ``directory`` so a rename or link in it survives a power cut.

    Best effort, and the one behaviour for every caller: some filesystems cannot fsync a directory (EINVAL),
    and the rename or link it guards has already happened; a power cut after a failed sync can at worst bring
    back the old name, which every caller survives (an atomic replace leaves the old file, a file set aside is
    found corrupt again and set aside again). Raising here would turn a completed write into a reported
    failure, so no caller would do anything useful with the error.

    Args:
        directory: The directory.
    """
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def aside_name(path: str, when: float) -> str:
    """The name a corrupt file is kept under: ``<path>.corrupt-<UTC YYYYmmddTHHMMSSZ>``.

    Args:
        path: The corrupt file.
        when: Wall-clock seconds.

    Returns:
        The name without the ``.n`` a collision adds (see :func:`move_aside`).
    """
    stamp = datetime.datetime.fromtimestamp(when, tz=datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{path}.corrupt-{stamp}"


def move_aside(path: str, when: float, side_suffixes: tuple = ()) -> str:
    """Renames a corrupt file, and the side files kept next to it, to the same ``.corrupt-`` name.

    The name is :func:`aside_name` and ``.2``, ``.3``... when an earlier one (within the same second) exists.
    A side file keeps its suffix after the new name (``spool.db-wal`` becomes ``spool.db.corrupt-...-wal``),
    so a database and its write-ahead log stay a pair for a post-mortem. The directory is then fsynced.

    Args:
        path: The corrupt file (closed by the caller); it must exist.
        when: Wall-clock seconds for the name.
        side_suffixes: Suffixes of side files that move along when present (``("-wal", "-shm")``).

    Returns:
        The new path of ``path``.

    Raises:
        OSError: ``path`` cannot be renamed (a side file that cannot be renamed raises too).
    """
    base = target = aside_name(path, when)
    suffixes = ("",) + tuple(side_suffixes)
    n = 1
    while any(os.path.lexists(target + s) for s in suffixes):  # two set-asides within one second
        n += 1
        target = f"{base}.{n}"
    os.replace(path, target)  # the main file first: a missing one raises before any side file moved
    for suffix in suffixes[1:]:
        if os.path.lexists(path + suffix):
            os.replace(path + suffix, target + suffix)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return target


def set_aside(path: str, when: float) -> str:
    """Moves a corrupt state file aside with :func:`move_aside`, keeping it for a technician.

    Returns:
        What happened, for the log line: ``moved it to <new path>`` or ``could not move it aside (<why>)``.
    """
    try:
        aside = move_aside(path, when)
    except OSError as exc:
        return f"could not move it aside ({short_error(exc)})"
    return f"moved it to {aside}"


def short_error(exc: BaseException) -> str:
    """An exception as a short phrase for a log line: the OS error text, or the message cut to 120 chars."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    return text if len(text) <= 120 else text[:117] + "..."

def write_new(path: str, data: bytes, mode: int) -> None:
    """Writes a new file durably and never replaces an existing one (FileExistsError).

    Temp file in the same directory, fsync, then a hard link to the final name, which fails if the name exists
    (on filesystems without hard links, such as FAT on a USB stick: a check, then a rename), then fsync the
    directory.
    """
    tmp = write_temp(path, data, mode)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
                raise
            if os.path.lexists(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from exc
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def parse_versioned(raw: bytes, fmt: int) -> dict:
    """The JSON object of a small state file that says its ``format``.

    Raises:
        ValueError: Not JSON, not an object, or another format; the message says which.
    """
    try:
        doc = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise ValueError(f"expected an object with format {fmt}")
    return doc
