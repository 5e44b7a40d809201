"""device/linux.py on this Linux: a forked process's name and command line, as ps and systemctl status show them."""

from __future__ import annotations

import os

from device.linux import name_process, set_cmdline


def _in_child(fn) -> int:
    """Runs ``fn`` in a forked child that then waits to be read; returns its pid (the caller reaps it)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        fn()
        os.write(w, b"x")
        os.close(w)
        import time

        time.sleep(60)  # killed by the test once it has read /proc
        os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"x"
    os.close(r)
    return pid


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_a_forked_process_gets_its_own_command_line_and_name_and_the_parent_keeps_its_own():
    mine = _read("/proc/self/cmdline")
    pid = _in_child(lambda: (name_process(b"fieldnode-fork"), set_cmdline(b"fieldnode-fork")))
    try:
        assert _read(f"/proc/{pid}/cmdline").rstrip(b"\0") == b"fieldnode-fork"
        assert _read(f"/proc/{pid}/comm") == b"fieldnode-fork\n"
        assert _read("/proc/self/cmdline") == mine
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_a_title_longer_than_the_command_line_is_cut_to_it():
    size = len(_read("/proc/self/cmdline"))
    pid = _in_child(lambda: set_cmdline(b"x" * (size + 100)))
    try:
        assert _read(f"/proc/{pid}/cmdline").rstrip(b"\0") == b"x" * (size - 1)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
