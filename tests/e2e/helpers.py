"""The pieces the end-to-end tests are made of: a notify socket that plays systemd, ``fieldnode run`` as a real
process started the way systemd starts it, the real ``fieldnode`` command line, and read-only looks at a
running agent's spool and processes.

Nothing here reaches into the agent: it is seen only as systemd, the broker, a technician's shell and the
kernel see it (datagrams, MQTT, the control socket, exit codes, ``/proc``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional
from tests.waiting import eventually

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEV = "e2e-board"
PREFIX = f"fieldnode/v1/{DEV}"
WATCHDOG_USEC = 1_000_000  # a ping every 0.5 s: a hang shows within a few seconds
# Generous bounds that only a hang exceeds; never a measure of speed.
HANG_S = 60.0


def fieldnode_argv() -> list[str]:
    """The installed entry point next to this interpreter, else the module (same code path: tools.cli:main)."""
    exe = os.path.join(os.path.dirname(sys.executable), "fieldnode")
    return [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "tools.cli"]


def env_for_child(**extra: str) -> dict:
    """Our environment without systemd's variables (a test run under systemd must not leak its own), plus
    ``extra``, with the checkout importable for ``python -m``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "FIELDNODE_CONFIG")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def short_dir(prefix: str) -> str:
    """A fresh directory under the system temp dir with a short path: Unix socket paths are limited to 107 bytes
    and pytest's tmp_path can be longer."""
    return tempfile.mkdtemp(prefix=prefix)


# ------------------------------------------------------------------------------------------- systemd's side


