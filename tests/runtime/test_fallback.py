"""A variant that cannot serve never takes the board down: the runtime falls back to another variant, or says
it is not serving and why, and serves again after a release, a replaced file or a new request. Real worker
processes and a model built to segfault the interpreter (tests/runtime/crashmodel.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from device.runtime import errors as E
from device.runtime.manifest import load_manifest
from device.runtime.runtime import Runtime
from tests.conftest import TEST_MODELS
from tests.runtime.crashmodel import make_crashing_model

X = np.zeros((256, 3), np.float32)


def model_dir(root, vibration, full="good", lite="good", extra=None):
    """The vibration model in ``root`` with each variant's file ``good``, ``crash`` (segfaults the
    interpreter on load), ``garbage`` (refused cleanly) or ``slow`` (a model that takes ~0.7 s an inference)."""
    root.mkdir(exist_ok=True)
    for name, kind in (("full", full), ("lite", lite)):
        src = vibration.variant(name).path
        data = {"good": lambda: open(src, "rb").read(),
                "crash": lambda: make_crashing_model(open(src, "rb").read()),
                "garbage": lambda: b"\x18\x00\x00\x00TFL3" + bytes(range(256)) * 4,
                "slow": lambda: (TEST_MODELS / "slow_conv_int8.tflite").read_bytes()}[kind]()
        (root / f"vib_{name}.tflite").write_bytes(data)
    doc = {"name": "vib", "version": "1", "labels": ["a", "b", "c", "d"], "output": "logits",
           "default_variant": "full",
           "variants": {"full": {"file": "vib_full.tflite"}, "lite": {"file": "vib_lite.tflite", "cost": 0.3}}}
    (root / "model.json").write_text(json.dumps(doc))
    return load_manifest(str(root))


class Clock:
    """A hand-wound clock for the retry interval (only the runtime's pacing reads it)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def kinds(events):
    return [k for k, _ in events]


def test_a_full_variant_that_segfaults_on_load_falls_back_to_lite(settings, vibration, tmp_path):
    manifest = model_dir(tmp_path / "m", vibration, full="crash")
    events = []
    with Runtime(settings(isolation="process", quarantine_after=3, warmup_runs=0), manifest=manifest,
                 on_event=lambda k, d: events.append((k, d))) as rt:
        assert rt.serving and rt.variant == "lite"
        assert kinds(events) == ["worker_crashed", "worker_crashed", "model_quarantined", "variant_fallback"]
        fb = events[-1][1]
        assert (fb["from"], fb["to"]) == ("full", "lite")
        assert "SIGSEGV" in fb["reason"] and "vib_full.tflite is now quarantined" in fb["reason"]
        p = rt.predict(X)
        assert p.variant == "lite" and abs(float(p.scores.sum()) - 1.0) < 1e-4
        st = rt.status()
        assert st["serving"] is True and st["not_serving_reason"] is None and st["requested_variant"] == "auto"
        assert st["variant_fallback"] == fb
        assert [q["path"] for q in st["quarantined"]] == [manifest.variant("full").path]
        # asking again for what failed changes nothing: no new worker crashes, no new event
        assert rt.reconfigure(variant="auto") is False and len(events) == 4


def test_with_every_variant_crashing_it_is_not_serving_and_a_release_brings_it_back(settings, vibration,
                                                                                    tmp_path):
    manifest = model_dir(tmp_path / "m", vibration, full="crash", lite="crash")
    events = []
    rt = Runtime(settings(isolation="process", quarantine_after=2, warmup_runs=0), manifest=manifest,
                 on_event=lambda k, d: events.append((k, d)))
    try:
        rt.start()  # returns: the runtime is reachable and says why it does not serve
        assert not rt.serving and rt.variant is None
        assert kinds(events) == ["worker_crashed", "model_quarantined", "worker_crashed", "model_quarantined",
                                 "not_serving"]
        reason = rt.status()["not_serving_reason"]
        assert reason == events[-1][1]["reason"]
        assert reason.startswith("no variant can serve: full: ") and "; lite: " in reason and "SIGSEGV" in reason
        with pytest.raises(E.NotServing) as err:
            rt.predict(X)
        assert err.value.code == "not_serving" and "model vib is not serving: no variant can serve" in str(err.value)
        # The technician replaces the full model's file and releases its quarantine: it serves at once.
        full = manifest.variant("full")
        (digest,) = [q.sha256 for q in rt.quarantine.entries() if q.path == full.path]
        shutil.copyfile(vibration.variant("full").path, full.path)
        assert rt.release_quarantine(digest, by="ops") is True
        assert kinds(events)[-2:] == ["quarantine_released", "serving"]
        assert events[-1][1] == {"variant": "full", "threads": 2}
        assert rt.serving and rt.predict(X).variant == "full"
        assert rt.status()["not_serving_reason"] is None
    finally:
        rt.close()
    with pytest.raises(E.RuntimeClosed):  # closed is not "not serving"
        rt.predict(X)


def test_a_runtime_that_cannot_serve_retries_by_itself_at_most_every_interval(settings, vibration, tmp_path):
    manifest = model_dir(tmp_path / "m", vibration, full="garbage", lite="garbage")
    clock = Clock()
    events = []
    rt = Runtime(settings(isolation="process", warmup_runs=0, not_serving_retry_s=60.0), manifest=manifest,
                 on_event=lambda k, d: events.append((k, d)), clock=clock)
    try:
        rt.start()
        assert not rt.serving and "vib_full.tflite" in rt.status()["not_serving_reason"]
        assert kinds(events) == ["not_serving"]  # refused cleanly: no crash, no quarantine
        shutil.copyfile(vibration.variant("lite").path, manifest.variant("lite").path)  # an update lands
        clock.now += 59.0
        with pytest.raises(E.NotServing):
            rt.predict(X)  # too early to retry: refused without loading anything
        assert not rt.serving
        assert rt.retry_if_due() is False  # nor by the loop's own call
        clock.now += 1.0
        p = rt.predict(X)  # due: the request retries, and lite serves
        assert p.variant == "lite" and rt.serving
        assert kinds(events) == ["not_serving", "variant_fallback", "serving"]
        assert events[1][1]["from"] == "full" and "vib_full.tflite" in events[1][1]["reason"]
        assert rt.quarantine.entries() == []
    finally:
        rt.close()


def test_a_reconfigure_brings_a_runtime_that_cannot_serve_back(settings, vibration, tmp_path):
    manifest = model_dir(tmp_path / "m", vibration, full="garbage", lite="garbage")
    rt = Runtime(settings(isolation="inline", warmup_runs=0, variant="full"), manifest=manifest)
    rt.start()
    try:
        assert not rt.serving
        shutil.copyfile(vibration.variant("lite").path, manifest.variant("lite").path)
        assert rt.reconfigure(variant="lite") is True  # a new request is tried at once, not at the next retry
        assert rt.serving and rt.predict(X).variant == "lite"
        assert rt.status()["variant_fallback"] is None and rt.status()["requested_variant"] == "lite"
    finally:
        rt.close()


def test_a_file_quarantined_by_crashes_during_requests_hands_over_to_another_variant(settings, vibration,
                                                                                     tmp_path):
    # full's worker hangs past its deadline on every request and is killed each time: the third kill
    # quarantines the file, and the runtime falls back to lite right after that request.
    manifest = model_dir(tmp_path / "m", vibration, full="slow")
    events = []
    s = settings(isolation="process", quarantine_after=3, warmup_runs=0, threads=1, deadline_ms=200)
    with Runtime(s, manifest=manifest, on_event=lambda k, d: events.append((k, d))) as rt:
        assert rt.variant == "full"
        x = np.zeros(rt._engine.inputs[0].shape, np.int8)
        for expected in (E.WorkerTimeout, E.WorkerTimeout, E.ModelQuarantined):
            with pytest.raises(expected):
                rt.infer(x)
        assert rt.variant == "lite" and rt.serving
        assert kinds(events) == ["worker_timeout", "worker_timeout", "model_quarantined", "variant_changed",
                                 "variant_fallback"]
        assert events[3][1]["from"] == "full" and events[3][1]["to"] == "lite"
        assert rt.status()["failures"] == 3 and rt.swaps == 1


def test_retry_if_due_lets_a_loop_bring_the_runtime_back_without_requests(settings, vibration, tmp_path):
    manifest = model_dir(tmp_path / "m", vibration, full="garbage", lite="garbage")
    clock = Clock()
    rt = Runtime(settings(isolation="inline", warmup_runs=0), manifest=manifest, clock=clock)
    assert rt.retry_if_due() is False  # not started: nothing to retry
    rt.start()
    try:
        shutil.copyfile(vibration.variant("full").path, manifest.variant("full").path)
        assert rt.retry_if_due() is False and not rt.serving
        clock.now += 60.0
        assert rt.retry_if_due() is True and rt.variant == "full"
        assert rt.retry_if_due() is True  # serving: nothing to do
    finally:
        rt.close()
