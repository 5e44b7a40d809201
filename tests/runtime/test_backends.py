import importlib.util

import numpy as np
import pytest

from device.runtime.backends import load_backend
from device.runtime.errors import BackendUnavailable


def test_backend_under_test_loads_with_version(backend):
    assert backend.name in ("litert", "tflite")
    assert backend.version and backend.version != "unknown"
    assert backend.label == f"{backend.name} {backend.version}"


def test_unknown_backend_choice_is_refused():
    with pytest.raises(ValueError, match="backend must be one of auto, litert, tflite, got 'tf'"):
        load_backend("tf")


@pytest.mark.skipif(int(np.__version__.split(".")[0]) < 2, reason="the numpy-2 refusal only exists under numpy 2")
def test_tflite_runtime_is_refused_under_numpy_2_with_the_reason():
    # Under numpy 2 tflite-runtime imports but then crashes; we must refuse it with the fix in the message.
    with pytest.raises(BackendUnavailable) as err:
        load_backend("tflite")
    msg = str(err.value)
    if importlib.util.find_spec("tflite_runtime") is not None:
        assert f"cannot run under numpy {np.__version__}" in msg and "numpy<2" in msg
    else:
        assert "tflite-runtime is not installed" in msg and "numpy<2" in msg


@pytest.mark.skipif(importlib.util.find_spec("ai_edge_litert") is not None, reason="needs a venv without LiteRT")
def test_litert_missing_is_named():
    with pytest.raises(BackendUnavailable, match="ai-edge-litert is not installed"):
        load_backend("litert")