class NotifyListener:
    """The systemd side of ``$NOTIFY_SOCKET``: a datagram socket that records every message and when it came.

    Args:
        path: Where to bind (a short path).
    """

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self._got: list[tuple[float, int | None, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = time.monotonic()
        # SO_PASSCRED: each datagram says which process sent it, as systemd checks for NotifyAccess=main.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._thread = threading.Thread(target=self._run, name="notify-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except socket.timeout:
                continue
            except OSError:
                return
            pid = None
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", raw[:12])[0]
            with self._lock:
                self._got.append((time.monotonic(), pid, data.decode("utf-8", "replace")))

    def messages(self, pid: int | None = None) -> list[str]:
        """Every datagram so far (from ``pid`` only, when given)."""
        with self._lock:
            return [m for _, p, m in self._got if pid is None or p == pid]

    def senders(self) -> set:
        with self._lock:
            return {p for _, p, _ in self._got}

    def pings(self, pid: int | None = None) -> list[float]:
        """When each ``WATCHDOG=1`` came (monotonic seconds)."""
        with self._lock:
            return [t for t, p, m in self._got if m == "WATCHDOG=1" and (pid is None or p == pid)]

    def quiet_for(self, seconds: float) -> bool:
        """No ping for the last ``seconds`` (a watchdog of twice that would fire), counted from the listener's
        start when there was none yet."""
        p = self.pings()
        return time.monotonic() - (p[-1] if p else self._started) > seconds

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# ------------------------------------------------------------------------------------------------- config


def write_config(path: str, *, state_dir: str, runtime_dir: str, broker_url: str, trust_dir: str,
                 extra: str = "") -> str:
    """A board's config as a person would write it: simulated board, the test broker, fast telemetry.

    ``runtime.deadline_ms`` is high so that a stopped worker hangs the loop (instead of being killed after
    5 s), as the watchdog test needs; the default isolation (a worker process) is kept. No dwell times: a
    level or trim the reload test provokes is undone as soon as its file is restored.
    """
    text = f"""\
# fieldnode.toml for an end-to-end test
[device]
id = "{DEV}"
state_dir = "{state_dir}"
runtime_dir = "{runtime_dir}"
log_level = "info"
log_format = "text"

[runtime]
delegate = "cpu"
threads = 2
deadline_ms = 600000

[drivers]
virtual_board = "rpi4"

[power]
# These checks follow the worker process across signals and reloads; the planner's probes hot-swap it.
planner = false
step_s = 0.5
dwell_s = 0
trim_dwell_s = 0
thermal_target_c = 77

[power.performance]
telemetry_s = 1

[power.balanced]
telemetry_s = 1

[link]
broker = "{broker_url}"
trust_dir = "{trust_dir}"
keepalive_s = 5
backoff_min_s = 0.05
backoff_max_s = 0.5
spool_commit_ms = 20
{extra}"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def edit_config(path: str, replacements: dict[str, str]) -> None:
    """Replaces whole lines (``old line -> new line``) in a config file, failing if one is not there."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for old, new in replacements.items():
        assert old in lines, f"{old!r} not in {path}"
        lines[lines.index(old)] = new
    tmp = path + ".new"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)  # as an editor or a config manager does: the agent never reads half a file


# -------------------------------------------------------------------------------------------- the command line


def fieldnode(*argv: str, timeout: float = HANG_S, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Runs the real ``fieldnode`` command line and returns what it did (text output)."""
    return subprocess.run([*fieldnode_argv(), *argv], capture_output=True, text=True, timeout=timeout,
                          env=env or env_for_child(), stdin=subprocess.DEVNULL)


def fieldnode_json(*argv: str, timeout: float = HANG_S) -> tuple[int, dict]:
    """Runs ``fieldnode ... --json`` and parses its one line of stdout."""
    done = fieldnode(*argv, "--json", timeout=timeout)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, f"fieldnode {' '.join(argv)}: expected one JSON line, got {done.stdout!r} " \
                            f"(stderr {done.stderr!r})"
    return done.returncode, json.loads(lines[0])


# --------------------------------------------------------------------------------------------- the agent


class AgentProcess:
    """``fieldnode run --config CONFIG`` as systemd starts a ``Type=notify`` service with ``WatchdogSec``.

    The child is started through ``sh -c 'WATCHDOG_PID=$$ exec ...'``, so ``$WATCHDOG_PID`` is the agent's own pid
    (systemd sets it to the main pid) and ``self.pid`` is that pid. Its output goes to ``log_path``.

    Args:
        config_path: The board's config file.
        notify: The listener playing systemd, or None for a terminal run (no notify variables).
        log_path: Where the agent's stdout and stderr go.
        args: More ``fieldnode run`` options (``--log-format json``...).
    """

    def __init__(self, config_path: str, notify: Optional[NotifyListener], log_path: str, args: tuple = ()):
        self.config_path, self.notify, self.log_path = config_path, notify, log_path
        extra = {}
        if notify is not None:
            extra = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
        argv = [*fieldnode_argv(), "run", "--config", config_path, *args]
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(["sh", "-c", 'WATCHDOG_PID=$$ exec "$0" "$@"', *argv],
                                         env=env_for_child(**extra), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def log_tail(self, lines: int = 40) -> str:
        return f"--- agent log (pid {self.pid}) ---\n" + "\n".join(self.log().splitlines()[-lines:])

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready(self, timeout: float = HANG_S) -> str:
        """Waits for this agent's ``READY=1`` datagram and returns it."""
        assert self.notify is not None

        def got():
            if self.proc.poll() is not None:
                raise AssertionError(f"the agent exited with {self.proc.returncode} before READY=1\n"
                                     f"{self.log_tail()}")
            return next((m for m in self.notify.messages(self.pid) if m.startswith("READY=1")), None)

        return eventually(got, timeout=timeout, what="READY=1", detail=self.log_tail)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = HANG_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the agent did not exit within {timeout:g} s\n{self.log_tail()}") from None

    def children(self) -> list[int]:
        return children(self.pid)

    def worker_pid(self) -> int:
        """The inference worker: the agent's child named ``fieldnode-infer`` (forked by the zygote) or running
        ``device.runtime.worker`` (exec'd) (waits for it)."""
        def find():
            for pid in self.children():
                if comm(pid) == "fieldnode-infer" or "device.runtime.worker" in cmdline(pid):
                    return pid
            return None

        return eventually(find, timeout=HANG_S, what="the inference worker among the agent's children", detail=self.log_tail)

    def zygote_pid(self) -> int | None:
        """The worker zygote (the agent's child named ``fieldnode-fork``), None when there is none."""
        return next((pid for pid in self.children() if comm(pid) == "fieldnode-fork"), None)

    def kill(self) -> None:
        """SIGKILL to the agent and its whole process group (the end of a test, whatever happened)."""
        for pid in [self.pid, *self.children()]:
            try:
                os.kill(pid, signal.SIGCONT)  # a stopped worker must not outlive the test
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass


# -------------------------------------------------------------------------------------------------- /proc


def children(pid: int) -> list[int]:
    """The children of ``pid`` (every thread's), from ``/proc``."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                out += [int(x) for x in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def comm(pid: int) -> str:
    """The process's name as ``ps`` shows it (``/proc/<pid>/comm``), "" when it is gone."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().decode("utf-8", "replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (``R``, ``S``, ``T`` stopped, ``Z`` zombie...), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


# -------------------------------------------------------------------------------------------------- spool


def spooled_result_ids(state_dir: str) -> list[int]:
    """The result ids committed in the agent's spool right now, read by a read-only second reader (WAL)."""
    path = os.path.join(state_dir, "spool", "spool.db")
    if not os.path.exists(path):
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return [row[0] for row in db.execute("SELECT id FROM messages WHERE kind = 1 ORDER BY id")]
    except sqlite3.OperationalError:  # the writer is between checkpoints; asked again by the caller
        return []
    finally:
        db.close()


def spool_last_id(state_dir: str) -> int:
    """The last id the spool made durable (its ``meta`` row), 0 when unknown yet."""
    path = os.path.join(state_dir, "spool", "spool.db")
    if not os.path.exists(path):
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'last_id'").fetchone()
        return int(row[0]) if row else 0
    except sqlite3.OperationalError:
        return 0
    finally:
        db.close()


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
