"""Small JSON state files under the agent's state directory (envelope nonces, the model quarantine).

Each is replaced atomically, so a power cut leaves the old file or the new one and never half of either, and
a file the agent cannot parse is set aside for a technician instead of being overwritten.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replaces ``path`` with ``data``: a synced temporary file in the same directory (:func:`write_temp`),
    ``os.replace``, then the directory fsynced (best effort) so the rename itself is durable.

    Args:
        path: the file to write; its directory is created when missing.
        data: the new content.
        mode: the new file's permissions.

    Raises:
        OSError: the directory or the file cannot be written.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = write_temp(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_temp(path: str, data: bytes, mode: int = 0o600) -> str:
    """Writes ``data`` to a new temporary file beside ``path``, with ``mode``, flushed and fsynced.

    Returns:
        The temporary file's path; the caller renames or links it into place (and unlinks it on failure).

    Raises:
        OSError: the file cannot be created or written (nothing is left behind then).
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def fsync_dir(directory: str) -> None:
    """Fsyncs ``directory`` so a rename or link in it survives a power cut; best effort, as some
    filesystems cannot fsync a directory (the file's data is on disk already)."""
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


def set_aside(path: str, when: float) -> str:
    """Renames a corrupt state file to ``<path>.corrupt-<unix seconds>``, keeping it for a technician.

    Returns:
        What happened, for the log line: ``moved it to <new path>`` or ``could not move it aside (<why>)``.
    """
    aside = f"{path}.corrupt-{int(when)}"
    try:
        os.replace(path, aside)
    except OSError as exc:
        return f"could not move it aside ({short_error(exc)})"
    return f"moved it to {aside}"


def short_error(exc: BaseException) -> str:
    """An exception as a short phrase for a log line: the OS error text, or the message cut to 120 chars."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    return text if len(text) <= 120 else text[:117] + "..."
