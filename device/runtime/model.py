"""An interpreter wrapped for the per-inference path.

:class:`Model` caches tensor details once, writes inputs through ``tensor()`` views (no per-call copy into
a temporary), quantizes float inputs and dequantizes outputs from the tensors' scale and zero point, warms
up after load and keeps a latency histogram. It runs in whatever process creates it: inside the isolated
worker (the default) or in the agent itself (``isolation = "inline"``).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Sequence

import numpy as np

from device.runtime.backends import Backend
from device.runtime.errors import InferenceFailed, InputInvalid, ModelInvalid
from device.runtime.flatbuf import verify_model_bytes
from device.runtime.histogram import LatencyHistogram
from device.runtime.tensors import TensorSpec, dequantize, write_input

# The interpreter's error reporter appends each native message to one buffer without a separator
# ("... in XNNPACK delegateunsupported datatype (INT32) ...tensor 6Node number 8 ..."). These are the seams
# seen in practice: XNNPACK's messages end "in XNNPACK delegate", a message starts right after a digit or a
# closing parenthesis with a capitalised word or a lower-case verb, or after a full stop with a known opening.
_NATIVE_SEAM = re.compile(r"(?<=in XNNPACK delegate)(?=\w)"
                          r"|(?<=[\d)])(?=[A-Z][a-z])"
                          r"|(?<=[\d)])(?=(?:failed|unsupported|unable|cannot|invalid) )"
                          r"|(?<=\.)(?=(?:Node number|Didn't|Encountered|Failed|Restored|Unsupported|Invalid) )"
                          r"|(?<=[.)])(?=/\S*tensorflow/lite/)"
                          r"|\s*\n\s*")


def native_message(exc: BaseException) -> str:
    """The text of an interpreter exception with its native messages separated by ``"; "`` (each once)."""
    parts: list[str] = []
    for part in _NATIVE_SEAM.split(str(exc)):
        part = part.strip()
        if part and part not in parts:  # the reporter's buffer may repeat earlier messages
            parts.append(part)
    return "; ".join(parts)


TFLITE_IDENTIFIER = b"TFL3"
MAX_MODEL_BYTES = 256 * 1024 * 1024


def check_model_file(path: str) -> int:
    """Checks that ``path`` looks like a TFLite flatbuffer before any interpreter parses it.

    Returns:
        The file's size in bytes.

    Raises:
        ModelInvalid: the file is missing, unreadable, too small or too large, or lacks the ``TFL3``
            identifier; the message names the file and the problem.
    """
    try:
        size = os.path.getsize(path)
        if size > MAX_MODEL_BYTES:
            raise ModelInvalid(f"model file {path}: {size} bytes exceeds the {MAX_MODEL_BYTES} byte limit")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ModelInvalid(f"model file {path}: cannot read: {exc.strerror or exc}") from exc
    size, head = len(data), data[:8]
    if size < 8:
        raise ModelInvalid(f"model file {path}: {size} bytes is too small for a TFLite flatbuffer")
    if head[4:8] != TFLITE_IDENTIFIER:
        raise ModelInvalid(
            f"model file {path}: not a TFLite model (file identifier {head[4:8]!r}, expected {TFLITE_IDENTIFIER!r})"
        )
    verify_model_bytes(data, path)
    return size


class Model:
    """A loaded, allocated and warmed-up interpreter.

    Args:
        path: the ``.tflite`` file.
        backend: the interpreter backend.
        threads: interpreter threads.
        delegates: delegate objects already loaded by ``backend.load_delegate``.
        warmup_runs: invocations on zero input after load, so the first real request is not the slow one.

    Raises:
        ModelInvalid: the file is not a model the interpreter accepts.
    """

    def __init__(self, path: str, backend: Backend, threads: int = 2, delegates: Sequence[Any] = (),
                 warmup_runs: int = 2) -> None:
        check_model_file(path)
        self.path = path
        self.backend = backend
        self.threads = threads
        t0 = time.perf_counter_ns()
        try:
            self._interp = backend.Interpreter(model_path=path, num_threads=threads,
                                               experimental_delegates=list(delegates) or None)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelInvalid(f"model file {path}: the interpreter refused it: {native_message(exc)}") from exc
        self.inputs = tuple(TensorSpec.from_details(d) for d in self._interp.get_input_details())
        self.outputs = tuple(TensorSpec.from_details(d) for d in self._interp.get_output_details())
        # tensor() returns a function that yields a fresh view; the functions may be held, the views not.
        self.input_fns = tuple(self._interp.tensor(s.index) for s in self.inputs)
        self.output_fns = tuple(self._interp.tensor(s.index) for s in self.outputs)
        self._scratch = tuple(np.empty(s.shape, np.float32) if s.quantized else None for s in self.inputs)
        self.init_ns = time.perf_counter_ns() - t0
        self.histogram = LatencyHistogram()
        self.first_ns = 0
        self.first_ns = 0  # the first invoke's time, set by invoke(); usually a warm-up run
        for _ in range(warmup_runs):
            self.invoke()
        self.histogram.reset()
        self.delegated = self._has_delegated_nodes()

    def _has_delegated_nodes(self) -> bool:
        try:
            ops = self._interp._get_ops_details()
        except Exception:
            return False
        return any(op.get("op_name") == "DELEGATE" for op in ops)

    def input_view(self, i: int = 0) -> np.ndarray:
        """A zero-copy view of input ``i``; valid only until the next invoke."""
        return self.input_fns[i]()

    def output_view(self, i: int = 0) -> np.ndarray:
        """A zero-copy view of output ``i``; valid only until the next invoke."""
        return self.output_fns[i]()

    def set_inputs(self, values: Sequence[Any]) -> None:
        """Writes one value per input tensor, quantizing floats where the tensor is quantized.

        Raises:
            InputInvalid: wrong number of inputs, or a value of the wrong shape or dtype.
        """
        if len(values) != len(self.inputs):
            raise InputInvalid(f"model takes {len(self.inputs)} input(s), got {len(values)}")
        for spec, fn, scratch, value in zip(self.inputs, self.input_fns, self._scratch, values):
            write_input(spec, value, fn(), scratch)

    def invoke(self) -> int:
        """Runs the interpreter once on the current inputs; returns the time it took in nanoseconds.

        Raises:
            InferenceFailed: the interpreter reported an error.
        """
        t0 = time.perf_counter_ns()
        try:
            self._interp.invoke()
        except (ValueError, RuntimeError) as exc:
            raise InferenceFailed(f"invoke failed: {native_message(exc)}") from exc
        ns = time.perf_counter_ns() - t0
        if not self.first_ns:
            self.first_ns = ns
        self.histogram.record(ns)
        return ns

    def run(self, *values: Any) -> list[np.ndarray]:
        """Sets inputs, invokes, and returns copies of the raw (still quantized) outputs."""
        self.set_inputs(values)
        self.invoke()
        return [fn().copy() for fn in self.output_fns]

    def scores(self, raw_outputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Dequantizes raw outputs to float32 real values."""
        return [dequantize(s, r) for s, r in zip(self.outputs, raw_outputs)]
