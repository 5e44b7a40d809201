"""What process isolation costs in processes and imports: one worker and nothing else, a worker that imports only
what serving needs, and a shared block that outlives no agent."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np

from device.runtime import worker as W
from device.runtime.runtime import Runtime

X = np.zeros((256, 3), np.float32)


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError):
                pass
    return out


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def test_process_isolation_starts_the_worker_and_no_other_process(settings, vibration):
    # multiprocessing's shared memory would start a resource tracker here and another in the worker.
    before = set(children(os.getpid()))
    with Runtime(settings(isolation="process"), manifest=vibration) as rt:
        rt.infer(X)
        rt.set_variant("lite")  # a swap: a new worker, the old one ended
        rt.infer(X)
        new = set(children(os.getpid())) - before
        assert new == {rt.worker_pid}, [cmdline(p) for p in new]
        assert children(rt.worker_pid) == []
        assert "resource_tracker" not in " ".join(cmdline(p) for p in children(os.getpid()))


def test_the_worker_imports_what_serving_needs_and_not_the_agents_libraries(settings, vibration, caplog,
                                                                              monkeypatch):
    # The interpreter's own import report, routed through the worker's stderr into the debug log.
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    with caplog.at_level(logging.DEBUG, logger="device.runtime.worker"):
        with Runtime(settings(isolation="process"), manifest=vibration) as rt:
            rt.infer(X)
            pid = rt.worker_pid
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"worker {pid}: import time:")]
    imported = {line.rsplit("|", 1)[-1].strip() for line in said}
    # (hashlib is not on the list: numpy 1.x imports numpy.random, and with it secrets, on its own)
    assert "numpy" in imported and "device.runtime.model" in imported  # the report was read
    unneeded = {m for m in imported
                if m.split(".")[0] in ("multiprocessing", "paho", "cryptography", "tuf", "serial", "sqlite3", "ssl",
                                       "drivers", "power", "tools")
                or m.startswith(("device.link", "device.update", "device.agent.agent", "device.config"))}
    assert unneeded == set()


def test_a_block_left_by_a_killed_agent_is_removed_by_the_next_one(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "SHM_DIR", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is now free: nothing of that agent runs
    stale = tmp_path / f"fieldnode-{dead.pid}-0123abcd"
    stale.write_bytes(b"\0" * 64)
    live = tmp_path / f"fieldnode-{os.getppid()}-89abcdef"  # an agent that still runs
    live.write_bytes(b"\0" * 64)
    other = tmp_path / "psm_0123abcd"  # not ours
    other.write_bytes(b"")
    block = W.SharedBlock(4096)
    try:
        assert not stale.exists()
        assert live.exists() and other.exists()
        assert os.path.exists(block.path) and os.path.basename(block.path) == block.name
        assert block.name.startswith(f"fieldnode-{os.getpid()}-")
        assert os.stat(block.path).st_mode & 0o777 == 0o600
    finally:
        block.close()
        block.unlink()
    assert not os.path.exists(block.path)


def test_the_worker_maps_the_block_from_its_descriptor_and_refuses_a_short_one(tmp_path, monkeypatch):
    monkeypatch.setattr(W, "SHM_DIR", str(tmp_path))
    block = W.SharedBlock(128)
    try:
        block.buf[:5] = b"hello"
        block.unlink()  # the name is not needed: the descriptor is what the worker gets
        view = W.attach(os.dup(block.fd), 128)
        assert view[:5] == b"hello"
        view[5:6] = b"!"
        assert block.buf[:6] == b"hello!"
        view.close()
        fd = os.dup(block.fd)
        try:
            W.attach(fd, 4096)
        except OSError as exc:
            assert "4096" in str(exc)
        else:
            raise AssertionError("a block smaller than the model's tensors was mapped")
        try:
            os.fstat(fd)
        except OSError:
            pass
        else:
            raise AssertionError("attach left the descriptor open")
    finally:
        block.close()
