"""The zygote: inference workers forked from a template, so they share the agent's Python and numpy pages.

An inference worker started by exec is a second Python interpreter: it imports numpy and the interpreter
backend again, and its heap of module objects is its own (measured: about 25 MB of distinct pages more than
one process doing the same job). A worker forked from a process that has already imported them shares
those pages copy-on-write, and only what it writes (its model, the interpreter's arena) is its own.

The agent cannot fork its workers itself: by the time a worker is needed (the first load, a restart after a
crash, a hot swap) it runs a dozen threads, and a fork copies only the forking thread, with every lock the
others held. So ``fieldnode run`` calls :func:`start` first, while it has one thread: the agent imports
numpy, the backend and the worker's modules, freezes them out of the garbage collector's reach (a collection
would write to every object and copy every page), and forks the zygote. The zygote has one thread for ever; it
waits for requests and forks a worker for each.

The agent stays the worker's parent, so it can wait for it and read its exit status as it does for an
exec'd one: it marks itself a *child subreaper* (``PR_SET_CHILD_SUBREAPER``), and the zygote forks twice (an
intermediate process forks the worker and exits), so the worker is handed to the agent. The worker asks for
SIGKILL when its parent dies (``PR_SET_PDEATHSIG``) only once it sees the agent as its parent; the zygote asks
for it at once. When the agent goes, both go.

Protocol, on one socket pair with :class:`~device.runtime.worker.Channel` messages::

    agent  -> SPAWN + fds          the worker's end of its socket pair, the write end of its stderr pipe
    zygote -> PID <pid>            the worker's process id, once the worker is the agent's child
           or ERR <text>           the fork failed

When the zygote is gone (killed, or never started: tests, ``selftest``, ``diag``), the supervisor starts
workers by exec, as before; see :func:`current`. A zygote that dies is reaped at once (a thread,
``zygote-watch``, waits on its pidfd), so it never lingers as a zombie, and its loss is said once, as a
warning: from then on each worker is exec'd and costs about 25 MB more. It is not started again: a zygote must
be forked while the agent has one thread, and the agent runs a dozen by then (a fork copies only the forking
thread, with the locks the others held); an exec'd zygote would cost as much as the exec'd worker it saves.
``systemctl restart fieldnode`` brings it back.

Process names (``/proc/<pid>/comm``, what ``ps`` and ``top`` show): ``fieldnode-fork`` for the zygote and
``fieldnode-infer`` for a worker.
"""

from __future__ import annotations

import gc
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

from device.linux import PR_SET_CHILD_SUBREAPER, PR_SET_PDEATHSIG, name_process, prctl, set_cmdline
from device.threads import Thread

log = logging.getLogger(__name__)

SPAWN_TIMEOUT_S = 10.0  # the zygote answers a SPAWN in milliseconds; this long means it is stuck
REPARENT_TIMEOUT_S = 5.0  # how long a new worker waits to be handed to the agent

ZYGOTE_NAME = b"fieldnode-fork"


class ZygoteGone(Exception):
    """The zygote did not fork a worker: it is dead, stuck, or its fork failed."""


