"""One agent per state directory: an exclusive ``flock`` on ``STATE_DIR/agent.lock``.

Two agents on one state directory would share the spool, the update store and the quarantine, and each would
believe it owns them. ``fieldnode run`` therefore takes :class:`StateLock` before it opens anything there, and
a second run is refused with the process that holds the lock (:class:`StateDirBusy`).

Why ``flock`` and this shape:

- The kernel drops the lock when the holder's last descriptor closes, which includes a ``kill -9`` and a
  crash: no stale lock to clean up, whatever the file says.
- The holder writes who it is (pid, start time, argv, hostname, boot id) *into* the locked file with
  ``ftruncate`` + ``write`` + ``fsync``. The file is never replaced or removed: a lock is on an inode, and a
  replaced file would let a second agent lock the new inode while the first still holds the old one.
- The content is only a label. After a ``kill -9`` it names a dead process until the next holder writes;
  whether the directory is taken is asked of the kernel (:func:`holder` tries a non-blocking lock).
- The descriptor is ``O_CLOEXEC`` (the inference worker and any other executed child do not inherit it) and
  a child made by a bare ``fork`` closes its copy at once, so no child keeps the directory locked after the
  agent dies.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time

from device.errors import FieldnodeError

LOCK_NAME = "agent.lock"

# A diag probing the lock holds it (shared) for microseconds; a starting agent that meets that probe tries
# again a few times before it calls the directory busy. Seconds between attempts:
_RETRY_S = (0.01, 0.03, 0.06, 0.1)


class StateLockError(FieldnodeError):
    """The state directory's lock file cannot be created, opened or locked (permissions, not a directory)."""

    code = "state_dir_unusable"


class StateDirBusy(FieldnodeError):
    """Another process holds the state directory; ``holder`` says who (``pid`` may be ``None``)."""

    code = "state_dir_busy"

    def __init__(self, message: str, state_dir: str = "", holder: dict | None = None):
        super().__init__(message)
        self.state_dir = state_dir
        self.holder = holder or {}

    def as_json(self) -> dict:
        return {**super().as_json(), "state_dir": self.state_dir, "holder": self.holder}


def lock_path(state_dir: str) -> str:
    return os.path.join(state_dir, LOCK_NAME)


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists under another user
        return True
    return True


def _read_info(fd: int) -> dict:
    """The holder label in the lock file, ``{}`` when empty or not ours (never raises)."""
    try:
        raw = os.pread(fd, 65536, 0)
        info = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _holder_info(fd: int) -> dict:
    """The label of a holder we know is there. The file may still name the holder before it (dead after a
    kill -9) or be empty for the moment between the new holder's lock and its write: look again briefly."""
    info = _read_info(fd)
    for delay in _RETRY_S:
        if _alive(info.get("pid")):
            break
        time.sleep(delay)
        info = _read_info(fd)
    if not _alive(info.get("pid")):
        info = {"pid": None}
    return info


def _os_error(what: str, path: str, exc: OSError) -> StateLockError:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ELOOP:
        reason = "it is a symbolic link (the lock file must be a plain file)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        try:
            st = os.stat(path)
            reason += f" (owner uid {st.st_uid}, mode {st.st_mode & 0o7777:04o}; the agent runs as uid {os.geteuid()})"
        except OSError:
            pass
    return StateLockError(f"cannot {what} {path}: {reason}")


