"""An installer for the store's tests, run as a real process (``python -m tests.update.storeproc MODE``).

``hold ROOT``: holds the store lock, prints ``held`` and waits for stdin to close.

``serve``: a fork server. It imports the store once, then reads one job per line from stdin::

    install ROOT SRC VERSION commit|rollback STOP

and forks a child that installs the model directory ``SRC`` as ``VERSION`` through the store under ``ROOT``:
begin, write every file in 64 KiB chunks with fsync, activate (trial), then commit or roll back. The child
announces each step boundary (the store's own, through its ``on_step`` seam, and its own) as
``step <pid> <name>``; at the step named ``STOP`` (``-`` for none) it prints ``at <pid> <name>`` and waits to
be killed. It prints ``end <pid>`` when it finished. The server prints ``pid <pid>`` after the fork and
``done <pid> <exit code>`` (negative: the signal) once it has reaped the child. Forking from a warm process
keeps each kill point to a few milliseconds; the child is still a whole process that dies by SIGKILL with its
writes in flight.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from device.update.store.store import ModelStore

CHUNK = 64 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def spawn(*args: str) -> subprocess.Popen:
    """Starts this script in ``MODE`` with line-buffered text pipes on stdin and stdout."""
    return subprocess.Popen([sys.executable, "-m", "tests.update.storeproc", *args], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, bufsize=1)


def say(*words) -> None:
    os.write(1, (" ".join(str(w) for w in words) + "\n").encode())  # one write: lines never interleave


def install(root: str, src: str, version: int, finish: str, stop: str) -> None:
    pid = os.getpid()

    def step(name: str) -> None:
        say("step", pid, name)
        if name == stop:
            say("at", pid, name)
            while True:
                signal.pause()

    store = ModelStore(root, who="storeproc", on_step=step)
    staging = store.begin("vibration", version, size_hint=1024 * 1024)
    step("proc.begun")
    for rel in sorted(os.listdir(src)):
        with open(os.path.join(src, rel), "rb") as f_in, open(staging.path(rel), "wb") as f_out:
            while True:
                chunk = f_in.read(CHUNK)
                if not chunk:
                    break
                f_out.write(chunk)
            f_out.flush()
            os.fsync(f_out.fileno())
        step(f"proc.wrote:{rel}")
    store.activate(staging)
    step("proc.activated")
    if finish == "commit":
        store.commit(version)
        step("proc.committed")
    else:
        store.rollback("a test rolls it back", version)
        step("proc.rolled_back")


def serve() -> None:
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        _cmd, root, src, version, finish, stop = words
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                install(root, src, int(version), finish, stop)
                say("end", os.getpid())
            except BaseException as exc:  # reported, never raised into the server's loop
                say("error", os.getpid(), repr(exc).replace("\n", " "))
                code = 1
            os._exit(code)
        say("pid", pid)
        _, status = os.waitpid(pid, 0)
        say("done", pid, os.waitstatus_to_exitcode(status))


def hold(root: str) -> None:
    with ModelStore(root, who="storeproc").locked("holding the lock for a test"):
        say("held")
        sys.stdin.read()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    elif sys.argv[1] == "hold":
        hold(sys.argv[2])
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")
