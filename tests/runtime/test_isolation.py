"""Process isolation with real processes: crashes, kills, hangs and quarantine never take the agent down."""

import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from tests.conftest import ROOT, TEST_MODELS
from device.runtime import errors as E
from device.runtime.runtime import Runtime
from device.runtime.supervisor import ProcessEngine
from tests.runtime.crashmodel import make_crashing_model
from tests.waiting import eventually

SLOW = str(TEST_MODELS / "slow_conv_int8.tflite")


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); treat it as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_process_results_equal_inline_and_worker_is_a_separate_process(settings, vibration):
    x = np.random.default_rng(3).normal(0, 1, (256, 3)).astype(np.float32)
    with Runtime(settings(isolation="process"), manifest=vibration) as rp, \
            Runtime(settings(isolation="inline"), manifest=vibration) as ri:
        assert rp.worker_pid not in (None, os.getpid()) and alive(rp.worker_pid)
        for variant in ("full", "lite"):
            if rp.variant != variant:
                rp.set_variant(variant)
                ri.set_variant(variant)
            assert np.array_equal(rp.infer(x).outputs[0], ri.infer(x).outputs[0])
        st = rp.status()
        assert st["isolation"] == "process" and st["requests"] == 2 and st["invoke"]["count"] == 1


def test_process_isolation_is_bit_identical_to_the_bare_interpreter_for_every_shipped_model(settings, backend,
                                                                                            single_model):
    from tests.runtime.test_model import random_input, shipped_model_files
    from device.runtime.manifest import bundled_model_dir, load_manifest

    for path in shipped_model_files(load_manifest(bundled_model_dir())):
        with Runtime(settings(isolation="process", warmup_runs=0), manifest=single_model(path)) as rt:
            spec = rt._engine.inputs[0]
            bare = backend.Interpreter(model_path=path, num_threads=2)
            bare.allocate_tensors()
            x = random_input(spec, seed=5)
            bare.set_tensor(spec.index, x)
            bare.invoke()
            assert np.array_equal(rt.infer(x).outputs[0], bare.get_tensor(rt._engine.outputs[0].index)), path


def test_crashing_model_fails_cleanly_then_is_quarantined(settings, single_model):
    good = open(str(TEST_MODELS / "mobilenet_v2_0.35_96_int8.tflite"), "rb").read()
    manifest = single_model(make_crashing_model(good), "crashy.tflite")
    events = []
    rt = Runtime(settings(isolation="process", quarantine_after=3, warmup_runs=0), manifest=manifest,
                 on_event=lambda k, d: events.append((k, d)))
    rt.start()  # a model fault never raises: the crash is retried until the file is quarantined
    assert [k for k, _ in events] == ["worker_crashed", "worker_crashed", "model_quarantined", "not_serving"]
    for _, d in events[:3]:
        assert "was killed by signal" in d["message"] and "crashy.tflite" in d["message"]
        assert d["variant"] == "default" and d["path"].endswith("crashy.tflite")
    assert "quarantined after 3 consecutive failures" in events[2][1]["message"]
    assert not rt.serving and rt.status()["crashes"] == 0  # no worker of this runtime lived to be counted
    # Quarantined now: refused at once, without another worker being spawned.
    rt.start()
    assert len(events) == 4 and not rt.serving
    with pytest.raises(E.NotServing, match="crashy.tflite is quarantined"):
        rt.infer(np.zeros((1, 96, 96, 3), np.int8))
    (entry,) = rt.quarantine.entries()
    assert entry.path.endswith("crashy.tflite") and entry.crashes == 3
    assert rt.status()["quarantined"][0]["sha256"] == entry.sha256
    rt.close()


def test_a_crash_names_what_the_worker_said_on_stderr(settings, single_model):
    # The worker's stderr is a pipe: a fatal signal's faulthandler dump is kept for the crash's message.
    good = open(str(TEST_MODELS / "mobilenet_v2_0.35_96_int8.tflite"), "rb").read()
    manifest = single_model(make_crashing_model(good), "crashy.tflite")
    rt = Runtime(settings(isolation="process", warmup_runs=0), manifest=manifest)
    with pytest.raises(E.WorkerCrashed) as err:
        rt.start(strict=True)  # exactly this variant, once, and its fault raised (what bench does)
    text = str(err.value)
    assert "while loading crashy.tflite" in text
    assert "its stderr: Fatal Python error: Segmentation fault" in text and "allocate_tensors" in text
    assert "INFO: Created TensorFlow Lite" not in text  # the interpreter's chatter is not a reason


def test_garbage_model_is_refused_cleanly_not_counted_as_crash(settings, single_model):
    manifest = single_model(b"\x18\x00\x00\x00TFL3" + bytes(range(256)) * 4, "garbage.tflite")
    rt = Runtime(settings(isolation="process"), manifest=manifest)
    for _ in range(4):
        rt.start()
        assert not rt.serving and "garbage.tflite" in rt.status()["not_serving_reason"]
    with pytest.raises(E.ModelInvalid, match="garbage.tflite"):
        rt.start(strict=True)
    assert rt.quarantine.entries() == []


