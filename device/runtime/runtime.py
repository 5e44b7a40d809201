"""The runtime facade the agent uses: one model, its active variant, hot swaps, and status.

:class:`Runtime` picks the backend and delegate plan from the configuration, starts an engine (an isolated
worker by default) for the active variant, and serves :meth:`Runtime.infer`. Switching variant or thread
count is a hot swap: the new engine loads and warms up while the old one keeps serving, then takes over
between two requests, so no request is dropped or fails.

Events (worker crash, timeout, quarantine and its release, delegate fallback, variant change) go to the
``on_event`` callback, which the agent forwards to the link's ``events`` topic.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from device.runtime import errors as E
from device.runtime.delegates import plan, resolve_variant
from device.runtime.engine import InferResult, InlineEngine
from device.runtime.histogram import LatencyHistogram
from device.runtime.manifest import ModelManifest, bundled_model_dir, load_manifest
from device.runtime.quarantine import Quarantine
from device.runtime.supervisor import ProcessEngine
from device.runtime.tensors import dequantize
from device.runtime.worker import WorkerSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeSettings:
    """The runtime's knobs; :meth:`from_config` reads them from the ``[runtime]`` config section."""

    backend: str = "auto"
    delegate: str = "auto"
    edgetpu_device: str = ""
    gpu_delegate: str = ""
    isolation: str = "process"
    threads: int = 2
    deadline_ms: int = 5000
    start_timeout_s: float = 60.0
    quarantine_after: int = 3
    warmup_runs: int = 2
    model: str = ""
    variant: str = "auto"

    @classmethod
    def from_config(cls, section: Any) -> "RuntimeSettings":
        return cls(**{f: getattr(section, f) for f in cls.__dataclass_fields__ if hasattr(section, f)})


@dataclass(frozen=True)
class Prediction:
    """A classified inference: the raw result plus dequantized scores and the top label."""

    result: InferResult
    variant: str
    scores: np.ndarray
    label: str
    index: int

    @property
    def score(self) -> float:
        return float(self.scores[self.index])


