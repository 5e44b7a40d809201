"""Engines run one model variant: :class:`InlineEngine` in this process, or the isolated
:class:`~device.runtime.supervisor.ProcessEngine`. Both have the same interface:

- ``start()`` loads and warms up (and raises if the model cannot be served);
- ``infer(values)`` returns an :class:`InferResult` with the raw (quantized) outputs;
- ``info`` describes what runs (backend and version, delegate, fallback reasons, variant, tensors);
- ``close()`` releases everything.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Sequence


from device.runtime.errors import InputInvalid, RuntimeClosed
from device.runtime.histogram import LatencyHistogram
from device.runtime.quarantine import Quarantine
from device.runtime.worker import WorkerSpec


@dataclass(frozen=True)
class InferResult:
    """One inference: raw output tensors (copies), and how long it took.

    Attributes:
        outputs: one array per output tensor, in the tensor's own dtype.
        invoke_ns: the interpreter's ``invoke()`` alone.
        latency_ns: the whole request as the caller saw it (isolation overhead included).
    """

    outputs: list
    invoke_ns: int
    latency_ns: int


class EngineBase:
    """State and bookkeeping shared by both engines."""

    isolation = ""

    def __init__(self, spec: WorkerSpec, quarantine: Quarantine | None = None) -> None:
        self.spec = spec
        self.quarantine = quarantine or Quarantine()
        self.info: dict = {}
        self.inputs: tuple = ()
        self.outputs: tuple = ()
        self.invoke_histogram = LatencyHistogram()
        self.requests = self.crashes = self.timeouts = self.restarts = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._closed = False

    def last_stages(self) -> dict | None:
        """Where the latest request's time went, stage by stage (process isolation only; None here)."""
        return None

    def usable_candidates(self) -> list:
        """The spec's candidates minus quarantined files; raises ModelQuarantined when none is left."""
        cands = [c for c in self.spec.candidates if not self.quarantine.is_quarantined(c.path)]
        if not cands:
            self.quarantine.check(self.spec.candidates[-1].path)
        return cands


class InlineEngine(EngineBase):
    """Runs the interpreter inside the agent process: no isolation, no IPC.

    Meant for benchmarks and trusted models on boards too small for a second process; a model that crashes
    the interpreter takes the agent with it.
    """

    isolation = "inline"

    def __init__(self, spec: WorkerSpec, quarantine: Quarantine | None = None) -> None:
        super().__init__(spec, quarantine)
        self._model = None

    def start(self) -> None:
        import warnings

        from device.runtime.backends import load_backend
        from device.runtime.delegates import DelegateFallback, open_model

        cands = self.usable_candidates()
        backend = load_backend(self.spec.backend)
        with warnings.catch_warnings():  # as in the worker: info["fallbacks"] has the reasons, the runtime logs them
            warnings.simplefilter("ignore", DelegateFallback)
            opened = open_model(backend, cands, self.spec.threads, self.spec.warmup_runs,
                                self.spec.edgetpu_device, self.spec.gpu_library)
        m = opened.model
        self._model = m
        self.inputs, self.outputs = m.inputs, m.outputs
        self.info = {
            "pid": None, "backend": backend.name, "backend_version": backend.version,
            "delegate": opened.delegate_name, "variant": opened.candidate.variant, "path": opened.candidate.path,
            "fallbacks": list(opened.fallbacks), "threads": self.spec.threads,
            "init_ms": m.init_ns / 1e6, "first_ms": m.first_ns / 1e6,
            "inputs": [s.to_dict() for s in m.inputs], "outputs": [s.to_dict() for s in m.outputs],
        }

    def infer(self, values: Sequence) -> InferResult:
        with self._lock:
            if self._closed or self._model is None:
                raise RuntimeClosed("engine is closed" if self._closed else "engine is not started")
            t0 = time.perf_counter_ns()
            m = self._model
            m.set_inputs(values)
            ns = m.invoke()
            outs = [fn().copy() for fn in m.output_fns]
            self.requests += 1
            self.invoke_histogram.record(ns)
            return InferResult(outs, ns, time.perf_counter_ns() - t0)

    @property
    def pid(self) -> int | None:
        return None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._model = None


def check_input_count(values: Sequence, inputs: Sequence) -> None:
    if len(values) != len(inputs):
        raise InputInvalid(f"model takes {len(inputs)} input(s), got {len(values)}")