def test_worker_sigkilled_mid_request_fails_the_request_and_restarts(settings, single_model, vibration):
    manifest = single_model(SLOW, "slow.tflite")
    eng_rt = Runtime(settings(isolation="process", warmup_runs=0, deadline_ms=600_000), manifest=manifest)
    with eng_rt as rt:
        pid = rt.worker_pid
        x = np.zeros(rt._engine.inputs[0].shape, np.int8)
        outcome = {}

        def request():
            try:
                rt.infer(x)
                outcome["ok"] = True
            except Exception as exc:  # noqa: BLE001 - we assert on the type below
                outcome["error"] = exc

        before = cpu_ticks(pid)
        t = threading.Thread(target=request)
        t.start()
        eventually(lambda: cpu_ticks(pid) > before + 5, timeout=60.0, what="the worker to be busy inferring")
        os.kill(pid, signal.SIGKILL)
        t.join(60)
        err = outcome.get("error")
        assert isinstance(err, E.WorkerCrashed), outcome
        assert "SIGKILL" in str(err) and "during inference" in str(err)
        assert not alive(pid)
        # The next request restarts the worker and succeeds (the slow model takes a moment).
        r = rt.infer(x)
        assert r.outputs[0].dtype == np.int8
        st = rt.status()
        assert st["crashes"] == 1 and st["restarts"] == 1 and st["worker_pid"] != pid
        assert rt.quarantine.crashes(manifest.variant("default").path) == 0  # the success reset the count


def test_hung_worker_is_killed_at_the_deadline_and_restarted(backend, single_model):
    from device.runtime.delegates import plan
    from device.runtime.worker import WorkerSpec

    manifest = single_model(SLOW, "slow.tflite")
    cands, _ = plan(manifest, "default", "cpu")
    eng = ProcessEngine(WorkerSpec(backend.name, tuple(cands), threads=1, warmup_runs=0), deadline_s=0.05)
    eng.start()
    try:
        pid = eng.pid
        x = np.zeros(eng.inputs[0].shape, np.int8)
        with pytest.raises(E.WorkerTimeout, match="no answer within 50 ms"):
            eng.infer(x)
        assert not alive(pid) and eng.pid is None and eng.timeouts == 1
        eng.deadline_s = 600.0
        assert eng.infer(x).outputs[0].shape == tuple(eng.outputs[0].shape)
        assert eng.pid != pid and eng.restarts == 1
    finally:
        eng.close()
    assert eng.pid is None


def test_bad_input_is_refused_before_the_worker_and_does_not_disturb_it(settings, vibration):
    with Runtime(settings(isolation="process"), manifest=vibration) as rt:
        pid = rt.worker_pid
        with pytest.raises(E.InputInvalid, match=r"must have shape \[1, 256, 3\]"):
            rt.infer(np.zeros((100, 3), np.float32))
        with pytest.raises(E.InputInvalid, match="takes 1 input"):
            rt.infer()
        assert rt.infer(np.zeros((256, 3), np.float32)).outputs[0].shape == (1, 4)
        assert rt.worker_pid == pid and rt.status()["crashes"] == 0


def test_start_twice_keeps_one_worker(settings, vibration):
    with Runtime(settings(isolation="process"), manifest=vibration) as rt:
        pid = rt.worker_pid
        rt.start()  # must neither replace nor leak the running worker
        assert rt.worker_pid == pid and alive(pid)
        assert rt.infer(np.zeros((256, 3), np.float32)).outputs[0].shape == (1, 4)


def test_close_stops_the_worker_and_frees_shared_memory(settings, vibration):
    rt = Runtime(settings(isolation="process"), manifest=vibration)
    rt.start()
    pid = rt.worker_pid
    shm_name = rt._engine._shm.name
    assert os.path.exists(f"/dev/shm/{shm_name}")
    rt.close()
    eventually(lambda: not alive(pid), timeout=60.0, what="the worker to exit")
    assert not os.path.exists(f"/dev/shm/{shm_name}")
    with pytest.raises(E.RuntimeClosed):
        rt.infer(np.zeros((256, 3), np.float32))


def test_worker_started_from_a_thread_outlives_that_thread(settings, vibration):
    # Hot swaps run in background threads; the worker must not die when the thread that started it ends.
    rt = Runtime(settings(isolation="process"), manifest=vibration)
    t = threading.Thread(target=rt.start)
    t.start()
    t.join()
    try:
        pid = rt.worker_pid
        t = threading.Thread(target=rt.set_variant, args=("lite",))
        t.start()
        t.join()
        # A parent-death signal tied to that thread is sent as the kernel ends the thread. Once its task is gone,
        # a SIGKILL would be pending in the worker before the request below, so the worker could not answer it:
        # the answer is the positive event that comes after the moment a wrong signal would have landed.
        eventually(lambda: not os.path.exists(f"/proc/self/task/{t.native_id}"), what="the thread's task to end")
        assert rt.predict(np.zeros((256, 3), np.float32)).variant == "lite"
        assert rt.worker_pid != pid and alive(rt.worker_pid)
        assert rt.status()["crashes"] == 0
    finally:
        rt.close()


def test_worker_dies_with_a_killed_agent(backend, tmp_path):
    # An agent SIGKILLed by the OOM killer or a watchdog must not leave an orphan worker holding the model.
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from device.runtime.runtime import Runtime, RuntimeSettings
        rt = Runtime(RuntimeSettings(backend={backend.name!r}, delegate="cpu"))
        rt.start()
        print(rt.worker_pid, flush=True)
        time.sleep(600)
    """)
    agent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(agent.stdout.readline())
        assert alive(worker)
        agent.kill()
        agent.wait(10)
        eventually(lambda: not alive(worker), timeout=20, what="the orphaned worker to exit")
    finally:
        agent.kill()