def _describe_status(status: int) -> str:
    """``was killed by signal SIGKILL`` / ``exited with status 1``, from a ``waitpid`` status."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _os_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


class ForkedProc:
    """A worker forked by the zygote, with the part of :class:`subprocess.Popen` the supervisor uses.

    The agent is its parent (see the module docstring), so :meth:`poll` and :meth:`wait` reap it with
    ``waitpid`` and :attr:`returncode` follows Popen's convention (negative: killed by that signal).
    """

    def __init__(self, pid: int, stderr) -> None:
        self.pid = pid
        self.stderr = stderr
        self.returncode: int | None = None
        self._lock = threading.Lock()
        try:
            self._pidfd = os.pidfd_open(pid)  # readable once the process has ended (Linux >= 5.3)
        except (AttributeError, OSError):
            self._pidfd = -1

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:  # reaped elsewhere: nothing more to learn
                    pid, status = self.pid, 255 << 8
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
            fd = self._pidfd
            if fd >= 0:
                p = select.poll()
                p.register(fd, select.POLLIN)
                p.poll(None if left is None else max(1, int(left * 1000)))
            else:
                time.sleep(0.005 if left is None else min(0.005, left))
        return self.returncode

    def kill(self) -> None:
        with self._lock:
            if self.returncode is None:
                try:
                    os.kill(self.pid, signal.SIGKILL)  # not yet reaped by us, so the pid is still this worker
                except ProcessLookupError:
                    pass

    def __del__(self) -> None:
        # Closed only with the object, so a wait() on another thread never polls a descriptor closed (or
        # reused) under it.
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


class Zygote:
    """The agent's handle on its zygote process (see the module docstring)."""

    def __init__(self, pid: int, chan) -> None:
        self.pid = pid
        self._chan = chan
        self._lock = threading.Lock()  # one SPAWN exchange at a time
        self._state_lock = threading.Lock()  # gone, and whether the zygote has been reaped
        self._reaped = False  # once reaped its pid may be another process's: never signalled or waited again
        self.gone: str | None = None  # why it can no longer fork, once it cannot
        try:
            pidfd = os.pidfd_open(pid)  # readable once the zygote has ended (Linux >= 5.3)
        except (AttributeError, OSError):
            pidfd = -1  # then a lost zygote is found (and reaped) at the next spawn
        if pidfd >= 0:
            Thread(target=self._watch, args=(pidfd,), name="zygote-watch", daemon=True).start()

    def _watch(self, pidfd: int) -> None:
        """Waits for the zygote to end, reaps it at once and says it is lost (unless it was stopped)."""
        try:
            p = select.poll()
            p.register(pidfd, select.POLLIN)
            while not p.poll():
                pass
        finally:
            os.close(pidfd)
        status = self._reap(os.WNOHANG)
        if status is not None:
            self._mark_lost(f"{_describe_status(status)}")

    def spawn(self, child_fd: int) -> ForkedProc:
        """Forks a worker that serves on ``child_fd`` (the worker's end of its socket pair; the caller keeps
        and closes its own copy). Its stderr is a pipe, returned as the process's ``stderr``.

        Raises:
            ZygoteGone: the zygote is dead or stuck, or the fork failed.
        """
        r, w = os.pipe()
        try:
            with self._lock:
                if self.gone:
                    raise ZygoteGone(self.gone)
                try:
                    self._chan.send_bytes(b"SPAWN", fds=(child_fd, w))
                    if not self._chan.poll(SPAWN_TIMEOUT_S):
                        self._lost(f"gave no answer within {SPAWN_TIMEOUT_S:g} s")
                    msg = self._chan.recv_bytes()
                except (OSError, EOFError) as exc:
                    self._lost(f"is gone ({exc})")
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        if not msg.startswith(b"PID "):
            os.close(r)
            why = msg[4:].decode(errors="replace") if msg.startswith(b"ERR ") else f"answered {msg[:40]!r}"
            log.warning("the worker zygote could not fork a worker (%s); this one is started by exec", why)
            raise ZygoteGone(why)
        return ForkedProc(int(msg[4:]), open(r, "rb"))

    def _mark_lost(self, why: str) -> bool:
        """Records that the zygote can no longer fork and says so, once (not when it was stopped)."""
        with self._state_lock:
            if self.gone is not None:
                return False
            self.gone = f"the worker zygote (pid {self.pid}) {why}"
        log.warning("%s; inference workers are started by exec from now on, each with its own copy of Python "
                    "and numpy (about 25 MB more per worker; systemctl restart fieldnode forks a new zygote)",
                    self.gone)
        return True

    def _lost(self, why: str):
        self._mark_lost(why)
        self.stop()
        raise ZygoteGone(self.gone)

    def _reap(self, flags: int = 0) -> int | None:
        """Waits for the zygote (``os.WNOHANG`` in ``flags``: only if it has ended); its wait status, or None
        when it has not ended or was reaped already. Only ever this pid: workers are reaped by their own
        handles."""
        with self._state_lock:
            if self._reaped:
                return None
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:
                pid, status = self.pid, 0
            if pid != self.pid:
                return None
            self._reaped = True
            return status

    def stop(self) -> None:
        """Ends the zygote (its workers are the agent's and are not touched) and reaps it."""
        with self._state_lock:
            self.gone = self.gone or "was stopped"  # before it ends: its watcher must not call it lost
        try:
            self._chan.close()  # EOF: the zygote exits
        except OSError:
            pass
        with self._state_lock:
            if not self._reaped:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._reap()


_current: Zygote | None = None


def current() -> Zygote | None:
    """The zygote started by this process, while it can fork; None otherwise."""
    z = _current
    return z if z is not None and not z.gone else None


def start(backend: str = "auto") -> Zygote | None:
    """Imports what a worker needs, then forks the zygote; call it while the process has one thread.

    Returns None (and workers are exec'd) when the process already runs other threads, or is not on Linux.
    A backend that fails to import is left to the worker, which reports it as it always has.
    """
    global _current
    if _current is not None:
        return current()
    _preload(backend)
    threads = _os_threads()
    if threads != 1 or threading.active_count() != 1:
        # A fork copies only the calling thread, with any lock another one held (numpy's BLAS starts a
        # thread per core unless OPENBLAS_NUM_THREADS=1).
        log.debug("no worker zygote: this process runs %d threads", threads)
        return None
    if not prctl(PR_SET_CHILD_SUBREAPER, 1):
        log.debug("no worker zygote: this process cannot become a child subreaper")
        return None
    from device.runtime.worker import Channel

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    agent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()  # everything so far is shared with the zygote and the workers; the collector leaves it alone
    pid = os.fork()
    if pid == 0:  # the zygote
        code = 1
        try:
            ours.close()
            code = _zygote(Channel(theirs), agent)
        except BaseException:
            _print_exc()
        finally:
            os._exit(code)
    theirs.close()
    _current = Zygote(pid, Channel(ours))
    return _current