class StateLock:
    """The exclusive lock of a state directory, held while the process lives or until :meth:`release`.

    Args:
        state_dir: The agent's state directory (``device.state_dir``); created when missing.
    """

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.path = lock_path(state_dir)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> StateLock:
        """Takes the lock and writes our label into it; returns ``self``.

        Raises:
            StateDirBusy: Another process holds it (the message names it and how to stop it).
            StateLockError: The directory or the lock file cannot be made, opened or locked.
        """
        if self._fd is not None:
            return self
        try:
            os.makedirs(self.state_dir, exist_ok=True)
        except FileExistsError as exc:  # a file (or a dangling symlink) where the directory should be
            raise StateLockError(f"cannot use the state directory {self.state_dir}: it is not a directory") from exc
        except OSError as exc:
            raise _os_error("create the state directory", self.state_dir, exc) from exc
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            what = "use the state directory" if exc.errno == errno.ENOTDIR else "open the lock file"
            raise _os_error(what, self.state_dir if exc.errno == errno.ENOTDIR else self.path, exc) from exc
        try:
            self._lock(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _FORKED.add(self)
        self._write_label()
        return self

    def _lock(self, fd: int) -> None:
        for delay in (*_RETRY_S, None):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if delay is None:
                    raise self._busy(fd) from None
                time.sleep(delay)
            except OSError as exc:  # ENOLCK: a file system without locks
                raise _os_error("lock", self.path, exc) from exc

    def _busy(self, fd: int) -> StateDirBusy:
        info = _holder_info(fd)
        pid = info.get("pid")
        if pid == os.getpid():
            return StateDirBusy(f"the state directory {self.state_dir} is already locked by this process "
                                f"(pid {pid})", self.state_dir, info)
        if pid is None:
            who = "pid unknown"
        else:
            who = f"pid {pid}"
            if info.get("started"):
                who += f", started {info['started']}"
            host = info.get("hostname")
            if host and host != socket.gethostname():  # a state directory on a shared file system
                who += f", on {host}"
        return StateDirBusy(f"the state directory {self.state_dir} is in use by another fieldnode run ({who}): "
                            f"stop it first (systemctl stop fieldnode)", self.state_dir, info)

    def _write_label(self) -> None:
        """Writes who holds the lock into the file itself: truncate, write, fsync (never replace it)."""
        info = {"pid": os.getpid(), "started": _utc(time.time()), "argv": list(sys.argv),
                "hostname": socket.gethostname(), "boot_id": _boot_id()}
        data = (json.dumps(info) + "\n").encode("utf-8", "replace")
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)
            os.fsync(self._fd)
        except OSError as exc:  # a full disk: we hold the lock all the same; the label is for people only
            import logging

            logging.getLogger(__name__).warning("cannot write the holder of %s (%s); the lock is held",
                                                self.path, exc.strerror or exc)

    def release(self) -> None:
        """Clears the label and drops the lock (also done by the kernel when the process ends)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _FORKED.discard(self)
        try:
            os.ftruncate(fd, 0)  # while still locked, so it cannot wipe a next holder's label
        except OSError:
            pass
        os.close(fd)

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(state_dir: str) -> dict | None:
    """Who holds the state directory, without taking it: ``None`` when it is free.

    The kernel is asked (a non-blocking shared lock on a descriptor of our own), not the file, whose label
    outlives a holder killed with SIGKILL. A held lock returns the label: ``pid``, ``started``, ``argv``,
    ``hostname``, ``boot_id`` (``{"pid": None}`` when the holder has not written it yet).

    Raises:
        StateLockError: The lock file exists but cannot be opened (permissions).
    """
    path = lock_path(state_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise _os_error("open the lock file", path, exc) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_info(fd)
        except OSError as exc:
            raise _os_error("lock", path, exc) from exc
        return None  # closing the descriptor drops the probe's shared lock
    finally:
        os.close(fd)


class _Forked:
    """The locks this process holds, closed in a child made by ``os.fork`` (and multiprocessing's fork).

    A forked child shares the lock's open file description; were it to keep its descriptor, an agent that
    died would leave the directory locked for as long as the child lives.
    """

    def __init__(self):
        self._locks: set = set()

    def add(self, lock: StateLock) -> None:
        self._locks.add(lock)

    def discard(self, lock: StateLock) -> None:
        self._locks.discard(lock)

    def after_fork_in_child(self) -> None:
        for lock in list(self._locks):
            fd, lock._fd = lock._fd, None
            if fd is not None:
                try:
                    os.close(fd)  # only our copy: the parent's lock stays (no LOCK_UN, which would drop it)
                except OSError:
                    pass
        self._locks.clear()


_FORKED = _Forked()
os.register_at_fork(after_in_child=_FORKED.after_fork_in_child)
