"""Threads that ``top -H``, ``ps -L`` and ``/proc/PID/task/TID/comm`` tell apart.

Linux gives every thread the process's name (``fieldnode``, ``python3``) until the thread names itself, so a
person looking for the thread that spends a board's battery sees a column of identical names. :class:`Thread` sets
the OS name (15 bytes at most) from inside the thread, as it starts; :func:`name_thread` names a thread of this
process that someone else started (a driver's, a library's) through ``/proc/self/task/TID/comm``.

A thread that has nothing to do sleeps until its own deadline or until something wakes it; it never polls.
:class:`Waker` is the wake-up descriptor a thread that also waits on a socket (the link) blocks on.

Off Linux both change nothing.
"""

from __future__ import annotations

import math
import os
import select
import threading
from typing import TYPE_CHECKING

from device.linux import name_process

if TYPE_CHECKING:
    import socket

OS_NAME_BYTES = 15  # the kernel's TASK_COMM_LEN less the NUL


def os_name(name: str) -> bytes:
    """The OS name of a thread called ``name``: ASCII, at most 15 bytes. A ``fieldnode-`` prefix is dropped (every
    thread is the agent's), and so is what follows a ``/`` (a port path says nothing at 15 bytes).

    Raises:
        ValueError: ``name`` is empty or names nothing once shortened.
    """
    short = name.removeprefix("fieldnode-").split("/", 1)[0].rstrip("-")
    raw = short.encode("ascii", "replace")[:OS_NAME_BYTES]
    if not raw:
        raise ValueError(f"a thread name must say something in its first {OS_NAME_BYTES} bytes, got {name!r}")
    return raw


class Thread(threading.Thread):
    """A :class:`threading.Thread` (same arguments) that gives itself its ``name`` at the OS level as it starts
    (:func:`os_name`), so ``top -H`` shows ``link``, ``spool``, ``governor``... instead of ``fieldnode``."""

    def run(self) -> None:
        try:
            name_process(os_name(self.name))
        except ValueError:  # a name that says nothing in 15 bytes: the thread runs unnamed rather than not at all
            pass
        super().run()


def name_thread(thread: threading.Thread, name: str | None = None) -> bool:
    """Names a running thread of this process at the OS level (``name``, else its Python name).

    For threads this code did not start: drivers and libraries make plain :class:`threading.Thread` objects.

    Returns:
        False when the thread has not started, has ended, or this is not Linux.
    """
    tid = thread.native_id
    if tid is None or not thread.is_alive():
        return False
    try:
        with open(f"/proc/self/task/{tid}/comm", "wb") as f:
            f.write(os_name(name or thread.name))
        return True
    except OSError:
        return False


def name_threads(names: dict[str, str] | None = None) -> int:
    """Names every live thread of this process after its Python name (or ``names[python name]``), for the threads
    that did not name themselves. Returns how many were named."""
    names = names or {}
    count = 0
    for t in threading.enumerate():
        if t is threading.main_thread() or isinstance(t, Thread):
            continue
        try:
            count += name_thread(t, names.get(t.name))
        except ValueError:  # its name says nothing in 15 bytes: left as it is
            continue
    return count


class Waker:
    """A wake-up descriptor: :meth:`set` from any thread ends a :meth:`wait` on another, which can wait on sockets
    at the same time (one ``poll``). An ``eventfd`` where there is one, else a pipe.

    Setting it more than once before the waiter wakes is one wake-up. After :meth:`close`, :meth:`set` does
    nothing (a producer that outlives the waiter never writes to a descriptor number reused since).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        if hasattr(os, "eventfd"):
            self._r = self._w = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - Linux has eventfd
            self._r, self._w = os.pipe()
            for fd in (self._r, self._w):
                os.set_blocking(fd, False)
        self._closed = False

    def fileno(self) -> int:
        return self._r

    def set(self) -> None:
        """Wakes the waiter (now, or at its next :meth:`wait`)."""
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._w, _ONE)
            except BlockingIOError:  # already more than enough wake-ups pending
                pass

    def clear(self) -> None:
        """Forgets the wake-ups set so far."""
        with self._lock:
            if self._closed:
                return
            try:
                while os.read(self._r, 4096):
                    if self._r == self._w:
                        break  # an eventfd reads its whole count at once
            except BlockingIOError:
                pass

    def wait(self, timeout: float | None, sock: socket.socket | None = None, *,
             write: bool = False) -> tuple[bool, bool, bool]:
        """Sleeps until :meth:`set`, until ``sock`` is readable (or writable, with ``write``), or ``timeout`` seconds.

        Args:
            timeout: Longest wait in seconds; None for no limit, 0 to look without waiting.
            sock: A socket (anything with ``fileno()``) to wait on too, or None.
            write: Also wake when ``sock`` can be written.

        Returns:
            ``(woken, readable, writable)``; a wake-up is cleared when it is returned.
        """
        p = select.poll()
        p.register(self._r, select.POLLIN)
        fd = None if sock is None else sock.fileno()
        if fd is not None and fd >= 0:
            p.register(fd, select.POLLIN | (select.POLLOUT if write else 0))
        ms = None if timeout is None else max(0, math.ceil(timeout * 1000.0))
        woken = readable = writable = False
        for f, ev in p.poll(ms):
            if f == self._r:
                woken = True
            else:  # an error or hang-up is for the reader to find
                readable = bool(ev & (select.POLLIN | select.POLLERR | select.POLLHUP | select.POLLNVAL))
                writable = bool(ev & select.POLLOUT)
        if woken:
            self.clear()
        return woken, readable, writable

    def close(self) -> None:
        """Closes the descriptor (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._r)
            if self._w != self._r:
                os.close(self._w)


_ONE = (1).to_bytes(8, "little")  # an eventfd takes 8 bytes; a pipe takes them too


def name_native_threads(name: str) -> int:
    """Names the threads of this process that a C library started (an interpreter's thread pool) and that still
    carry the process's name: every thread but the calling one whose OS name is the main thread's. Returns how
    many were named (0 off Linux)."""
    me = threading.get_native_id()
    try:
        with open("/proc/self/comm", "rb") as f:
            process = f.read().strip()
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except (OSError, ValueError):
        return 0
    count = 0
    for tid in tids:
        if tid in (me, os.getpid()):
            continue
        try:
            with open(f"/proc/self/task/{tid}/comm", "r+b") as f:
                if f.read().strip() == process:
                    f.seek(0)
                    f.write(os_name(name))
                    count += 1
        except OSError:
            continue  # it ended meanwhile
    return count
