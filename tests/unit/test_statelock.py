"""One agent per state directory: the flock in ``agent.lock``, tried against real processes that hold it, die
by SIGKILL, fork and execute children, and run as a user who may not write the directory."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest

from device.errors import FieldnodeError
from device.agent.statelock import StateDirBusy, StateLock, StateLockError, holder, lock_path

# Takes the lock, optionally starts a child that outlives it (an executed one, or a bare fork), prints the
# child's pid (0: none) and waits to be killed.
HOLDER = textwrap.dedent("""
    import os, subprocess, sys, time
    from device.agent.statelock import StateLock
    StateLock(sys.argv[1]).acquire()
    child = 0
    if sys.argv[2] == "exec":
        # close_fds=False: the lock's descriptor must stay out of the child by O_CLOEXEC, not by Popen's care
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], close_fds=False).pid
    elif sys.argv[2] == "fork":
        child = os.fork()
        if child == 0:
            time.sleep(300)
            os._exit(0)
    print(child, flush=True)
    time.sleep(300)
""")


def _start_holder(state_dir, mode="none"):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(state_dir), mode], stdout=subprocess.PIPE,
                            text=True)
    child = int(proc.stdout.readline())  # the lock is held once this line is written
    return proc, child


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        if isinstance(p, subprocess.Popen):
            p.kill()
            p.wait()
        else:
            _kill(p)
            try:
                os.waitpid(p, 0)
            except ChildProcessError:  # not our child (an orphan re-parented away): the kill is enough
                pass


def test_acquire_writes_the_holder_into_the_lock_file(tmp_path):
    state = tmp_path / "state"  # missing: created
    with StateLock(str(state)) as lock:
        assert lock.held
        info = json.loads(open(lock_path(str(state))).read())
        assert info["pid"] == os.getpid()
        assert info["argv"] == sys.argv
        assert info["hostname"] and info["started"].endswith("Z")
        assert holder(str(state))["pid"] == os.getpid()
        inode = os.stat(lock.path).st_ino
    assert not lock.held
    assert holder(str(state)) is None
    assert os.stat(lock_path(str(state))).st_ino == inode  # the lock file is never replaced


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
    with StateLock(str(tmp_path)):
        with pytest.raises(StateDirBusy, match="already locked by this process"):
            StateLock(str(tmp_path)).acquire()


def test_busy_names_the_holding_process_and_how_to_stop_it(tmp_path, procs):
    proc, _ = _start_holder(tmp_path)
    procs.append(proc)
    with pytest.raises(StateDirBusy) as err:
        StateLock(str(tmp_path)).acquire()
    exc = err.value
    assert isinstance(exc, FieldnodeError) and exc.code == "state_dir_busy"
    msg = str(exc)
    assert msg.startswith(f"the state directory {tmp_path} is in use by another fieldnode run (pid {proc.pid}, "
                          f"started 20")
    assert msg.endswith("): stop it first (systemctl stop fieldnode)")
    assert exc.as_json()["holder"]["pid"] == proc.pid
    assert holder(str(tmp_path))["pid"] == proc.pid


def test_sigkill_frees_the_directory_though_the_file_names_the_dead_pid(tmp_path, procs):
    proc, _ = _start_holder(tmp_path)
    procs.append(proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(open(lock_path(str(tmp_path))).read())["pid"] == proc.pid  # stale label
    assert holder(str(tmp_path)) is None  # the kernel, not the label, decides
    with StateLock(str(tmp_path)):
        assert json.loads(open(lock_path(str(tmp_path))).read())["pid"] == os.getpid()


@pytest.mark.parametrize("mode", ["exec", "fork"])
def test_a_child_of_the_holder_does_not_keep_the_lock(tmp_path, procs, mode):
    proc, child = _start_holder(tmp_path, mode)
    procs.extend([proc, child])
    with pytest.raises(StateDirBusy):  # held by the parent while it lives
        StateLock(str(tmp_path)).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    os.kill(child, 0)  # the child outlives its parent...
    assert holder(str(tmp_path)) is None  # ...without the lock
    StateLock(str(tmp_path)).acquire().release()


def test_a_holder_that_wrote_no_label_is_reported_as_unknown_not_as_the_dead_pid(tmp_path, procs):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = lock_path(str(tmp_path))
    with open(path, "w") as f:  # what a holder killed with SIGKILL leaves behind
        json.dump({"pid": dead.pid, "started": "2026-01-01T00:00:00Z"}, f)
    # A process that has just taken the lock and not yet written its label.
    locker = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import fcntl, os, sys, time
        fd = os.open(sys.argv[1], os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(300)
    """), path], stdout=subprocess.PIPE, text=True)
    procs.append(locker)
    assert locker.stdout.readline().strip() == "locked"
    with pytest.raises(StateDirBusy, match=r"in use by another fieldnode run \(pid unknown\)"):
        StateLock(str(tmp_path)).acquire()
    assert holder(str(tmp_path)) == {"pid": None}


def test_the_lock_file_is_never_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("")
    os.symlink(target, lock_path(str(tmp_path)))
    with pytest.raises(StateLockError, match="symbolic link"):
        StateLock(str(tmp_path)).acquire()


def test_a_state_dir_that_is_a_file(tmp_path):
    path = tmp_path / "state"
    path.write_text("not a directory")
    with pytest.raises(StateLockError, match=f"cannot use the state directory {path}: it is not a directory"):
        StateLock(str(path)).acquire()
    assert holder(str(path)) is None


@contextlib.contextmanager
def unprivileged():
    """Runs the block as nobody when the tests run as root (root passes every permission check); the real
    and saved uid stay 0, so the effective ids come back afterwards."""
    if os.geteuid() != 0:
        yield
        return
    groups = os.getgroups()
    os.setgroups([])
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


def _as_user(state_dir, op):
    with unprivileged():
        try:
            StateLock(state_dir).acquire().release() if op == "acquire" else holder(state_dir)
        except StateLockError as exc:
            return {"code": exc.code, "message": str(exc)}
    return {"ok": True}


@pytest.fixture
def shared_dir():
    """A directory an unprivileged user can enter (pytest's own base directory is private to its user)."""
    d = tempfile.mkdtemp(prefix="fieldnode-lock-")
    os.chmod(d, 0o755)
    yield d
    for root, dirs, _ in os.walk(d):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o755)
    shutil.rmtree(d)


def test_an_unwritable_state_dir_is_a_clear_error(shared_dir):
    state = os.path.join(shared_dir, "state")
    os.mkdir(state, 0o555)
    os.chmod(state, 0o555)
    err = _as_user(state, "acquire")
    assert err["code"] == "state_dir_unusable"
    assert err["message"].startswith(f"cannot open the lock file {state}/agent.lock: Permission denied")


def test_a_lock_file_left_by_another_user_names_its_owner(shared_dir):
    state = os.path.join(shared_dir, "state")
    os.mkdir(state, 0o777)
    os.chmod(state, 0o777)
    path = lock_path(state)
    with open(path, "w"):
        pass
    os.chmod(path, 0o600 if os.geteuid() == 0 else 0o000)  # as `sudo fieldnode run` leaves it
    for op in ("acquire", "holder"):
        err = _as_user(state, op)
        assert err["code"] == "state_dir_unusable", op
        assert err["message"].startswith(f"cannot open the lock file {path}: Permission denied (owner uid "
                                          f"{os.geteuid()}, mode 0"), op
