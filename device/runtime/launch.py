"""Starting an inference worker process and reading what it says: the zygote's fork or an exec from one
long-lived launcher thread, the worker's stderr kept for a crash's message, and how its end is described and
classified (a fault of the model, or a kill from outside).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from typing import IO

from device.runtime import zygote
from device.threads import Thread

worker_log = logging.getLogger("device.runtime.worker")

# Signals a process dies of by its own fault (the interpreter, a delegate, the model). Any other one was sent.
FAULT_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT,
                           signal.SIGSYS, signal.SIGTRAP})


def killed_from_outside(returncode: int | None) -> bool:
    """Whether a worker's exit status (Popen's convention) is a signal another process sent: SIGKILL from an
    operator or the OOM killer, SIGTERM, SIGHUP... rather than a fault of the model or an exit."""
    return returncode is not None and returncode < 0 and -returncode not in FAULT_SIGNALS


def _worker_env() -> dict:
    """The worker's environment: ours, with this package's parent directory first on PYTHONPATH, and without
    systemd's notification variables (only the agent speaks to systemd)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


class _Launcher:
    """Starts worker processes from one long-lived thread.

    The worker asks for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), and Linux ties that to the
    *thread* that forked it: a worker started from a short-lived thread (a hot swap run in the background)
    would be killed when that thread ends. So every ``Popen`` happens on this thread, which lives as long
    as the agent.
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, args: list[str], **kwargs: object) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = Thread(target=self._run, name="fieldnode-launcher", daemon=True)
                self._thread.start()
        box: dict = {}
        done = threading.Event()
        self._jobs.put((args, kwargs, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["proc"]

    def _run(self) -> None:
        # SIGHUP is the agent's: blocked on this thread (the agent's other threads take it), so a worker exec'd
        # from here starts with it blocked and cannot be killed by one before it ignores it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        while True:
            args, kwargs, box, done = self._jobs.get()
            try:
                box["proc"] = subprocess.Popen(args, **kwargs)
            except BaseException as exc:  # handed to the caller, who raises it
                box["error"] = exc
            done.set()


_LAUNCHER = _Launcher()


def launch(child_fd: int) -> zygote.ForkedProc | subprocess.Popen:
    """Starts a worker serving on ``child_fd``: forked by the zygote when this process has one
    (:mod:`device.runtime.zygote`, ``fieldnode run``), else by exec, which also takes over from a zygote
    that failed (the zygote module says so)."""
    z = zygote.current()
    if z is not None:
        try:
            return z.spawn(child_fd)
        except zygote.ZygoteGone:
            pass
    return _LAUNCHER.popen([sys.executable, "-m", "device.runtime.worker", str(child_fd)],
                           pass_fds=(child_fd,), env=_worker_env(), stdin=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, close_fds=True)


class StderrTail:
    """Reads a worker's stderr on its own thread until EOF: every line goes to the ``device.runtime.worker``
    logger at debug level (the interpreter's chatter is not the agent's business), the last ones are kept.

    Args:
        stream: the read end of the worker's stderr pipe (binary).
        pid: the worker's process id, for the log lines.
        keep: how many lines to keep.
    """

    MAX_LINE = 4096

    def __init__(self, stream: IO[bytes], pid: int, keep: int = 40) -> None:
        self.lines: collections.deque = collections.deque(maxlen=keep)
        self._thread = Thread(target=self._run, args=(stream, pid), name=f"worker-{pid}-stderr",
                                        daemon=True)
        self._thread.start()

    def _run(self, stream: IO[bytes], pid: int) -> None:
        try:
            for raw in iter(lambda: stream.readline(self.MAX_LINE), b""):
                line = raw.decode("utf-8", "replace").rstrip()
                if line:
                    self.lines.append(line)
                    worker_log.debug("worker %d: %s", pid, line)
        except (OSError, ValueError):  # the pipe was closed under us: nothing more to read
            pass
        finally:
            stream.close()

    def last_words(self, wait_s: float = 1.0) -> str:
        """What the worker said that explains its end, in one line: the fatal error and the innermost Python
        frame of a faulthandler dump, and other lines, without the interpreter's ``INFO:`` chatter; "" when
        it said nothing. Waits up to ``wait_s`` for the reader to reach EOF (call it after the worker ended).
        """
        self._thread.join(wait_s)
        kept: list[str] = []
        frames = 0  # after a dump's thread header: how many frames to keep (innermost first)
        for line in list(self.lines):
            text = line.strip()
            if not text or text.startswith(("INFO: ", "Extension modules:")):
                continue
            if text.startswith(("Current thread ", "Thread 0x")):
                frames = 1
            elif text.startswith("File "):
                if frames:
                    kept.append(text)
                    frames -= 1
            else:
                kept.append(text)
        out = " | ".join(kept[-6:])
        return out if len(out) <= 600 else "..." + out[-597:]


def describe_exit(returncode: int | None) -> str:
    """``was killed by signal SIGSEGV`` / ``exited with status 1`` / ``did not exit``."""
    if returncode is None:
        return "did not exit"
    if returncode < 0:
        try:
            return f"was killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"

