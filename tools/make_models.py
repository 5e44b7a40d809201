#!/usr/bin/env python3
"""Builds the TFLite models fieldnode ships and tests with. Development only: needs TensorFlow.

Usage, from the repository root::

    python tools/make_models.py [--out-dir DIR] [--only vibration|mobilenet|slow] [--litert-python PY]

It writes, under ``--out-dir`` (default: the repository root):

* ``device/models/vibration/``: ``vibration_full.tflite`` and ``vibration_lite.tflite`` (the shipped
  vibration classifier, trained on :func:`drivers.sim.signal.make_dataset`), ``model.json`` (the
  manifest) and ``vibration_testvectors.npz``.
* ``tests/models/``: ``mobilenet_v2_1.0_224_int8.tflite`` and ``mobilenet_v2_0.35_96_int8.tflite``
  (random weights, for benchmarks only) and ``slow_conv_int8.tflite`` (for hang/timeout tests).

Every model is fully int8-quantized (``TFLITE_BUILTINS_INT8``, int8 input and output). Run it with
a Python that has TensorFlow 2.x (Keras 3 is fine: models go through ``model.export`` and
``TFLiteConverter.from_saved_model``); ``--litert-python`` names a second Python that has
ai-edge-litert, used to measure latencies and to cross-check the test vectors.

Vibration classifier (two variants, same input and output):

* Input ``[1, 256, 3]`` int8, raw acceleration with scale 1/16 g and zero point 0, so readings from
  -8 g to +7.9375 g are representable (beyond saturates). Calibration alone would fit the input's
  range to the training data, so the converted model's input tensor is then set to this scale (see
  :func:`set_input_quantization`). The model first subtracts each axis' mean over the window, so
  gravity and mounting tilt do not matter.
* Output ``[1, 4]`` int8 **logits** in the order of ``drivers.sim.signal.LABELS``; dequantize with
  the output tensor's scale/zero point and apply softmax for probabilities.
* ``full``: Conv1D stack 32-48-96-128-96 with pooling; ``lite``: two strided Conv1D layers (24, 32).
  Both end in global average pooling and a dense layer. ``count_macs`` gives their cost from the
  layer shapes; ``"cost"`` in the manifest is the lite/full ratio of the median single-thread invoke
  latency measured here; ``"accuracy"`` is the int8 model's accuracy on a held-out set made with a
  different seed than the training set.
* Test vectors: two windows per class; ``expected_<variant>`` holds the raw int8 outputs of
  ``tf.lite.Interpreter`` (1 thread, default delegates) for inputs quantized as
  ``q = clip(np.round(x / scale) + zero_point, -128, 127)``, where ``np.round`` rounds half to even.

Test models: MobileNetV2 (Keras, ``weights=None``, seeded) calibrated on random images, and a
"slow" model: one 3x3 Conv2D (16 -> 16 channels, weights stored once) applied ``SLOW_DEPTH`` times
to a ``[1, 512, 512, 16]`` int8 input, mean-pooled to a ``[1, 16]`` int8 output. It is about 60 KB
and was tuned to about 1.5 s per invoke with ai-edge-litert (XNNPack) at 2 threads on a 2-core x86
development VM; slower CPUs (a Raspberry Pi) take several times longer.

Everything is seeded; the data are identical on every run, the trained weights nearly so
(TensorFlow's floating point differs slightly between machines).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from drivers.sim import signal as sim  # noqa: E402

VIB_DIR = Path("device/models/vibration")
TEST_MODELS_DIR = Path("tests/models")
INPUT_SCALE = 1.0 / 16.0  # g per input LSB, zero point 0: -8 g .. +7.9375 g
TRAIN_SEED, TEST_SEED, VECTOR_SEED, KERAS_SEED = 1001, 2002, 3003, 7
N_TRAIN_PER_CLASS, N_TEST_PER_CLASS, N_CALIBRATION = 3000, 1000, 1000
EPOCHS, BATCH = 20, 64
LATENCY_RUNS = {"vibration": 2000, "mobilenet": 20, "slow": 3}
SLOW_SIZE, SLOW_CHANNELS, SLOW_DEPTH = 512, 16, 170


# ----------------------------------------------------------------------------- interpreter side
# These functions need only numpy and an interpreter (ai-edge-litert, else tf.lite); they also run
# in a separate Python via --litert-worker so the script can measure with ai-edge-litert.


def _interpreter_class() -> tuple[type, str]:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai-edge-litert"
    except ImportError:
        import tensorflow as tf

        return tf.lite.Interpreter, "tf.lite.Interpreter"


def quantize_input(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Quantizes float input as the runtime does: round half to even (np.round), then saturate."""
    return np.clip(np.round(x / scale) + zero_point, -128, 127).astype(np.int8)


