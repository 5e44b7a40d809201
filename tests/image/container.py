"""A booted Debian root for the systemd stage of the image test (:mod:`tests.image.nspawntest`): ``systemd-nspawn
-b`` with systemd as PID 1, driven from this machine through ``nsenter`` (``systemctl``, ``journalctl``), and
always halted at the end.

Run it inside a private mount namespace: :meth:`Container.boot` mounts a tmpfs over ``/run`` there, because
nspawn keeps its state in ``/run/systemd/nspawn`` and this machine's ``/run`` must not be touched.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess

from tests.image.imagetest import StepFailed, run_step
from tests.waiting import eventually

BOUND_S = 120.0  # the longest any one awaited thing may take
PR_SET_PDEATHSIG = 1


class Container:
    """A booted root: its systemd is driven through ``nsenter``; :meth:`stop` always ends it."""

    def __init__(self, root: str, run_dir: str, binds: list[tuple[str, str]], machine: str, unit: str):
        self.root, self.run_dir, self.binds, self.machine, self.unit = root, run_dir, binds, machine, unit
        self.proc: subprocess.Popen | None = None
        self.init_pid: int | None = None
        self.console = os.path.join(run_dir, "console.log")

    def boot(self) -> None:
        """Boots the root and waits for the end of its boot (``systemctl is-system-running --wait``)."""
        try:  # the parent is the test's process outside the namespace (unshare executed this one)
            shared = os.readlink("/proc/self/ns/mnt") == os.readlink(f"/proc/{os.getppid()}/ns/mnt")
        except OSError as exc:
            raise StepFailed(f"cannot tell whether this is a private mount namespace: {exc}") from exc
        if shared:
            raise StepFailed("not in a private mount namespace: the tmpfs over /run would hide this machine's own "
                             "(run it through `unshare --mount --propagation private`)")
        # nspawn keeps state under /run/systemd/nspawn: a tmpfs over /run, in this namespace only.
        run_step(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run"], "mounting a private /run")
        os.makedirs("/run/systemd/nspawn")
        argv = ["systemd-nspawn", "-q", "-D", self.root, "-b", "--register=no", "--keep-unit",
                f"--machine={self.machine}"] + [f"--bind={host}:{inside}" for host, inside in self.binds]
        with open(self.console, "wb") as out:  # nspawn halts the container when this process dies
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=die_with_parent)
        self.init_pid = wait_for(self._find_init, "the container's systemd to start", self.tail)

        def booted() -> str | None:
            # Says nothing (exit 1) until the manager's socket is up; then waits for the boot to end.
            said = self.sh(["systemctl", "is-system-running", "--wait"], "systemctl is-system-running --wait",
                           ok=range(256)).stdout.strip()
            if said and said not in ("running", "degraded"):
                raise StepFailed(f"the container's systemd says {said!r}\n{self.tail()}")
            return said or None

        wait_for(booted, "end of the container's boot", self.tail)

    def _find_init(self) -> int | None:
        """The container's PID 1 as this machine sees it: the descendant of nspawn that is 1 in its namespace."""
        if self.proc.poll() is not None:
            raise StepFailed(f"systemd-nspawn exited {self.proc.returncode}\n{self.tail()}")
        for pid in descendants(self.proc.pid):
            nspid = _status_field(pid, "NSpid").split()
            # PID 1 is nspawn's own code until it executes systemd: only then is there a manager to ask.
            if len(nspid) > 1 and nspid[-1] == "1" and comm(pid) == "systemd":
                return pid
        return None

    def sh(self, argv: list[str], what: str, ok=(0,), timeout: float = BOUND_S) -> subprocess.CompletedProcess:
        """Runs a command in the container (all its namespaces, as its root)."""
        return run_step(["nsenter", "-t", str(self.init_pid), "-a"] + argv, what, ok=ok, timeout=timeout)

    def show(self, *props: str) -> dict:
        out = self.sh(["systemctl", "show", self.unit, "-p", ",".join(props)], "systemctl show").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *extra: str) -> str:
        return self.sh(["journalctl", "-u", self.unit, "--no-pager", "-o", "cat"] + list(extra), "journalctl").stdout

    def tail(self) -> str:
        try:
            with open(self.console, "rb") as fh:
                console = fh.read()[-3000:].decode("utf-8", "replace")
        except OSError:
            console = ""
        journal = ""
        if self.init_pid is not None and self.proc.poll() is None:
            try:
                journal = self.journal("-n", "60", "-o", "short-monotonic")
            except StepFailed as exc:
                journal = str(exc)
        return f"--- journal of {self.unit} ---\n{journal}\n--- container console ---\n{console}"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # nspawn halts the container (SIGRTMIN+3 to its systemd)
        try:
            self.proc.wait(30)
            return
        except subprocess.TimeoutExpired:
            pass
        for pid in ([self.init_pid] if self.init_pid else []) + [self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)  # the init of a PID namespace takes every process in it along
            except ProcessLookupError:
                pass
        self.proc.wait(30)


# ------------------------------------------------------------------------------------------------ helpers


def wait_for(pred, what: str, detail=lambda: "", timeout: float = BOUND_S, every: float = 0.2):
    """:func:`tests.waiting.eventually`, failing as a step of the stage (:class:`StepFailed`, which the stage
    reports with what was seen) instead of as a test."""
    try:
        return eventually(pred, timeout=timeout, what=what, detail=detail, interval=every)
    except AssertionError as exc:
        raise StepFailed(str(exc)) from None


def _status_field(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(name + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, parents before children (as this machine numbers them)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = _status_field(int(entry), "PPid")
            if ppid.isdigit():
                parents.setdefault(int(ppid), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(0), []):
            out.append(child)
            todo.append(child)
    return out


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGTERM when this process dies (nspawn then halts its container)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
