"""What every diag check shares: the :class:`Check` verdict, the :class:`Context` it reads, and small helpers.

A check is a function ``check(ctx) -> Check`` registered in :data:`CHECKS` by one of the ``diag_checks_*``
modules. It reads the board through ``ctx``: the config,
the sysfs root (the board's, or a fresh virtual board's with ``--sim``), the running agent's status when it
answers, and the time left (:meth:`Context.remaining`), which bounds every wait it makes. A check never
waits on anything unbounded, never changes the board (the one file it may write is the latency baseline of
the models check), and never takes a resource the running agent holds: what the agent owns (the sensor port,
the spool, the GPIO lines, an Edge TPU) is asked of the agent instead.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
STATUSES = (OK, WARN, FAIL, SKIP)
CONFIG_REMEDY = "fix the config first ('fieldnode config check' names the key), then run diag again"
SERVICE_USER = SERVICE_GROUP = "fieldnode"
RUN_ALL = "sudo fieldnode diag"


@dataclass(frozen=True)
class Who:
    """Who runs diag, as far as the checks care: what the service's files and socket let this user see.

    Attributes:
        user: The user's name (or ``uid N`` when it has none).
        root: Whether it is root (sees everything).
        service: Whether it is the agent's own user ``fieldnode``.
        in_group: Whether it is in the group ``fieldnode`` (may use the control socket).
    """

    user: str
    root: bool = False
    service: bool = False
    in_group: bool = False

    @property
    def limited(self) -> bool:
        """Outside the group: the agent's socket, its lock and its files are closed to this user."""
        return not (self.root or self.service or self.in_group)

    @property
    def not_the_service(self) -> bool:
        """Neither root nor the agent's user: what the service may open (its serial port, its spool), this
        user may not, and that says nothing about the service."""
        return not (self.root or self.service)

    def limited_line(self) -> str:
        """The one line printed up front for a limited user."""
        return (f"NOTE {self.user} is not in the group {SERVICE_GROUP}: the checks that need the running agent, its "
                f"files or its ports are limited; run them all with: {RUN_ALL}")


def whoami() -> Who:
    """This process's :class:`Who` (a test passes its own to :func:`device.diag.runner.run_checks`)."""
    import grp
    import pwd

    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"uid {uid}"
    from device.configfiles import service_user

    try:
        g = grp.getgrnam(service_user())
        in_group = g.gr_gid in os.getgroups() or g.gr_gid == os.getegid() or user in g.gr_mem
    except KeyError:  # no such group here (a development machine): nobody is in it
        in_group = False
    return Who(user, root=uid == 0, service=user == service_user(), in_group=in_group)


def permission_denied(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what it was raised from) is EACCES/EPERM: a refusal of this user, not a fault."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, PermissionError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


@dataclass(frozen=True)
class Check:
    """One check's verdict.

    Attributes:
        name: The check's name (``config``, ``broker``, ``sensor``...).
        status: ``OK``, ``WARN``, ``FAIL`` or ``SKIP``.
        detail: What was found, in one line.
        remedy: For ``WARN`` and ``FAIL``, one line a technician can act on; empty otherwise.
    """

    name: str
    status: str
    detail: str
    remedy: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check {self.name}: status must be one of {', '.join(STATUSES)}, got {self.status!r}")
        if self.status in (WARN, FAIL) and not self.remedy:
            raise ValueError(f"check {self.name}: a {self.status} needs a remedy")

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "detail": self.detail, "remedy": self.remedy}


def ok(name: str, detail: str) -> Check:
    return Check(name, OK, detail)


def warn(name: str, detail: str, remedy: str) -> Check:
    return Check(name, WARN, detail, remedy)


def fail(name: str, detail: str, remedy: str) -> Check:
    return Check(name, FAIL, detail, remedy)


def skip(name: str, detail: str) -> Check:
    return Check(name, SKIP, detail)


def worst(name: str, found: list[Check], ok_detail: str) -> Check:
    """Folds several findings of one check into one verdict: the worst status, every problem's detail, the
    first remedy of the worst; ``ok_detail`` (plus any OK details) when nothing is wrong."""
    bad = [c for c in found if c.status in (WARN, FAIL)]
    if not bad:
        return ok(name, "; ".join([ok_detail] + [c.detail for c in found if c.status == OK and c.detail]))
    top = FAIL if any(c.status == FAIL for c in bad) else WARN
    remedy = next(c.remedy for c in bad if c.status == top)
    return Check(name, top, "; ".join(c.detail for c in bad), remedy)