def run_vectors(interpreter_cls: type, model_path: str, inputs: np.ndarray) -> np.ndarray:
    """Raw int8 outputs of a model for each float input window, quantized with the input's params."""
    it = interpreter_cls(model_path=model_path, num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    scale, zero_point = inp["quantization"]
    results = []
    for x in inputs:
        it.set_tensor(inp["index"], quantize_input(x[None], scale, zero_point))
        it.invoke()
        results.append(it.get_tensor(out["index"])[0].copy())
    return np.stack(results)


def time_invoke(interpreter_cls: type, model_paths: list, threads: int, runs: int, rounds: int = 5) -> list:
    """Median (p50) and p90 invoke latency in ms of each model, for a zero input, after warm-up.

    The models take turns, ``rounds`` times ``runs // rounds`` invokes each, so that drifts in machine
    load affect them alike.
    """
    interpreters = []
    for path in model_paths:
        it = interpreter_cls(model_path=path, num_threads=threads)
        it.allocate_tensors()
        inp = it.get_input_details()[0]
        it.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
        it.invoke()
        interpreters.append(it)
    rounds = max(1, min(rounds, runs))
    times = [[] for _ in model_paths]
    for _ in range(rounds):
        for it, samples in zip(interpreters, times):
            for _ in range(max(1, runs // rounds // 10)):
                it.invoke()
            for _ in range(max(1, runs // rounds)):
                start = time.perf_counter()
                it.invoke()
                samples.append((time.perf_counter() - start) * 1e3)
    return [{"p50_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)), "runs": len(t)}
            for t in times]


def measure(request: dict) -> dict:
    """Runs timing and test-vector requests with the best interpreter this Python has.

    ``request["timings"]`` is a list of ``[model_paths, threads, runs]`` (see :func:`time_invoke`);
    ``request["vectors"]`` names a test-vector file whose inputs are run through each model of
    ``request["vector_models"]`` (name -> path).
    """
    cls, backend = _interpreter_class()
    reply = {"backend": backend, "timings": [], "vectors": {}}
    for paths, threads, runs in request.get("timings", []):
        reply["timings"].append(time_invoke(cls, paths, threads, runs))
    if request.get("vectors"):
        with np.load(request["vectors"], allow_pickle=False) as data:
            inputs = data["inputs"]
        for name, path in request.get("vector_models", {}).items():
            reply["vectors"][name] = run_vectors(cls, path, inputs).tolist()
    return reply


class Measurer:
    """Runs :func:`measure` in this process, or in another Python (one that has ai-edge-litert)."""

    def __init__(self, python: str | None):
        self.python = python

    def run(self, timings=(), vectors: str | None = None, vector_models: dict | None = None) -> dict:
        request = {"timings": [list(t) for t in timings], "vectors": vectors,
                   "vector_models": vector_models or {}}
        if self.python is None:
            return measure(request)
        proc = subprocess.run(
            [self.python, str(Path(__file__).resolve()), "--litert-worker", json.dumps(request)],
            capture_output=True, text=True, check=True,
        )
        return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- TensorFlow side


def _convert_int8(tf, saved_model_dir: str, representative, per_channel: bool = True) -> bytes:
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    if not per_channel:
        converter._experimental_disable_per_channel = True  # smaller per-layer metadata
    return converter.convert()


def _export_and_convert(tf, model, input_shape, representative, per_channel: bool = True) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False,
                     input_signature=[tf.TensorSpec(input_shape, tf.float32)])
        return _convert_int8(tf, tmp, representative, per_channel)


def set_input_quantization(tflite: bytes, scale: float, zero_point: int, allowed_consumers: set) -> bytes:
    """Sets the int8 input tensor's scale and zero point in a converted model.

    Calibration sets the input's range to what the data spans (about +/-3 g), but the input must
    accept any reading up to the sensor's full scale. The consumers of the input (here MEAN and SUB)
    derive their requantization from their tensors' parameters when the interpreter prepares them,
    so changing the input's parameters keeps the graph exact; their outputs keep the fine, calibrated
    scales. Consumers that require equal input and output scales would break, hence the check.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(tflite))
    graph = model.subgraphs[0]
    (index,) = graph.inputs
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    for op in graph.operators:
        if index in op.inputs:
            code = model.operatorCodes[op.opcodeIndex]
            name = names[max(code.builtinCode, code.deprecatedBuiltinCode)]
            if name not in allowed_consumers:
                raise SystemExit(f"input consumed by {name}; cannot safely change its quantization")
    quant = graph.tensors[index].quantization
    quant.scale, quant.zeroPoint, quant.min, quant.max = [scale], [zero_point], None, None
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def count_macs(model) -> int:
    """Multiply-accumulates of one inference, from the Conv1D/Conv2D/Dense layer shapes."""
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D)):
            out_positions = int(np.prod(layer.output.shape[1:-1]))
            in_channels = layer.input.shape[-1] // layer.groups
            total += out_positions * layer.filters * in_channels * int(np.prod(layer.kernel_size))
        elif isinstance(layer, keras.layers.Dense):
            total += layer.input.shape[-1] * layer.units
    return total


def build_vibration(keras, variant: str):
    """The classifier: centre each axis, a small Conv1D stack, global average pooling, 4 logits."""
    layers = keras.layers

    def conv(x, filters, kernel, strides=1):
        x = layers.Conv1D(filters, kernel, strides=strides, padding="same", use_bias=False)(x)
        return layers.ReLU()(layers.BatchNormalization()(x))

    inp = keras.Input((sim.WINDOW, sim.AXES), name="accel_g")
    x = layers.Lambda(lambda t: t - keras.ops.mean(t, axis=1, keepdims=True), name="center")(inp)
    if variant == "full":  # 256 -> 128 -> 64 -> 32 samples
        x = conv(x, 32, 9, strides=2)
        x = conv(x, 48, 5)
        x = layers.MaxPooling1D(2)(x)
        x = conv(x, 96, 5)
        x = layers.MaxPooling1D(2)(x)
        x = conv(x, 128, 5)
        x = conv(x, 96, 3)
    else:  # lite: a learned stride-4 front end and one more strided layer; 256 -> 64 -> 32
        x = conv(x, 24, 8, strides=4)
        x = conv(x, 32, 7, strides=2)
    x = layers.GlobalAveragePooling1D()(x)
    out = layers.Dense(len(sim.LABELS), name="logits")(x)
    return keras.Model(inp, out, name=f"vibration_{variant}")


def _as_seen(x: np.ndarray) -> np.ndarray:
    """What the int8 model sees of a float window: the input quantized to 1/16 g."""
    return np.clip(np.round(x / INPUT_SCALE), -128, 127) * INPUT_SCALE


def make_vibration(tf, keras, out_dir: Path, measurer: Measurer) -> dict:
    x_train, y_train = sim.make_dataset(N_TRAIN_PER_CLASS, TRAIN_SEED)
    x_test, y_test = sim.make_dataset(N_TEST_PER_CLASS, TEST_SEED)
    x_train = _as_seen(x_train).astype(np.float32)
    calib = [x[None] for x in x_train[:N_CALIBRATION]]
    target = out_dir / VIB_DIR
    target.mkdir(parents=True, exist_ok=True)
    results = {}
    for variant in ("full", "lite"):
        keras.utils.set_random_seed(KERAS_SEED)
        model = build_vibration(keras, variant)
        steps = EPOCHS * int(np.ceil(len(x_train) / BATCH))
        model.compile(
            optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-3, steps)),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        start = time.time()
        model.fit(x_train, y_train, batch_size=BATCH, epochs=EPOCHS, verbose=2, shuffle=True)
        print(f"[vibration] {variant}: trained in {time.time() - start:.0f} s")
        float_acc = float(np.mean(np.argmax(model.predict(_as_seen(x_test), verbose=0), 1) == y_test))
        tflite = _export_and_convert(tf, model, [1, sim.WINDOW, sim.AXES], lambda: ([c] for c in calib))
        tflite = set_input_quantization(tflite, INPUT_SCALE, 0, allowed_consumers={"MEAN", "SUB"})
        path = target / f"vibration_{variant}.tflite"
        path.write_bytes(tflite)
        it = tf.lite.Interpreter(model_path=str(path))
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        int8_io = inp["dtype"] == np.int8 and out["dtype"] == np.int8
        if tuple(inp["quantization"]) != (INPUT_SCALE, 0) or not int8_io:
            raise SystemExit(f"{path}: unexpected input/output quantization {inp['quantization']}")
        scores = run_vectors(tf.lite.Interpreter, str(path), x_test)
        int8_acc = float(np.mean(np.argmax(scores, 1) == y_test))
        results[variant] = {"path": path, "macs": count_macs(model), "float_acc": float_acc,
                            "int8_acc": int8_acc, "bytes": len(tflite),
                            "in_shape": tuple(int(d) for d in inp["shape"]),
                            "out_shape": tuple(int(d) for d in out["shape"])}
        print(f"[vibration] {variant}: held-out accuracy float {float_acc:.4f}, int8 {int8_acc:.4f}")
    shapes = {(r["in_shape"], r["out_shape"]) for r in results.values()}
    if shapes != {((1, sim.WINDOW, sim.AXES), (1, len(sim.LABELS)))}:
        raise SystemExit(f"vibration variants have unexpected input/output shapes: {shapes}")

    # Test vectors: two windows per class at clear severities, expected from tf.lite.Interpreter.
    inputs, labels = sim.make_dataset(2, VECTOR_SEED, severity_range=(0.5, 1.0))
    vectors = {"inputs": inputs, "labels": labels}
    for variant in ("full", "lite"):
        path = str(results[variant]["path"])
        vectors[f"expected_{variant}"] = run_vectors(tf.lite.Interpreter, path, inputs)
    vec_path = target / "vibration_testvectors.npz"
    np.savez_compressed(vec_path, **vectors)

    paths = {v: str(results[v]["path"]) for v in ("full", "lite")}
    reply = measurer.run(
        timings=[([paths["full"], paths["lite"]], 1, LATENCY_RUNS["vibration"])],
        vectors=str(vec_path), vector_models=paths,
    )
    for variant, timing in zip(("full", "lite"), reply["timings"][0]):
        results[variant]["latency"] = timing
    for variant in ("full", "lite"):
        expected = vectors[f"expected_{variant}"].astype(np.int16)
        other = np.asarray(reply["vectors"][variant], dtype=np.int16)
        results[variant]["vector_diff_lsb"] = int(np.max(np.abs(other - expected)))
        results[variant]["vector_argmax_ok"] = int(np.sum(np.argmax(expected, 1) == labels))
    cost = round(results["lite"]["latency"]["p50_ms"] / results["full"]["latency"]["p50_ms"], 2)
    manifest = {
        "name": "vibration",
        "version": "1.0.0",
        "labels": list(sim.LABELS),
        "input": {"window": sim.WINDOW, "axes": sim.AXES, "sample_rate_hz": sim.SAMPLE_RATE_HZ, "units": "g"},
        "output": "logits",
        "default_variant": "full",
        "variants": {
            "full": {"file": "vibration_full.tflite", "cost": 1.0, "accuracy": round(results["full"]["int8_acc"], 4)},
            "lite": {"file": "vibration_lite.tflite", "cost": cost, "accuracy": round(results["lite"]["int8_acc"], 4)},
        },
        "testvectors": vec_path.name,
    }
    (target / "model.json").write_text(json.dumps(manifest, indent=2) + "\n")
    results["backend"] = reply["backend"]
    results["cost"] = cost
    return results


def make_mobilenets(tf, keras, out_dir: Path) -> list:
    """Keras MobileNetV2 with random weights (weights=None, seeded), for benchmarks only."""
    target = out_dir / TEST_MODELS_DIR
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    for alpha, size in ((1.0, 224), (0.35, 96)):
        keras.utils.set_random_seed(KERAS_SEED)
        model = keras.applications.MobileNetV2(
            input_shape=(size, size, 3), alpha=alpha, weights=None, classes=1000)
        rng = np.random.default_rng(size)
        images = [rng.uniform(-1.0, 1.0, (1, size, size, 3)).astype(np.float32) for _ in range(8)]
        tflite = _export_and_convert(tf, model, [1, size, size, 3], lambda: ([c] for c in images))
        path = target / f"mobilenet_v2_{alpha}_{size}_int8.tflite"
        path.write_bytes(tflite)
        paths.append(path)
        print(f"[mobilenet] {path.name}: {len(tflite)} bytes")
    return paths


def make_slow(tf, keras, out_dir: Path) -> Path:
    """A small file that costs SLOW_DEPTH int8 3x3 convolutions over SLOW_SIZE^2 x SLOW_CHANNELS.

    One Conv2D layer (near-identity kernel, ReLU6 so values neither die nor blow up) is applied
    SLOW_DEPTH times, so its weights are stored once; per-tensor quantization keeps the per-layer
    metadata small (about 350 bytes per layer). The output is the per-channel mean, ``[1, 16]`` int8.
    """
    keras.utils.set_random_seed(KERAS_SEED)
    rng = np.random.default_rng(KERAS_SEED)
    shape = (SLOW_SIZE, SLOW_SIZE, SLOW_CHANNELS)
    conv = keras.layers.Conv2D(SLOW_CHANNELS, 3, padding="same", activation="relu6", name="conv")
    inp = keras.Input(shape, name="image")
    x = inp
    for _ in range(SLOW_DEPTH):
        x = conv(x)
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(x))
    kernel = rng.normal(0.0, 0.02, (3, 3, SLOW_CHANNELS, SLOW_CHANNELS))
    kernel[1, 1] += np.eye(SLOW_CHANNELS)
    conv.set_weights([kernel.astype(np.float32), np.zeros(SLOW_CHANNELS, np.float32)])
    calib = [rng.uniform(0.0, 6.0, (1,) + shape).astype(np.float32) for _ in range(2)]
    tflite = _export_and_convert(tf, model, (1,) + shape, lambda: ([c] for c in calib), per_channel=False)
    target = out_dir / TEST_MODELS_DIR
    target.mkdir(parents=True, exist_ok=True)
    path = target / "slow_conv_int8.tflite"
    path.write_bytes(tflite)
    print(f"[slow] {path.name}: {len(tflite)} bytes, {SLOW_DEPTH} convolutions of {shape}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT,
                        help="root to write under (default: the repository root)")
    parser.add_argument("--only", choices=("vibration", "mobilenet", "slow"), help="build only this group")
    parser.add_argument("--litert-python",
                        help="a Python with ai-edge-litert, to measure latency and check test vectors with")
    parser.add_argument("--litert-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.litert_worker:
        print(json.dumps(measure(json.loads(args.litert_worker))))
        return 0

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import warnings

    warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
    import keras
    import tensorflow as tf

    out_dir = args.out_dir.resolve()
    measurer = Measurer(args.litert_python)
    summary = []
    if args.only in (None, "vibration"):
        res = make_vibration(tf, keras, out_dir, measurer)
        full, lite = res["full"], res["lite"]
        summary.append(f"vibration (latency: {res['backend']}, 1 thread, p50; "
                       f"test vectors: {res['backend']} vs tf.lite.Interpreter):")
        for name, r in (("full", full), ("lite", lite)):
            summary.append(
                f"  {name}: held-out int8 accuracy {r['int8_acc']:.4f} (float {r['float_acc']:.4f}), "
                f"{r['macs']:,} MACs, {r['latency']['p50_ms']:.4f} ms, {r['bytes']} bytes, "
                f"test vectors max diff {r['vector_diff_lsb']} LSB, argmax correct {r['vector_argmax_ok']}/8"
            )
        summary.append(f"  lite/full: MACs {lite['macs'] / full['macs']:.3f}, "
                       f"latency {res['cost']:.2f} (the manifest's cost)")
    if args.only in (None, "mobilenet"):
        paths = make_mobilenets(tf, keras, out_dir)
        reply = measurer.run(timings=[([str(p) for p in paths], 2, LATENCY_RUNS["mobilenet"])])
        for path, timing in zip(paths, reply["timings"][0]):
            summary.append(f"{path.name}: {path.stat().st_size:,} bytes, "
                           f"invoke p50 {timing['p50_ms']:.1f} ms (2 threads, {reply['backend']})")
    if args.only in (None, "slow"):
        path = make_slow(tf, keras, out_dir)
        runs = LATENCY_RUNS["slow"]
        reply = measurer.run(timings=[([str(path)], 2, runs), ([str(path)], 1, runs)])
        t2, t1 = (t[0]["p50_ms"] / 1e3 for t in reply["timings"])
        summary.append(f"{path.name}: {path.stat().st_size:,} bytes, invoke {t2:.2f} s (2 threads), "
                       f"{t1:.2f} s (1 thread) with {reply['backend']}")
    print("\n".join(["", "== summary =="] + summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