class Runtime:
    """Serves one model with the configured backend, delegate and isolation.

    Args:
        settings: runtime settings.
        manifest: the model; loaded from ``settings.model`` (or the bundled model) when None.
        on_event: ``callable(kind: str, data: dict)`` for faults and changes.
        quarantine_path: the JSON file that keeps the model quarantine across restarts (the agent puts it in
            its state directory); None keeps it in memory only.
    """

    def __init__(self, settings: RuntimeSettings | None = None, manifest: ModelManifest | None = None,
                 on_event: Callable[[str, dict], None] | None = None, *,
                 quarantine_path: str | None = None) -> None:
        self.settings = s = settings or RuntimeSettings()
        self.manifest = manifest or load_manifest(s.model or bundled_model_dir())
        self.quarantine = Quarantine(s.quarantine_after, path=quarantine_path)
        self.latency = LatencyHistogram()
        self._on_event = on_event
        self._lock = threading.Lock()  # held for a whole request: one request at a time, swaps between them
        self._swap_lock = threading.Lock()
        self._engine = None
        self._threads = s.threads
        self._requested_variant = s.variant
        self.swaps = 0
        self.failures = 0
        self._retired = {"requests": 0, "crashes": 0, "timeouts": 0, "restarts": 0}

    # ----- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the engine for the configured variant (load and warm-up); a no-op when running."""
        with self._swap_lock:
            if self._engine is not None:
                return
            engine = self._make_engine(self._requested_variant, self._threads)
            with self._lock:
                self._engine = engine

    def close(self) -> None:
        with self._swap_lock, self._lock:
            if self._engine is not None:
                self._engine.close()
                self._engine = None

    def __enter__(self) -> "Runtime":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- requests --------------------------------------------------------------------------------------

    def infer(self, *values: Any) -> InferResult:
        """Runs one inference on the active variant; see :meth:`ProcessEngine.infer` for the errors."""
        return self._serve(values)[0]

    def predict(self, *values: Any) -> Prediction:
        """Infers and classifies: the first output's scores (probabilities when the manifest says the model
        outputs logits) and its top label."""
        r, engine = self._serve(values)
        scores = dequantize(engine.outputs[0], r.outputs[0]).reshape(-1)
        if self.manifest.meta.get("output") == "logits":  # report probabilities, not raw logits
            e = np.exp(scores - scores.max())
            scores = e / e.sum()
        i = int(np.argmax(scores))
        labels = self.manifest.labels
        return Prediction(r, engine.info.get("variant"), scores, labels[i] if i < len(labels) else str(i), i)

    def _serve(self, values: Sequence) -> tuple:
        with self._lock:
            engine = self._engine
            if engine is None:
                raise E.RuntimeClosed("runtime is not started")
            try:
                r = engine.infer(values)
            except E.InferenceFailed as exc:
                self.failures += 1
                self._event_for(exc, engine)
                raise
        self.latency.record(r.latency_ns)
        return r, engine

    # ----- hot swaps -------------------------------------------------------------------------------------

    def set_variant(self, name: str) -> str:
        """Switches to variant ``name`` (or ``auto``) without dropping a request; returns the variant name."""
        resolve_variant(self.manifest, name, self.settings.delegate)  # validate before any work
        self._swap(name, self._threads)
        self._requested_variant = name
        return self.variant

    def set_threads(self, threads: int) -> None:
        """Changes the interpreter thread count (a hot swap: threads are fixed when an interpreter is made)."""
        if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 64:
            raise ValueError(f"threads must be an integer from 1 to 64, got {threads!r}")
        self._swap(self._requested_variant, threads)
        self._threads = threads

    def reconfigure(self, variant: str | None = None, threads: int | None = None) -> bool:
        """Applies a new variant and/or thread count in one hot swap (what the power governor's plan asks).

        Args:
            variant: A variant name or ``auto``; None keeps the requested one.
            threads: Interpreter threads; None keeps the current count.

        Returns:
            True when a swap happened, False when nothing changed.

        Raises:
            ValueError: Bad thread count. ModelInvalid: unknown variant.
        """
        want_variant = self._requested_variant if variant is None else variant
        want_threads = self._threads if threads is None else threads
        if not isinstance(want_threads, int) or isinstance(want_threads, bool) or not 1 <= want_threads <= 64:
            raise ValueError(f"threads must be an integer from 1 to 64, got {want_threads!r}")
        resolved = resolve_variant(self.manifest, want_variant, self.settings.delegate)
        current = resolve_variant(self.manifest, self._requested_variant, self.settings.delegate)
        if resolved == current and want_threads == self._threads and self._engine is not None:
            self._requested_variant = want_variant
            return False
        self._swap(want_variant, want_threads)
        self._requested_variant, self._threads = want_variant, want_threads
        return True

    def _swap(self, variant: str, threads: int) -> None:
        with self._swap_lock:
            old_variant = self.variant
            new = self._make_engine(variant, threads)  # loads and warms up while the old one serves
            with self._lock:
                old, self._engine = self._engine, new
            if old is not None:
                self._retire(old)
                old.close()
            self.swaps += 1
            self._emit("variant_changed", {"from": old_variant, "to": self.variant, "threads": threads})

    def _make_engine(self, requested: str, threads: int):
        s = self.settings
        name = resolve_variant(self.manifest, requested, s.delegate)
        candidates, notes = plan(self.manifest, name, s.delegate)
        for n in notes:
            log.info("%s", n)
        spec = WorkerSpec(s.backend, tuple(candidates), threads, s.warmup_runs, s.edgetpu_device, s.gpu_delegate,
                          label=f"{self.manifest.name}/{name}")
        if s.isolation == "inline":
            engine = InlineEngine(spec, self.quarantine)
        else:
            engine = ProcessEngine(spec, self.quarantine, s.deadline_ms / 1000.0, s.start_timeout_s)
        try:
            engine.start()
        except Exception as exc:
            if isinstance(exc, E.InferenceFailed):
                self._event_for(exc, engine)
            engine.close()
            raise
        for fb in engine.info.get("fallbacks", []):
            self._emit("delegate_fallback", {"reason": fb})
        return engine

    # ----- quarantine ------------------------------------------------------------------------------------

    def release_quarantine(self, sha256: str, by: str | None = None) -> bool:
        """Lifts the quarantine of one model file (an operator's decision, by the digest that :meth:`status`
        lists); the next start or swap may load it again. Emits ``quarantine_released`` when it was
        quarantined.

        Args:
            sha256: the file's SHA-256, as in ``status()["quarantined"]``.
            by: who asked (the signing key's id), for the event.

        Returns:
            True when the file was quarantined and is released now, False when it was not quarantined.
        """
        released = self.quarantine.release(sha256)
        if released:
            self._emit("quarantine_released", {"sha256": sha256, "by": by})
        return released

    # ----- status ----------------------------------------------------------------------------------------

    @property
    def variant(self) -> str | None:
        e = self._engine
        return e.info.get("variant") if e is not None else None

    @property
    def worker_pid(self) -> int | None:
        e = self._engine
        return e.pid if e is not None else None

    def status(self) -> dict:
        """What runs and how it is doing, for status replies, bench and diag."""
        e = self._engine
        info = dict(e.info) if e is not None else {}
        counts = dict(self._retired)
        if e is not None:
            for k in counts:
                counts[k] += getattr(e, k)
        return {
            "model": self.manifest.name,
            "model_version": self.manifest.version,
            "variants": {n: {"cost": v.cost, "requires": v.requires} for n, v in self.manifest.variants.items()},
            "variant": info.get("variant"),
            "backend": info.get("backend"),
            "backend_version": info.get("backend_version"),
            "delegate": info.get("delegate"),
            "delegate_fallbacks": info.get("fallbacks", []),
            "isolation": self.settings.isolation,
            "threads": info.get("threads", self._threads),
            "worker_pid": info.get("pid"),
            "init_ms": info.get("init_ms"),
            "latency": self.latency.summary(),
            "invoke": e.invoke_histogram.summary() if e is not None else None,
            **counts,
            "failures": self.failures,
            "swaps": self.swaps,
            "last_error": e.last_error if e is not None else None,
            "quarantined": [{"path": q.path, "sha256": q.sha256, "crashes": q.crashes, "reason": q.reason,
                             "since": q.since} for q in self.quarantine.entries()],
        }

    def _retire(self, engine) -> None:
        for k in self._retired:
            self._retired[k] += getattr(engine, k)

    def _event_for(self, exc: E.InferenceFailed, engine) -> None:
        self._emit(exc.code, {"message": str(exc), "variant": engine.info.get("variant"),
                              "path": engine.info.get("path")})

    def _emit(self, kind: str, data: dict) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(kind, data)
        except Exception:  # a broken listener must not break inference
            log.exception("event listener failed on %s", kind)