@dataclass(frozen=True)
class Spec:
    """A registered check: its name, the function, whether it needs a config that loaded."""

    name: str
    fn: Callable
    needs_config: bool = True


# name -> Spec; device.diag.runner.ORDER says in which order they run and show.
CHECKS: dict[str, Spec] = {}


def register(name: str, *, needs_config: bool = True):
    """Registers ``fn(ctx)`` as check ``name``."""

    def deco(fn):
        CHECKS[name] = Spec(name, fn, needs_config)
        return fn

    return deco


class Context:
    """What the checks read, built once per diag run and shared by the checks' threads.

    Args:
        cfg: The configuration (with ``--sim`` already applied as ``drivers.virtual_board``).
        sim: The virtual board profile with ``--sim``, else None.
        deadline: ``time.monotonic()`` by which every check must have finished.
        sample_s: How long the sensor is sampled.
        clock: Wall time for the clock check (a board with an unset clock is a test's clock).
        who: Who runs diag (:func:`whoami` when None).
    """

    def __init__(self, cfg, *, sim: str | None, deadline: float, sample_s: float, clock=None,
                 who: Who | None = None):
        from device.clock import SYSTEM_CLOCK

        self.cfg = cfg
        self.who = who or whoami()
        self.agent_denied = False  # the control socket refused this user (EACCES): says nothing of the agent
        self.clock = clock or SYSTEM_CLOCK
        self.sim = sim
        self.deadline = deadline
        self.sample_s = sample_s
        self.state_dir = cfg.device.state_dir
        self._lock = threading.Lock()
        self._agent_lock = threading.Lock()
        self._board = None
        self._board_dir: tempfile.TemporaryDirectory | None = None
        self._fs = None
        self._agent: tuple | None = None
        self._accel = None

    def remaining(self, cap: float | None = None) -> float:
        """Seconds left before the deadline (at least a token 0.05 s), at most ``cap``."""
        left = max(0.05, self.deadline - time.monotonic())
        return left if cap is None else min(cap, left)

    @property
    def fs(self):
        """The sysfs root the hardware checks read: the virtual board's with ``--sim``, else the board's."""
        with self._lock:
            if self._fs is None:
                if self.sim:
                    from drivers.sim.board import VirtualBoard

                    # A fresh board in a temporary directory: a running simulated agent's tree is left alone.
                    self._board_dir = tempfile.TemporaryDirectory(prefix="fieldnode-diag-board-")
                    self._board = VirtualBoard(self._board_dir.name, self.sim, ambient_c=25.0)
                    self._fs = self._board.fs
                else:
                    from drivers.sysfs import Sysfs, resolve_root

                    self._fs = Sysfs(resolve_root(self.cfg.drivers.sysfs_root))
            return self._fs

    def accelerators(self):
        """The accelerator discovery of :attr:`fs` (once per run)."""
        fs = self.fs
        with self._lock:
            if self._accel is None:
                from drivers.accel import discover

                self._accel = discover(fs)
            return self._accel

    def agent(self) -> tuple[dict | None, str]:
        """The running agent's status over its control socket, asked once per run.

        Returns:
            ``(status, why)``: the status dict when the agent answers (``why`` says where from), else ``None``
            and why not (no agent holds the state directory, it does not answer, or this build has no socket).
        """
        with self._agent_lock:  # not the board's lock: asking may take its whole timeout
            if self._agent is None:
                status, why, denied = ask_agent_denied(self.cfg, self.remaining(2.0))
                self._agent, self.agent_denied = (status, why), denied
            return self._agent

    def use_agent_status(self, status: dict) -> None:
        """The agent runs this diagnosis itself and hands its status over (no round trip through its socket)."""
        with self._agent_lock:
            self._agent = (status, "the agent itself")

    def holder(self) -> dict | None:
        """Who holds the state directory's lock (the running agent), or None when nobody does. When it cannot
        tell (the lock file is the service's, 0600, and we are not root) it says so with ``{"pid": None,
        "unknown": why}``: a check must then not open what an agent may hold."""
        from device.agent.statelock import holder

        if not os.path.isdir(self.state_dir):
            return None
        try:
            return holder(self.state_dir)
        except Exception as exc:  # no permission on the lock file: an agent may hold it
            return {"pid": None, "unknown": str(exc)}

    def held_by_agent(self, what: str) -> Check | None:
        """A SKIP for a check that would open ``what`` while an agent may hold it (and did not answer), else
        None. Never in a simulation: its hardware is its own."""
        if self.sim:
            return None
        h = self.holder()
        if not h:
            return None
        _status, why = self.agent()
        who = f"pid {h['pid']}" if h.get("pid") else "an agent (whose lock this user cannot read)"
        if self.agent_denied:
            return skip(what, f"not opened: the state directory is held by {who}, whose control socket refuses "
                              f"{self.who.user} (not in the group {SERVICE_GROUP}); {RUN_ALL} reads it from the agent")
        return skip(what, f"not opened: the state directory is held by {who}, which did not answer ({why}); "
                          f"run diag with sudo, or as a member of the group fieldnode, to read it from the agent")

    def close(self) -> None:
        with self._lock:
            if self._board is not None:
                self._board.stop()
            if self._board_dir is not None:
                self._board_dir.cleanup()
            self._board = self._board_dir = None


