"""The runtime facade the agent uses: one model, its active variant, hot swaps, fallbacks, and status.

:class:`Runtime` picks the backend and delegate plan from the configuration, starts an engine (an isolated
worker by default) for the active variant, and serves :meth:`Runtime.infer`. Switching variant or thread
count is a hot swap: the new engine loads and warms up while the old one keeps serving, then takes over
between two requests, so no request is dropped or fails; so is a switch to another model
(:meth:`Runtime.switch_model`: an update's new slot, or back). Swaps, starts and reconfigurations are serial (one
swap lock), so two threads asking at once never swap twice for one change nor leave a stale request.

A model fault never stops the runtime from starting. A variant whose worker crashes or hangs while loading
is retried until it serves or its file is quarantined (``quarantine_after`` tries, so one bad file is
settled at once), and a file the interpreter refuses or that is quarantined is given up at once. The
runtime then falls back to the model's other CPU variants in manifest order (the model maker lists them by
preference), with a ``variant_fallback`` event {from, to, reason}. A crash during a request that
quarantines the serving file falls back the same way, right after that request. When no variant can serve,
the runtime is *not serving*: :attr:`Runtime.serving` is False, ``status()`` gives the reason,
:meth:`Runtime.predict` raises :class:`NotServing`, and a ``not_serving`` event {reason} is emitted
(``serving`` {variant, threads} when it serves again).

It tries again when an operator releases a quarantine, when a reconfiguration asks for something else, on
an explicit :meth:`Runtime.start`, and by itself: a request to a runtime that is not serving retries, at
most every ``not_serving_retry_s`` (60 s) of the runtime's clock (a replaced file, a plugged-in
accelerator). A fallback variant keeps serving until a release, a new request or a restart: retrying the
preferred variant by itself would only repeat the failure that set it aside.

An explicitly requested delegate (``edgetpu``, ``gpu``) that cannot be used is an error,
:class:`DelegateUnavailable`, raised by :meth:`Runtime.start` (the runtime is then not serving, with that
reason), unless ``delegate_fallback`` allows the CPU. Under ``auto`` the runtime falls back and keeps the
reasons (``status()["delegate_fallbacks"]``). Each distinct fallback reason is logged once (warning) and
emitted once (``delegate_fallback``) per runtime, however many swaps repeat it.

Events go to the ``on_event`` callback, which the agent forwards to the link's ``events`` topic.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from device.clock import SYSTEM_CLOCK
from device.runtime import errors as E
from device.runtime.delegates import resolve_variant
from device.runtime.engine import InferResult
from device.runtime.histogram import LatencyHistogram
from device.runtime.manifest import ModelManifest, bundled_model_dir, load_manifest
from device.runtime.opener import EngineOpener
from device.runtime.quarantine import Quarantine
from device.runtime.tensors import dequantize

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
    delegate_fallback: bool = False  # an explicit edgetpu/gpu that cannot be used may fall back to the CPU
    not_serving_retry_s: float = 60.0  # a runtime that cannot serve retries its variants at most this often

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
    model: ModelManifest | None = None  # the model that answered (a switch may have installed another since)

    @property
    def score(self) -> float:
        return float(self.scores[self.index])


class Runtime:
    """Serves one model with the configured backend, delegate and isolation (see the module docstring).

    Args:
        settings: runtime settings.
        manifest: the model; loaded from ``settings.model`` (or the bundled model) when None.
        on_event: ``callable(kind: str, data: dict)`` for faults and changes.
        quarantine_path: the JSON file that keeps the model quarantine across restarts (the agent puts it in
            its state directory); None keeps it in memory only.
        clock: paces the retries of a runtime that is not serving.
    """

    def __init__(self, settings: RuntimeSettings | None = None, manifest: ModelManifest | None = None,
                 on_event: Callable[[str, dict], None] | None = None, *,
                 quarantine_path: str | None = None, clock=SYSTEM_CLOCK) -> None:
        self.settings = s = settings or RuntimeSettings()
        self.manifest = manifest or load_manifest(s.model or bundled_model_dir())
        self.quarantine = Quarantine(s.quarantine_after, path=quarantine_path)
        self.latency = LatencyHistogram()
        self._on_event = on_event
        self._clock = clock
        self._opener = EngineOpener(s, self.manifest, self.quarantine, self._emit)
        self._lock = threading.Lock()  # held for a whole request: one request at a time, swaps between them
        self._swap_lock = threading.Lock()  # starts, swaps and the requested state: one change at a time
        self._engine = None
        self._threads = s.threads
        self._requested_variant = s.variant
        self._started = False
        self._down: str | None = None  # why nothing serves, while started and not serving
        self._retry_at = 0.0
        self._fallback: dict | None = None  # while a fallback variant serves: {"from", "to", "reason"}
        self.swaps = 0
        self.failures = 0
        self._retired = {"requests": 0, "crashes": 0, "timeouts": 0, "restarts": 0}

    # ----- lifecycle -------------------------------------------------------------------------------------

    def start(self, *, strict: bool = False) -> None:
        """Starts serving the requested variant (load and warm-up), or a fallback; a no-op when serving.

        Never raises for a model fault: when no variant can serve, it returns with :attr:`serving` False.

        Args:
            strict: load exactly the requested variant, once, and raise its fault (for ``fieldnode bench``
                and ``selftest``, which test one variant and must not measure another).

        Raises:
            DelegateUnavailable: the explicitly requested delegate cannot be used (see the module docstring).
            RuntimeFault: with ``strict``, the fault of the requested variant.
        """
        with self._swap_lock:
            if self._engine is not None:
                return
            self._started = True
            if strict:
                target = resolve_variant(self.manifest, self._requested_variant, self.settings.delegate)
                try:
                    self._install(self._opener.make(target, self._threads))
                except BaseException:
                    self._started = False  # a failed strict start leaves nothing to retry
                    raise
                return
            self._bring_up()

    def close(self) -> None:
        with self._swap_lock, self._lock:
            self._started = False
            self._down = self._fallback = None
            if self._engine is not None:
                self._engine.close()
                self._engine = None

    def __enter__(self) -> "Runtime":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def serving(self) -> bool:
        """True while a variant is loaded and serves requests."""
        return self._engine is not None

    # ----- requests --------------------------------------------------------------------------------------

    def infer(self, *values: Any) -> InferResult:
        """Runs one inference on the active variant; see :meth:`ProcessEngine.infer` for the errors, and
        :class:`NotServing` when no variant can serve."""
        return self._serve(values)[0]

    def predict(self, *values: Any) -> Prediction:
        """Infers and classifies: the first output's scores (probabilities when the manifest says the model
        outputs logits) and its top label.

        Raises:
            NotServing: no variant can serve now (the message says why).
            InferenceFailed: and its subclasses, see :meth:`ProcessEngine.infer`.
        """
        r, engine = self._serve(values)
        m = engine.manifest  # the engine's own model: a model switch may have installed another one since
        scores = dequantize(engine.outputs[0], r.outputs[0]).reshape(-1)
        if m.meta.get("output") == "logits":  # report probabilities, not raw logits
            e = np.exp(scores - scores.max())
            scores = e / e.sum()
        i = int(np.argmax(scores))
        labels = m.labels
        return Prediction(r, engine.info.get("variant"), scores, labels[i] if i < len(labels) else str(i), i, m)

    def abort(self) -> None:
        """Gives up a request in flight without waiting for it (shutdown: :meth:`close` follows); not a fault
        of the model."""
        e = self._engine
        if e is not None and hasattr(e, "abort"):
            e.abort()

    def _serve(self, values: Sequence) -> tuple:
        try:
            with self._lock:
                engine = self._engine
                if engine is not None:
                    r = engine.infer(values)
        except E.RuntimeClosed:
            raise  # given up to stop: not a failure of the model
        except E.InferenceFailed as exc:
            self._request_failed(exc, engine)
            raise
        if engine is None:
            return self._serve_down(values)
        self.latency.record(r.latency_ns)
        return r, engine

    def _request_failed(self, exc: E.InferenceFailed, engine) -> None:
        with self._lock:
            self.failures += 1
        self._opener.report(exc, engine.info.get("variant"), engine.info.get("path"))
        if isinstance(exc, E.ModelQuarantined):  # the serving file is quarantined now: serve another
            with self._swap_lock:
                if self._engine is engine:
                    self._replace(resolve_variant(self.manifest, self._requested_variant, self.settings.delegate),
                                  self._threads, keep=None, or_go_down=True)

    def retry_if_due(self) -> bool:
        """When started and not serving, and ``not_serving_retry_s`` has passed since the last try, tries the
        variants again (without waiting for a swap in progress). Requests call it; a loop that stops sending
        requests while nothing serves may call it instead. Returns whether the runtime serves."""
        if (self._engine is None and self._started and self._clock.monotonic() >= self._retry_at
                and self._swap_lock.acquire(blocking=False)):
            try:
                if self._started and self._engine is None:
                    self._bring_up(raising=False)
            finally:
                self._swap_lock.release()
        return self._engine is not None

    def _serve_down(self, values: Sequence) -> tuple:
        """A request while nothing serves (not the per-request path): retries when it is time, else refuses."""
        if not self._started:
            raise E.RuntimeClosed("runtime is not started")
        self.retry_if_due()
        if self._engine is None:
            reason = self._down or "it is starting"
            raise E.NotServing(f"model {self.manifest.name} is not serving: {reason}")
        return self._serve(values)

    # ----- hot swaps -------------------------------------------------------------------------------------

    def set_variant(self, name: str) -> str | None:
        """Switches to variant ``name`` (or ``auto``) without dropping a request (see :meth:`reconfigure`);
        returns the variant now serving (another one when ``name`` cannot serve)."""
        self.reconfigure(variant=name)
        return self.variant

    def set_threads(self, threads: int) -> None:
        """Changes the interpreter thread count (a hot swap: threads are fixed when an interpreter is made)."""
        self.reconfigure(threads=threads)

    def reconfigure(self, variant: str | None = None, threads: int | None = None) -> bool:
        """Applies a new variant and/or thread count in one hot swap (what the power governor's plan asks).

        The request is read, compared and recorded under the swap lock, so concurrent callers are applied one
        after the other. Nothing is swapped when what runs is already what is asked. A variant that cannot
        serve is reported (``variant_fallback``) and the one serving keeps serving; a runtime that is not
        serving tries the new request at once.

        Args:
            variant: A variant name or ``auto``; None keeps the requested one.
            threads: Interpreter threads; None keeps the current count.

        Returns:
            True when a swap happened (or a runtime that was not serving serves now), False otherwise.

        Raises:
            ValueError: Bad thread count. ModelInvalid: unknown variant. DelegateUnavailable: the explicit
            delegate cannot run the requested variant (the variant serving keeps serving).
        """
        with self._swap_lock:
            want_variant = self._requested_variant if variant is None else variant
            want_threads = self._threads if threads is None else threads
            if not isinstance(want_threads, int) or isinstance(want_threads, bool) or not 1 <= want_threads <= 64:
                raise ValueError(f"threads must be an integer from 1 to 64, got {want_threads!r}")
            delegate = self.settings.delegate
            target = resolve_variant(self.manifest, want_variant, delegate)  # validates before any work
            unchanged = (target == resolve_variant(self.manifest, self._requested_variant, delegate)
                         and want_threads == self._threads)
            self._requested_variant, self._threads = want_variant, want_threads
            if not self._started or unchanged:
                return False  # not started: the request takes effect at start; unchanged: nothing to do
            if self._engine is None:
                return self._bring_up(raising=False)
            engine = self._engine
            if engine.info.get("variant") == target and engine.spec.threads == want_threads:
                self._fallback = None
                return False  # what runs is what is asked (e.g. lite -> lite): no swap, no event
            keep = engine.info.get("variant") if engine.spec.threads == want_threads else None
            try:
                return self._replace(target, want_threads, keep=keep)
            except E.DelegateUnavailable as exc:
                self._fallback = {"from": target, "to": engine.info.get("variant"), "reason": str(exc)}
                raise

    def switch_model(self, manifest: ModelManifest) -> None:
        """Hot-swaps to another model (an update's slot, or back): like a variant swap, its worker loads and
        warms up while the model before serves, takes over between two requests, and the old one is retired.
        The requested variant and threads carry over (a variant the new model lacks becomes ``auto``), its
        variants fall back as at a start, and the latency histogram starts afresh. Emits ``model_changed``
        {model, from_version, to_version, variant}. Before :meth:`start` it only changes what will start.

        Raises:
            NotServing: no variant of the new model can serve (the model before keeps serving, or stays down).
            DelegateUnavailable: the explicit delegate cannot run it (the model before keeps serving).
        """
        with self._swap_lock:
            old, was_down = self.manifest, self._started and self._engine is None
            opener = EngineOpener(self.settings, manifest, self.quarantine, self._emit)
            want = self._requested_variant if self._requested_variant in manifest.variants else "auto"
            target = resolve_variant(manifest, want, self.settings.delegate)
            if not self._started:
                self.manifest, self._opener, self._requested_variant = manifest, opener, want
                return
            engine, failures = opener.first_that_serves(target, self._threads)
            if engine is None:
                why = "; ".join(f"{n}: {exc}" for n, exc in failures) or "no variant to load"
                raise E.NotServing(f"model {manifest.name} {manifest.version} cannot serve: {why}")
            self._requested_variant = want
            self._install(engine, manifest, opener)
            self.latency.reset()
            self.swaps += 1
            self._note_fallback(target, engine, failures)
            self._emit("model_changed", {"model": manifest.name, "from_version": old.version,
                                         "to_version": manifest.version, "variant": self.variant})
            if was_down:
                self._emit("serving", {"variant": self.variant, "threads": self._threads})

    # ----- bringing variants up --------------------------------------------------------------------------

    def _bring_up(self, raising: bool = True) -> bool:
        """Serves the requested variant or a fallback (swap lock held, nothing serving); returns whether it
        serves. An unusable explicit delegate leaves it not serving, and raises when ``raising``."""
        target = resolve_variant(self.manifest, self._requested_variant, self.settings.delegate)
        try:
            engine, failures = self._opener.first_that_serves(target, self._threads)
        except E.DelegateUnavailable as exc:
            self._go_down(str(exc))
            if raising:
                raise
            return False
        if engine is None:
            self._go_down(self._why(failures))
            return False
        was_down = self._down is not None
        self._install(engine)
        self._note_fallback(target, engine, failures)
        if was_down:
            log.warning("model %s serves again: variant %s", self.manifest.name, self.variant)
            self._emit("serving", {"variant": self.variant, "threads": self._threads})
        return True

    def _replace(self, target: str, threads: int, keep: str | None, or_go_down: bool = False) -> bool:
        """Hot-swaps to ``target`` or its first fallback that serves (swap lock held, an engine serving);
        stops at ``keep``, the variant serving now, which then stays. Returns whether a swap happened."""
        old = self._engine
        old_variant = old.info.get("variant")
        try:
            engine, failures = self._opener.first_that_serves(target, threads, stop_at=keep)
        except E.DelegateUnavailable as exc:
            if not or_go_down:
                raise
            engine, failures = None, [(target, exc)]
        if engine is None:
            if or_go_down:
                self._go_down(self._why(failures))
            elif failures:  # nothing better: the variant serving now stays
                self._note_fallback(target, old, failures)
            return False
        self._install(engine)
        self.swaps += 1
        if engine.info.get("variant") != old_variant:
            self._emit("variant_changed", {"from": old_variant, "to": self.variant, "threads": threads})
        else:
            log.info("variant %s: %d -> %d interpreter threads", old_variant, old.spec.threads, threads)
        self._note_fallback(target, engine, failures)
        return True

    def _install(self, engine, manifest: ModelManifest | None = None, opener=None) -> None:
        """Puts ``engine`` in service between two requests and retires the one it replaces (with a model
        switch, the model and its opener change in the same step)."""
        engine.manifest = manifest or self.manifest
        with self._lock:
            old, self._engine = self._engine, engine
            if manifest is not None:
                self.manifest, self._opener = manifest, opener
        self._down = None
        self._retry_at = 0.0
        if old is not None:
            self._retire(old)
            old.close()

    def _go_down(self, reason: str) -> None:
        """Stops serving (swap lock held): nothing could serve, for ``reason``."""
        with self._lock:
            old, self._engine = self._engine, None
        if old is not None:
            self._retire(old)
            old.close()
        self._retry_at = self._clock.monotonic() + self.settings.not_serving_retry_s
        self._fallback = None
        if self._down is None:
            log.error("model %s is not serving: %s", self.manifest.name, reason)
            self._emit("not_serving", {"reason": reason})
        elif reason != self._down:  # a retry failed another way: worth a line, not another event
            log.info("model %s is still not serving: %s", self.manifest.name, reason)
        self._down = reason

    def _note_fallback(self, target: str, engine, failures: list) -> None:
        if not failures:
            self._fallback = None
            return
        to = engine.info.get("variant")
        reason = str(failures[0][1])
        self._fallback = {"from": target, "to": to, "reason": reason}
        log.warning("variant %s of model %s cannot serve (%s); serving variant %s instead", target,
                    self.manifest.name, reason, to)
        self._emit("variant_fallback", {"from": target, "to": to, "reason": reason})

    def _why(self, failures: list) -> str:
        if not failures:
            return f"model {self.manifest.name} has no variant to load"
        return "no variant can serve: " + "; ".join(f"{name}: {exc}" for name, exc in failures)

    # ----- quarantine ------------------------------------------------------------------------------------

    def release_quarantine(self, sha256: str, by: str | None = None) -> bool:
        """Lifts the quarantine of one model file (an operator's decision, by the digest that :meth:`status`
        lists). Emits ``quarantine_released`` when it was quarantined, then tries the requested variant at
        once when the runtime is not serving or serves a fallback.

        Args:
            sha256: the file's SHA-256, as in ``status()["quarantined"]``.
            by: who asked (the signing key's id), for the event.

        Returns:
            True when the file was quarantined and is released now, False when it was not quarantined.
        """
        released = self.quarantine.release(sha256)
        if released:
            self._emit("quarantine_released", {"sha256": sha256, "by": by})
            with self._swap_lock:
                if not self._started:
                    pass
                elif self._engine is None:
                    self._bring_up(raising=False)
                elif self._fallback is not None:
                    target = resolve_variant(self.manifest, self._requested_variant, self.settings.delegate)
                    try:
                        self._replace(target, self._threads, keep=self._engine.info.get("variant"))
                    except E.DelegateUnavailable:
                        pass  # the variant serving now stays; the reason was logged when it first fell back
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
            "serving": e is not None,
            "not_serving_reason": None if e is not None else self._down,
            "requested_variant": self._requested_variant,
            "variant": info.get("variant"),
            "variant_fallback": dict(self._fallback) if self._fallback else None,
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

    def _emit(self, kind: str, data: dict) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(kind, data)
        except Exception:  # a broken listener must not break inference
            log.exception("event listener failed on %s", kind)
