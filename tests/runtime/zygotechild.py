"""A fresh process that starts the worker zygote as ``fieldnode run`` does, then plays one scenario and prints
one JSON line of what it saw. ``tests/runtime/test_zygote.py`` runs it: the zygote must be forked from a
process with one thread, which the test process (pytest, with earlier tests' threads) is not.

    python -m tests.runtime.zygotechild SCENARIO BACKEND TMPDIR
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_ended(pid: int, limit: float = 30.0) -> None:
    """Until ``pid`` is gone or a zombie whose threads have all ended (its descriptors closed)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            if state(pid) in (None, "Z") and len(os.listdir(f"/proc/{pid}/task")) <= 1:
                return
        except FileNotFoundError:
            return
        time.sleep(0.01)


def wait_reaped(pid: int, limit: float = 30.0) -> bool:
    """Whether ``pid`` is gone (reaped, not a zombie) within ``limit`` seconds."""
    end = time.monotonic() + limit
    while state(pid) is not None:
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def describe(pid: int) -> dict:
    return {"pid": pid, "comm": comm(pid), "ppid": ppid(pid), "exec": "device.runtime.worker" in cmdline(pid)}


def main(scenario: str, backend: str, tmp: str) -> dict:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as `fieldnode run` does (device/agent/daemon.py)
    warnings: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())

    logging.getLogger().addHandler(Keep())
    from device.runtime import zygote

    if scenario == "threads":
        stop = threading.Event()
        t = threading.Thread(target=stop.wait)
        t.start()
        try:
            return {"zygote": zygote.start(backend) is not None}
        finally:
            stop.set()
            t.join()

    z = zygote.start(backend)
    out: dict = {"me": os.getpid(), "warnings": warnings}
    import numpy as np

    from device.runtime import errors as E
    from device.runtime.manifest import bundled_model_dir, load_manifest
    from device.runtime.runtime import Runtime, RuntimeSettings

    settings = RuntimeSettings(backend=backend, delegate="cpu", warmup_runs=0)
    x = np.random.default_rng(1).normal(0, 1, (256, 3)).astype(np.float32)

    if scenario == "serve":
        vib = load_manifest(bundled_model_dir())
        with Runtime(settings, manifest=vib) as rp, Runtime(RuntimeSettings(backend=backend, delegate="cpu",
                                                                            isolation="inline"), manifest=vib) as ri:
            first = rp.worker_pid
            out["first"] = describe(first)
            out["zygote"] = {"pid": z.pid, "comm": comm(z.pid), "ppid": ppid(z.pid)}  # named by now
            out["equal"] = bool(np.array_equal(rp.infer(x).outputs[0], ri.infer(x).outputs[0]))
            os.kill(first, signal.SIGKILL)
            wait_ended(first)
            try:
                rp.infer(x)
                out["after_kill"] = "served"
            except E.WorkerCrashed as exc:
                out["after_kill"] = str(exc)
            out["first_state_after"] = state(first)  # reaped by us: gone, not a zombie
            out["equal_after_restart"] = bool(np.array_equal(rp.infer(x).outputs[0], ri.infer(x).outputs[0]))
            second = rp.worker_pid
            out["second"] = describe(second)
            rp.set_variant("lite")  # a hot swap starts the next worker from the swap's own thread
            third = rp.worker_pid
            out["third"] = describe(third)
            out["lite_served"] = rp.infer(x).outputs[0].shape == ri.infer(x).outputs[0].shape
            out["status"] = {k: rp.status()[k] for k in ("crashes", "restarts")}
        out["after_close"] = {str(p): state(p) for p in (first, second, third)}
    elif scenario == "crash":
        sys.path.insert(0, os.getcwd())
        from tests.conftest import TEST_MODELS
        from tests.runtime.crashmodel import make_crashing_model

        good = (TEST_MODELS / "mobilenet_v2_0.35_96_int8.tflite").read_bytes()
        path = os.path.join(tmp, "crashy.tflite")
        with open(path, "wb") as f:
            f.write(make_crashing_model(good))
        rt = Runtime(settings, manifest=load_manifest(path))
        try:
            rt.start(strict=True)
            out["crash"] = "started"
        except E.WorkerCrashed as exc:
            out["crash"] = str(exc)
        rt.close()
    elif scenario == "zygote_killed":
        os.kill(z.pid, signal.SIGKILL)
        out["reaped_at_once"] = wait_reaped(z.pid)  # before any worker is asked for: not left a zombie
        out["current_before_spawn"] = zygote.current() is not None
        out["warned_before_spawn"] = [w for w in warnings if "zygote" in w]
        vib = load_manifest(bundled_model_dir())
        with Runtime(settings, manifest=vib) as rp:
            out["worker"] = describe(rp.worker_pid)
            out["served"] = rp.infer(x).outputs[0].shape[-1]
            rp.set_variant("lite")
            out["worker2"] = describe(rp.worker_pid)
        out["zygote_state"] = state(z.pid)
        out["current"] = zygote.current() is not None
    elif scenario == "orphan":
        rp = Runtime(settings, manifest=load_manifest(bundled_model_dir()))
        rp.start()
        print(json.dumps({"zygote": z.pid, "worker": rp.worker_pid}), flush=True)
        time.sleep(600)  # the test SIGKILLs this process now
    zygote.stop()
    out["zygote_after_stop"] = state(z.pid) if z is not None else None
    return out


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])), flush=True)
