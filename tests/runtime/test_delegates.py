"""Delegate planning and fallback. No accelerator exists on a build machine, so the real fallback path runs."""

import shutil
import warnings

import numpy as np
import pytest

from device.runtime.delegates import DelegateFallback, open_model, plan, resolve_variant
from device.runtime.manifest import load_manifest
from device.runtime.runtime import Runtime


@pytest.fixture
def tpu_model(tmp_path, vibration):
    """The vibration model plus an 'edgetpu' variant whose file is garbage: it must never be opened."""
    for v in ("full", "lite"):
        shutil.copyfile(vibration.variant(v).path, tmp_path / f"vib_{v}.tflite")
    (tmp_path / "vib_full_edgetpu.tflite").write_bytes(b"not a model at all")
    (tmp_path / "model.json").write_text("""{"name": "vib", "version": "1", "labels": ["a", "b", "c", "d"],
      "default_variant": "full",
      "variants": {"full": {"file": "vib_full.tflite"}, "lite": {"file": "vib_lite.tflite", "cost": 0.3},
                   "edgetpu": {"file": "vib_full_edgetpu.tflite", "cost": 0.1, "cpu_variant": "full"}}}""")
    return load_manifest(str(tmp_path))


def kinds(cands):
    return [(c.delegate, c.variant) for c in cands]


def test_plan_orders_edgetpu_gpu_cpu_and_never_pairs_cpu_with_the_edgetpu_file(tpu_model):
    assert resolve_variant(tpu_model, "auto", "auto") == "edgetpu"
    assert resolve_variant(tpu_model, "auto", "cpu") == "full"
    cands, notes = plan(tpu_model, "edgetpu", "auto")
    assert kinds(cands) == [("edgetpu", "edgetpu"), ("gpu", "full"), ("cpu", "full")]
    assert cands[0].path.endswith("_edgetpu.tflite")
    assert all(not c.path.endswith("_edgetpu.tflite") for c in cands[1:])
    cands, notes = plan(tpu_model, "edgetpu", "cpu")
    assert kinds(cands) == [("cpu", "full")] and "compiled for the Edge TPU" in notes[0]
    cands, notes = plan(tpu_model, "lite", "edgetpu")
    assert kinds(cands) == [("cpu", "lite")] and "not compiled for the Edge TPU" in notes[0]
    assert kinds(plan(tpu_model, "lite", "gpu")[0]) == [("gpu", "lite"), ("cpu", "lite")]


def test_missing_edgetpu_falls_back_to_cpu_variant_with_reason(backend, tpu_model):
    cands, _ = plan(tpu_model, "edgetpu", "auto")
    tried = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opened = open_model(backend, cands, threads=1, warmup_runs=1, on_try=tried.append)
    assert opened.candidate.variant == "full"
    assert opened.delegate_name in ("xnnpack", "cpu")
    assert "libedgetpu.so.1" in opened.fallbacks[0] and opened.fallbacks[0].startswith("edgetpu delegate unavailable")
    assert opened.fallbacks[1].startswith("gpu delegate unavailable")
    assert [c.delegate for c in tried] == ["cpu"]  # the edgetpu file was never handed to an interpreter
    assert [w.category for w in caught if issubclass(w.category, DelegateFallback)] == [DelegateFallback] * 2


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_runtime_reports_fallback_reasons_in_status(settings, tpu_model, isolation):
    events = []
    with Runtime(settings(delegate="auto", isolation=isolation), manifest=tpu_model,
                 on_event=lambda k, d: events.append((k, d))) as rt:
        st = rt.status()
        assert st["variant"] == "full"
        assert any("libedgetpu.so.1" in r for r in st["delegate_fallbacks"])
        assert [k for k, _ in events].count("delegate_fallback") == len(st["delegate_fallbacks"])
        assert rt.infer(np.zeros((1, 256, 3), np.float32)).outputs[0].shape == (1, 4)


def test_explicit_gpu_library_missing_is_a_warning_not_a_failure(settings, vibration):
    s = settings(delegate="gpu", gpu_delegate="libno_such_gpu_delegate.so", isolation="inline")
    with Runtime(s, manifest=vibration) as rt:
        st = rt.status()
        assert st["delegate"] in ("xnnpack", "cpu")
        assert "libno_such_gpu_delegate.so" in st["delegate_fallbacks"][0]