def _preload(backend: str) -> None:
    """Imports what every worker imports, so that it is imported once, in the agent, before the fork."""
    import numpy  # noqa: F401  (what every worker imports; the point is to import it once)

    from device.runtime import worker as _worker  # noqa: F401
    from device.runtime import delegates, model  # noqa: F401
    from device.runtime.backends import load_backend

    try:
        load_backend(backend)
    except Exception:  # the worker will say why, in its FAILED message
        pass


def stop() -> None:
    """Ends this process's zygote, if any."""
    global _current
    z, _current = _current, None
    if z is not None:
        z.stop()


# ----- in the zygote ------------------------------------------------------------------------------------------

def _zygote(chan, agent: int) -> int:
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != agent:  # the agent died before the line above
        return 0
    name_process(ZYGOTE_NAME)
    set_cmdline(ZYGOTE_NAME)  # else systemctl status shows the agent's command line for it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is the agent's to handle
    # `systemctl reload` and a stray `kill -HUP` are the agent's too; its handler, inherited, only sets a flag
    # until here. Ignored, HUP is ignored by every worker forked from here as well.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):  # only the agent speaks to systemd
        os.environ.pop(var, None)
    keep = {0, 1, 2, chan.fileno()}
    for fd in _open_fds():
        if fd not in keep:
            try:
                os.close(fd)  # the agent's: its state lock, its config file; a worker must not hold them
            except OSError:
                pass
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    while True:
        try:
            msg, fds = chan.recv_with_fds(2)
        except (EOFError, OSError):
            return 0  # the agent closed its end
        if msg != b"SPAWN" or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        _fork_worker(chan, agent, fds[0], fds[1])
        for fd in fds:
            os.close(fd)


def _open_fds() -> list:
    try:
        return [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return list(range(3, 256))


def _fork_worker(chan, agent: int, sock_fd: int, err_fd: int) -> None:
    """Forks an intermediate process that forks the worker and exits, so the worker is handed to the agent.

    The worker's pid travels back on a pipe, and the agent is told only once the intermediate process has
    been reaped: by then the worker is the agent's child, so the agent can wait for it at once."""
    r, w = os.pipe()
    try:
        mid = os.fork()
    except OSError as exc:
        os.close(r)
        os.close(w)
        chan.send_bytes(f"ERR cannot fork: {exc}".encode())
        return
    if mid == 0:
        code = 1
        try:
            os.close(r)
            pid = os.fork()
            if pid == 0:
                os.close(w)
                _worker(chan, agent, sock_fd, err_fd)  # never returns
            os.write(w, str(pid).encode())
            code = 0
        except BaseException:
            _print_exc()
        finally:
            os._exit(code)
    os.close(w)
    try:
        said = os.read(r, 32)
    finally:
        os.close(r)
    while True:
        try:
            os.waitpid(mid, 0)
            break
        except ChildProcessError:
            break
        except InterruptedError:
            continue
    if said.isdigit():
        chan.send_bytes(b"PID " + said)
    else:
        chan.send_bytes(b"ERR cannot fork the worker (see the agent's log for the zygote's stderr)")


def _worker(chan, agent: int, sock_fd: int, err_fd: int) -> None:
    code = 1
    try:
        os.close(chan.fileno())
        os.dup2(err_fd, 2)
        os.close(err_fd)
        end = time.monotonic() + REPARENT_TIMEOUT_S
        while os.getppid() != agent:  # the intermediate process is exiting; then the agent adopts us
            if time.monotonic() > end or os.getppid() == 1:
                os.write(2, b"fieldnode worker: the agent did not adopt it (is it a child subreaper?)\n")
                os._exit(1)
            time.sleep(0.0005)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != agent:  # the agent died in between
            os._exit(0)
        # The frozen objects stay frozen: they are modules and live as long as the worker, and a collection
        # that walked them would copy every page they sit on.
        from device.runtime import worker

        name_process(worker.WORKER_NAME)
        set_cmdline(worker.WORKER_NAME)

        code = worker.serve_fd(sock_fd)
    except BaseException:
        _print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _print_exc() -> None:
    try:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
    except Exception:
        pass
