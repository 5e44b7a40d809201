"""Delegate planning and fallback. No accelerator exists on a build machine, so the real fallback path runs."""

import logging
import warnings
from dataclasses import replace

import numpy as np
import pytest

from device.runtime import errors as E
from device.runtime.delegates import DelegateFallback, open_model, plan, resolve_variant
from device.runtime.runtime import Runtime


def kinds(cands):
    return [(c.delegate, c.variant) for c in cands]


def test_plan_orders_edgetpu_gpu_cpu_and_never_pairs_cpu_with_the_edgetpu_file(tpu_model):
    assert resolve_variant(tpu_model, "auto", "auto") == "edgetpu"
    assert resolve_variant(tpu_model, "auto", "cpu") == "full"
    cands, notes = plan(tpu_model, "edgetpu", "auto", gpu=True)
    assert kinds(cands) == [("edgetpu", "edgetpu"), ("gpu", "full"), ("cpu", "full")]
    assert cands[0].path.endswith("_edgetpu.tflite")
    assert all(not c.path.endswith("_edgetpu.tflite") for c in cands[1:])
    cands, notes = plan(tpu_model, "edgetpu", "cpu")
    assert kinds(cands) == [("cpu", "full")] and "compiled for the Edge TPU" in notes[0]
    cands, notes = plan(tpu_model, "lite", "edgetpu")
    assert kinds(cands) == [("cpu", "lite")] and "not compiled for the Edge TPU" in notes[0]
    assert kinds(plan(tpu_model, "lite", "gpu")[0]) == [("gpu", "lite"), ("cpu", "lite")]
    # Under auto, a board without a GPU does not try the GPU delegate; an explicit gpu always does.
    cands, notes = plan(tpu_model, "lite", "auto", gpu=False)
    assert kinds(cands) == [("cpu", "lite")] and notes == ["no GPU on this board: the GPU delegate is not tried"]
    assert kinds(plan(tpu_model, "lite", "gpu", gpu=False)[0]) == [("gpu", "lite"), ("cpu", "lite")]


def test_missing_edgetpu_falls_back_to_cpu_variant_with_reason(backend, tpu_model):
    cands, _ = plan(tpu_model, "edgetpu", "auto", gpu=True)
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


def test_an_explicit_gpu_that_cannot_load_is_an_error_unless_fallback_is_allowed(settings, vibration):
    s = settings(delegate="gpu", gpu_delegate="libno_such_gpu_delegate.so", isolation="inline")
    rt = Runtime(s, manifest=vibration)
    with pytest.raises(E.DelegateUnavailable) as err:
        rt.start()
    assert err.value.code == "delegate_unavailable"
    assert "libno_such_gpu_delegate.so: cannot open shared object file" in str(err.value)
    assert "runtime.delegate_fallback" in str(err.value)
    st = rt.status()
    assert not st["serving"] and st["not_serving_reason"] == str(err.value)
    with pytest.raises(E.NotServing, match="libno_such_gpu_delegate.so"):
        rt.predict(np.zeros((256, 3), np.float32))
    rt.close()
    with Runtime(replace(s, delegate_fallback=True), manifest=vibration) as rt:
        st = rt.status()
        assert st["serving"] and st["delegate"] in ("xnnpack", "cpu")
        assert "libno_such_gpu_delegate.so" in st["delegate_fallbacks"][0]


@pytest.mark.parametrize("isolation", ["process", "inline"])
def test_an_explicit_edgetpu_without_its_library_names_libedgetpu(settings, tpu_model, isolation):
    events = []
    rt = Runtime(settings(delegate="edgetpu", isolation=isolation), manifest=tpu_model,
                 on_event=lambda k, d: events.append((k, d)))
    with pytest.raises(E.DelegateUnavailable, match=r"delegate 'edgetpu' was requested and cannot be used: "
                                                    r"edgetpu delegate unavailable: libedgetpu\.so\.1"):
        rt.start()
    assert not rt.serving and "libedgetpu.so.1" in rt.status()["not_serving_reason"]
    assert [k for k, _ in events] == ["not_serving"]  # no delegate_fallback: it did not fall back
    assert rt.quarantine.entries() == []  # the delegate's absence is not the model's fault
    rt.close()


def test_an_explicit_edgetpu_for_a_variant_not_compiled_for_it_is_an_error(settings, tpu_model, vibration):
    with pytest.raises(E.DelegateUnavailable, match="variant 'lite' of model 'vib' is not compiled for the Edge TPU"):
        Runtime(settings(delegate="edgetpu", variant="lite"), manifest=tpu_model).start()
    with pytest.raises(E.DelegateUnavailable, match="'full' of model 'vibration' is not compiled for the Edge TPU"):
        Runtime(settings(delegate="edgetpu"), manifest=vibration).start()


def test_an_explicit_edgetpu_may_fall_back_when_the_settings_allow_it(settings, tpu_model):
    events = []
    s = settings(delegate="edgetpu", delegate_fallback=True, isolation="process")
    with Runtime(s, manifest=tpu_model, on_event=lambda k, d: events.append((k, d))) as rt:
        st = rt.status()
        assert st["serving"] and st["variant"] == "full" and st["delegate"] in ("xnnpack", "cpu")
        assert st["delegate_fallbacks"] == [d["reason"] for k, d in events if k == "delegate_fallback"]
        assert "libedgetpu.so.1" in st["delegate_fallbacks"][0]
        assert rt.infer(np.zeros((1, 256, 3), np.float32)).outputs[0].shape == (1, 4)


@pytest.fixture
def board_root(tmp_path, monkeypatch):
    """A board's tree (``FIELDNODE_SYSFS_ROOT``), without a GPU unless the test adds its device node."""
    root = tmp_path / "board"
    (root / "dev").mkdir(parents=True)
    monkeypatch.setenv("FIELDNODE_SYSFS_ROOT", str(root))
    return root


def delegate_logs(caplog) -> list:
    return [(r.levelno, r.getMessage()) for r in caplog.records
            if r.name.startswith("device.runtime") and "GPU" in r.getMessage().replace("gpu", "GPU")]


def test_under_auto_a_board_without_a_gpu_says_so_at_info_with_no_event(settings, vibration, board_root, caplog):
    events = []
    with caplog.at_level(logging.DEBUG, logger="device.runtime"):
        with Runtime(settings(delegate="auto"), manifest=vibration, on_event=lambda k, d: events.append(k)) as rt:
            rt.set_variant("lite")  # a swap plans again: still no warning
            st = rt.status()
    assert st["delegate_fallbacks"] == [] and "delegate_fallback" not in events, (st, events)
    said = delegate_logs(caplog)
    assert said and all(level < logging.WARNING for level, _ in said), said
    assert said[0] == (logging.INFO, "no GPU on this board: the GPU delegate is not tried"), said


def test_under_auto_a_board_with_a_gpu_whose_delegate_fails_still_warns(settings, vibration, board_root, caplog):
    (board_root / "dev" / "nvgpu").write_text("")  # a Jetson's GPU node
    events = []
    with caplog.at_level(logging.INFO, logger="device.runtime"):
        with Runtime(settings(delegate="auto"), manifest=vibration, on_event=lambda k, d: events.append(k)) as rt:
            st = rt.status()
    assert any(r.startswith("gpu delegate unavailable") for r in st["delegate_fallbacks"]), st
    assert events.count("delegate_fallback") == 1, events
    assert any(level == logging.WARNING and "gpu delegate unavailable" in m for level, m in delegate_logs(caplog))