def control_socket(cfg) -> str:
    """The control socket's path for this config (the control module's rule, not a copy of it)."""
    from device.control import socket_path

    return socket_path(cfg)


def ask_agent(cfg, timeout: float) -> tuple[dict | None, str]:
    """The running agent's ``status`` over its control socket: ``(status, where from)`` or ``(None, why not)``."""
    status, why, _denied = ask_agent_denied(cfg, timeout)
    return status, why


def ask_agent_denied(cfg, timeout: float) -> tuple[dict | None, str, bool]:
    """:func:`ask_agent`, and whether the socket refused this user (EACCES): then nothing is known of the agent."""
    try:
        from device.control import ControlUnavailable, request
    except ImportError:
        return None, "this build of fieldnode has no control socket", False
    try:
        path = control_socket(cfg)
        status = request(path, "status", timeout=timeout)
    except ControlUnavailable as exc:
        return None, str(exc), permission_denied(exc) or "permission denied" in str(exc).lower()
    except Exception as exc:  # an answer we cannot read is no answer
        return None, f"{type(exc).__name__}: {exc}", False
    if not isinstance(status, dict):
        return None, f"the agent answered status with {type(status).__name__}, not an object", False
    return status, f"the running agent (control socket {path})", False


# ----------------------------------------------------------------------------------------------- files


def file_mode_problem(path: str, what: str, key: str, agent_user: str | None = None) -> Check | None:
    """Whether a secret file is safe and usable: exists, a regular file, mode 0600, owned by the agent's user.

    The group ``fieldnode`` is the one technicians join for ``fieldnode status``, so a key its group can read is
    readable by them: only 0600 passes. A key the agent's user (``fieldnode``, when it exists here) does not own is
    one the service cannot read.

    Returns:
        None when it is fine, else a WARN (any group bit) or a FAIL (missing, not a regular file, readable or
        writable by every user, or owned by another user than the agent's), each with the ``chown``/``chmod``.
    """
    import pwd

    from device.configfiles import service_user

    agent_user = agent_user or service_user()
    fix = f"chown {agent_user}:{agent_user} {path} && chmod 600 {path}"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return fail("keys", f"{what} {path} ({key}) does not exist",
                    f"create it (fieldnode provision) or fix {key}")
    except OSError as exc:
        return fail("keys", f"{what} {path} ({key}): cannot stat it ({exc.strerror or exc})",
                    f"check the directories above {path} are searchable by the fieldnode user")
    if not stat.S_ISREG(st.st_mode):
        return fail("keys", f"{what} {path} ({key}) is not a regular file", f"point {key} at the key file itself")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007:
        return fail("keys", f"{what} {path} is mode {mode:04o}: every user on the board can "
                            f"{'write' if mode & 0o002 else 'read'} it", fix)
    try:
        agent_uid = pwd.getpwnam(agent_user).pw_uid
    except KeyError:  # no service user here (a development machine): nobody to compare with
        agent_uid = None
    if agent_uid is not None and st.st_uid != agent_uid:
        return fail("keys", f"{what} {path} is owned by uid {st.st_uid}, not the agent's user {agent_user}: "
                            f"the service cannot read it", fix)
    if mode & 0o070 or mode & 0o111:
        return warn("keys", f"{what} {path} is mode {mode:04o}: the group (technicians join fieldnode for "
                            f"fieldnode status) can {'write' if mode & 0o020 else 'read'} it"
                    if mode & 0o070 else f"{what} {path} is mode {mode:04o}: executable", fix)
    return None


def nearest_dir(path: str) -> str:
    """``path`` or its nearest existing ancestor (what ``statvfs`` can be asked about)."""
    path = os.path.abspath(path)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def which(tool: str) -> str | None:
    """A tool on PATH or in the sbin directories (off a normal user's PATH)."""
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")


def systemd_running() -> bool:
    """systemd is the init system (sd_booted(): ``/run/systemd/system`` exists)."""
    return os.path.isdir("/run/systemd/system")
