"""The whole installer in a real process, for the install crash tests (tests/update/test_install_crash.py).

``python -m tests.update.installproc serve REPO ROOT_FILE IDENTITY_FILE BACKEND`` is a fork server. It imports
the update path, the runtime and the inference backend once, then reads one job per line from stdin::

    install STATE_DIR VERSION ISOLATION AT DELAY

and forks a child that runs the real :class:`~device.update.install.Installer` (its real
:class:`~device.update.client.Repository` on the directory repository ``REPO`` through ``file://`` URLs, a
real store under ``STATE_DIR/update``, board ``board-a`` of hardware class ``rpi4``): ``install(version=VERSION)``.

The child numbers every step boundary it reaches, the installer's ``progress(step, info)`` calls and the
store's own ``on_step`` seam alike, and announces each as ``step <pid> <index> <seconds since the fork>
<name>``. At boundary ``AT`` (``-`` for none; ``-1`` is the child's start) it kills itself with SIGKILL: at
once when ``DELAY`` is 0 (exactly at that boundary), else ``DELAY`` seconds later from a thread, wherever the
installer then is (the child shortens the interpreter's switch interval so that thread runs on time). It
prints ``end <pid> <name> <version> <slot> <state>`` when the install finished, or ``error <pid> <code>
<message>``. The server prints ``pid <pid>`` after the fork and ``done <pid> <exit code>`` (negative: the
signal) once it has reaped the child.

``ISOLATION`` is how the staged model is validated: ``process`` is the installer as shipped (each variant in
its own inference worker); ``inline`` runs the same checks in the child itself, through a
:class:`~device.runtime.runtime.Runtime` whose isolation is forced to ``inline`` (in the child only). A worker
start costs about 0.2 s a variant; the crash tests are about the store's files, not about the worker, so the
hundreds of random kill points validate inline and the step boundaries and a sample of kills inside a
validation use real workers.

Forking from a warm process keeps a kill point to a few milliseconds; the child is still a whole process whose
writes are in flight when it dies. The protocol travels on a copy of the server's stdout: the server's own
fd 1 is pointed at stderr, so nothing a library prints can break a line.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import queue
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEVICE_ID = "board-a"
HWCLASS = "rpi4"
_OUT = 1  # the protocol's file descriptor (see serve)


# --- the test's side --------------------------------------------------------------------------------------

class Run:
    """What one job did: ``steps`` (names, in order), ``times`` (the child's seconds since the fork for each),
    ``code`` (exit code; ``-SIGKILL`` when killed), ``end`` (``(name, version, slot, state)`` when it finished),
    ``error`` (``code message`` when it raised)."""

    def __init__(self) -> None:
        self.steps: list = []
        self.times: list = []
        self.code: int | None = None
        self.end: tuple | None = None
        self.error: str | None = None

    @property
    def killed(self) -> bool:
        return self.code == -signal.SIGKILL


class Server:
    """The fork server, one job at a time.

    Args:
        repo: The repository directory. root_file: The trusted root the board is provisioned with.
        identity_file: The board's age identity. backend: The inference backend's name.
    """

    def __init__(self, repo: str, root_file: str, identity_file: str, backend: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.update.installproc", "serve", repo, root_file,
                                      identity_file, backend], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n").split(maxsplit=5))
        self.lines.put(None)

    def job(self, state_dir: str, version: int, isolation: str = "inline", at: int | None = None,
            delay: float = 0.0) -> Run:
        """Runs one install in a fresh child; ``at``/``delay`` as in the module docstring."""
        run = Run()
        self.proc.stdin.write(f"install {state_dir} {version} {isolation} {'-' if at is None else at} {delay!r}\n")
        while True:
            words = self.lines.get(timeout=120)
            assert words is not None, "the install fork server died"
            kind = words[0]
            if kind == "step":
                assert int(words[2]) == len(run.steps), words
                run.times.append(float(words[3]))
                run.steps.append(words[4])
            elif kind == "end":
                run.end = (words[2], int(words[3]), words[4], words[5])
            elif kind == "error":
                run.error = " ".join(words[2:])
            elif kind == "done":
                run.code = int(words[2])
                return run

    def close(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


# --- the server's side ------------------------------------------------------------------------------------

def say(*words) -> None:
    os.write(_OUT, (" ".join(str(w) for w in words) + "\n").encode())  # one write: lines never interleave


def _force_inline() -> None:
    """Validation in the child itself: every Runtime the installer makes runs inline (this process only)."""
    from device.runtime import runtime

    shipped = runtime.Runtime

    class InlineRuntime(shipped):
        def __init__(self, settings, *args, **kwargs):
            super().__init__(dataclasses.replace(settings, isolation="inline"), *args, **kwargs)

    runtime.Runtime = InlineRuntime


def install(cfg: dict, state_dir: str, version: int, isolation: str, at: int | None, delay: float) -> None:
    from device.runtime.runtime import RuntimeSettings
    from device.update.client import BoardFacts, Repository
    from device.update.install import Installer
    from device.update.store.store import ModelStore

    pid, t0, seen = os.getpid(), time.perf_counter(), [0]

    def die_later() -> None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)

    def boundary(name: str) -> None:
        i = seen[0]
        seen[0] += 1
        say("step", pid, i, f"{time.perf_counter() - t0:.6f}", name)
        if i == at:
            if delay == 0:
                os.kill(pid, signal.SIGKILL)
            else:
                threading.Thread(target=die_later, daemon=True).start()

    if at == -1:
        threading.Thread(target=die_later, daemon=True).start()
    if isolation == "inline":
        _force_inline()
    store = ModelStore.for_state_dir(state_dir, who="installproc", on_step=boundary)
    base = pathlib.Path(cfg["repo"]).as_uri() + "/"
    repo = Repository(os.path.join(store.root, "metadata"), root=cfg["root"], metadata_url=base + "metadata/",
                      targets_url=base + "targets/", grants_url=base + "grants/", attempts=2)
    inst = Installer(repo, store, device_id=DEVICE_ID, identities=cfg["identities"], facts=BoardFacts(HWCLASS),
                     runtime_settings=RuntimeSettings(backend=cfg["backend"], delegate="cpu"),
                     progress=lambda step, info: boundary(step))
    result = inst.install(version=version)
    say("end", pid, result["name"], result["version"], result["slot"], result["state"])


def serve(repo: str, root_file: str, identity_file: str, backend: str) -> None:
    global _OUT
    # Warm imports: each child starts with the update path (python-tuf too), the runtime and the backend loaded,
    # which saves it about 0.1 s; nothing here starts a thread, so forking stays safe.
    import datetime
    import multiprocessing.shared_memory  # noqa: F401
    import zipfile  # noqa: F401 (the test vectors)

    import tuf.ngclient  # noqa: F401

    import device.runtime.runtime  # noqa: F401
    import device.runtime.selftest  # noqa: F401
    import device.update.client  # noqa: F401
    import device.update.install  # noqa: F401
    import device.update.store.store  # noqa: F401
    from device.runtime.backends import load_backend
    from device.update import age

    datetime.datetime.strptime("2000", "%Y")  # python-tuf's expiry dates: strptime loads its module lazily
    load_backend(backend)
    with open(root_file, "rb") as fh:
        cfg = {"repo": repo, "root": fh.read(), "identities": age.read_identity_file(identity_file),
               "backend": backend}
    _OUT = os.dup(1)  # not inherited by what the children exec (the inference workers)
    os.dup2(2, 1)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        _cmd, state_dir, version, isolation, at, delay = words
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                if float(delay) > 0:
                    sys.setswitchinterval(1e-4)  # the killer thread gets the interpreter within 0.1 ms
                install(cfg, state_dir, int(version), isolation, None if at == "-" else int(at), float(delay))
            except BaseException as exc:  # reported, never raised into the server's loop
                say("error", os.getpid(), getattr(exc, "code", type(exc).__name__), str(exc).replace("\n", " "))
                code = 1
            os._exit(code)
        say("pid", pid)
        _, status = os.waitpid(pid, 0)
        say("done", pid, os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(*sys.argv[2:6])
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")
