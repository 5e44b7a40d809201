"""The in-process Model: file checks, tensor specs, quantization, and bit-exactness against the bare interpreter."""

import numpy as np
import pytest

from tests.conftest import TEST_MODELS
from device.runtime.errors import InputInvalid, ModelInvalid
from device.runtime.model import Model, check_model_file
from device.runtime.tensors import dequantize


def shipped_model_files(vibration):
    return [v.path for v in vibration.variants.values()] + [
        str(TEST_MODELS / "mobilenet_v2_0.35_96_int8.tflite"),
        str(TEST_MODELS / "mobilenet_v2_1.0_224_int8.tflite"),
    ]


def random_input(spec, seed=0):
    rng = np.random.default_rng(seed)
    info = np.iinfo(spec.np_dtype)
    return rng.integers(info.min, info.max, size=spec.shape, endpoint=True).astype(spec.np_dtype)


@pytest.mark.parametrize("content,problem", [
    (b"", "too small"),
    (b"\x00" * 64, "not a TFLite model"),
    (b"\x1c\x00\x00\x00XXXX" + b"\x00" * 64, "file identifier b'XXXX'"),
])
def test_check_model_file_refuses_malformed_files(tmp_path, content, problem):
    p = tmp_path / "bad.tflite"
    p.write_bytes(content)
    with pytest.raises(ModelInvalid, match=problem) as err:
        check_model_file(str(p))
    assert str(p) in str(err.value)


def test_check_model_file_names_a_missing_file(tmp_path):
    with pytest.raises(ModelInvalid, match="cannot read"):
        check_model_file(str(tmp_path / "nope.tflite"))


def test_truncated_model_is_refused_cleanly(tmp_path, backend, vibration):
    data = open(vibration.variant("full").path, "rb").read()
    p = tmp_path / "trunc.tflite"
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelInvalid, match="trunc.tflite"):
        Model(str(p), backend, threads=1)


def test_vibration_specs_are_int8_with_quantization(backend, vibration):
    m = Model(vibration.variant("full").path, backend, threads=1)
    (i,), (o,) = m.inputs, m.outputs
    assert i.dtype == "int8" and i.shape == (1, 256, 3) and i.scale > 0
    assert o.dtype == "int8" and o.shape == (1, 4) and o.scale > 0
    assert m.init_ns > 0 and m.first_ns > 0  # warm-up ran
    assert m.histogram.count == 0  # warm-up runs are not counted as requests


def test_float_input_is_quantized_with_scale_and_zero_point(backend, vibration):
    m = Model(vibration.variant("full").path, backend, threads=1, warmup_runs=0)
    spec = m.inputs[0]
    x = np.linspace(-3.0, 3.0, 256 * 3, dtype=np.float32).reshape(256, 3)  # batch dim omitted on purpose
    m.set_inputs([x])
    want = np.clip(np.rint(x / spec.scale) + spec.zero_point, -128, 127).astype(np.int8)
    assert np.array_equal(m.input_view(0)[0], want)


def test_input_shape_and_count_errors_name_the_problem(backend, vibration):
    m = Model(vibration.variant("lite").path, backend, threads=1, warmup_runs=0)
    with pytest.raises(InputInvalid, match=r"must have shape \[1, 256, 3\], got \[128, 3\]"):
        m.set_inputs([np.zeros((128, 3), np.float32)])
    with pytest.raises(InputInvalid, match="takes 1 input"):
        m.set_inputs([])
    with pytest.raises(InputInvalid, match="cannot take"):
        m.set_inputs([np.zeros((1, 256, 3), np.uint8)])


def test_histogram_counts_requests(backend, vibration):
    m = Model(vibration.variant("lite").path, backend, threads=1)
    for _ in range(5):
        m.run(np.zeros((1, 256, 3), np.float32))
    s = m.histogram.summary()
    assert s["count"] == 5 and 0 < s["p50_ms"] <= s["p99_ms"] <= s["max_ms"] * 1.02


def test_outputs_bit_identical_to_bare_interpreter_for_all_shipped_models(backend, vibration):
    for path in shipped_model_files(vibration):
        m = Model(path, backend, threads=2)
        bare = backend.Interpreter(model_path=path, num_threads=2)
        bare.allocate_tensors()
        for seed in range(2):
            x = random_input(m.inputs[0], seed)
            ours = m.run(x)[0]
            bare.set_tensor(m.inputs[0].index, x)
            bare.invoke()
            assert np.array_equal(ours, bare.get_tensor(m.outputs[0].index)), path


def test_dequantize_uses_scale_and_zero_point(backend, vibration):
    m = Model(vibration.variant("full").path, backend, threads=1)
    o = m.outputs[0]
    raw = np.array([[o.zero_point, o.zero_point + 10, -128, 127]], np.int8)
    got = dequantize(o, raw)
    assert got.dtype == np.float32
    assert np.allclose(got, (raw.astype(np.float32) - o.zero_point) * o.scale)
