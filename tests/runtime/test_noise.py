"""What a technician reads: each fallback said once, the interpreter's chatter kept off the console (but in the
debug log), no change reported when nothing changed, and native messages that read as separate messages."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from device.runtime import errors as E
from device.runtime.runtime import Runtime
from tests.conftest import EXPECTED_BACKEND
from tests.runtime.test_cli import fieldnode

X = np.zeros((256, 3), np.float32)


def test_a_delegate_fallback_is_said_once_per_reason_however_many_swaps(settings, vibration, caplog, tmp_path,
                                                                       monkeypatch):
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvgpu").write_text("")  # a board with a GPU (a Jetson's node), whose delegate is missing
    monkeypatch.setenv("FIELDNODE_SYSFS_ROOT", str(tmp_path))
    events = []
    with caplog.at_level(logging.INFO, logger="device.runtime"):
        with Runtime(settings(delegate="auto", isolation="process"), manifest=vibration,
                     on_event=lambda k, d: events.append((k, d))) as rt:
            for variant in ("lite", "full", "lite"):
                rt.set_variant(variant)
            st = rt.status()
    said = [r for r in caplog.records if "gpu delegate unavailable" in r.getMessage() and r.levelno >= logging.INFO]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert [k for k, _ in events].count("delegate_fallback") == 1
    assert rt.swaps == 3 and any("gpu delegate unavailable" in r for r in st["delegate_fallbacks"])  # kept


def test_asking_for_what_already_runs_swaps_nothing_and_says_nothing(settings, vibration, tpu_model):
    events = []
    with Runtime(settings(isolation="inline", variant="lite"), manifest=vibration,
                 on_event=lambda k, d: events.append((k, d))) as rt:
        assert rt.set_variant("lite") == "lite"  # lite -> lite
        assert rt.reconfigure(variant="lite", threads=2) is False
        assert rt.swaps == 0 and events == []
        rt.set_threads(1)  # a real swap (threads are fixed per interpreter), but not a variant change
        assert rt.swaps == 1 and [k for k, _ in events if k == "variant_changed"] == []
    events.clear()
    # auto on a board without an Edge TPU runs the TPU variant's CPU variant: asking for that is no change
    with Runtime(settings(delegate="auto", isolation="inline"), manifest=tpu_model,
                 on_event=lambda k, d: events.append((k, d))) as rt:
        assert rt.variant == "full"
        events.clear()
        assert rt.reconfigure(variant="full") is False
        assert rt.swaps == 0 and events == []


def test_the_interpreters_xnnpack_line_goes_to_the_debug_log_not_the_console():
    r = fieldnode("selftest")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "XNNPACK" not in r.stderr and "INFO" not in r.stderr, r.stderr
    assert "delegate unavailable" in r.stderr or r.stderr == ""  # at most the (single) fallback warnings
    said = [ln.partition(" WARNING ")[2] or ln for ln in r.stderr.splitlines()]  # without the timestamps
    assert len(said) == len(set(said)), r.stderr  # each said once, not once per variant checked
    r = fieldnode("selftest", "-v")
    assert r.returncode == 0
    routed = [ln for ln in r.stderr.splitlines() if "DEBUG device.runtime.worker: worker " in ln]
    if EXPECTED_BACKEND != "tflite":  # tflite-runtime 2.14 runs int8 on its own kernels and says nothing
        assert any(ln.endswith("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.") for ln in routed), r.stderr


def test_native_interpreter_messages_are_separated(settings, vibration, tmp_path, single_model):
    data = bytearray(open(vibration.variant("lite").path, "rb").read())
    assert data[10883] == 0, "the shipped lite model changed: find another zero point to corrupt"
    data[10883] = 55  # a quantization zero point the kernels refuse, and report in several messages
    manifest = single_model(bytes(data), "zp.tflite")
    with pytest.raises(E.ModelInvalid) as err:
        Runtime(settings(isolation="inline"), manifest=manifest).start(strict=True)
    text = str(err.value)
    assert "; Node number " in text and text.endswith("failed to prepare.")
    assert ")Node" not in text and "delegateunsupported" not in text and "delegatefailed" not in text
    if "XNNPACK" in text:
        assert "in XNNPACK delegate; unsupported datatype (INT8) of tensor 7 in XNNPACK delegate; failed to create" \
            in text
