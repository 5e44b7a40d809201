"""Opening engines: one variant's, retried through crashes while loading, or the first fallback that serves.

The :class:`~device.runtime.runtime.Runtime` decides what should serve and swaps it in; :class:`EngineOpener`
makes the engine. It plans a variant's delegate candidates, starts an isolated (or inline) engine, retries a
worker that crashes or hangs while loading until the file serves or is quarantined, and walks the fallback
chain: the requested variant, then the model's other CPU variants in manifest order (the model maker lists
them by preference). What it meets goes to ``emit``: crash and timeout events, a quarantine when it happens,
and each distinct delegate fallback once (logged once at warning, however many swaps repeat it).
"""

from __future__ import annotations

import logging
from typing import Callable

from device.runtime import errors as E
from device.runtime.delegates import plan
from device.runtime.engine import InlineEngine
from device.runtime.manifest import ModelManifest
from device.runtime.quarantine import Quarantine
from device.runtime.supervisor import ProcessEngine
from device.runtime.worker import WorkerSpec

log = logging.getLogger(__name__)


class EngineOpener:
    """Starts engines for a runtime.

    Args:
        settings: the runtime's :class:`~device.runtime.runtime.RuntimeSettings`.
        manifest: the model.
        quarantine: the runtime's crash accounting.
        emit: ``emit(kind, data)`` for events.
    """

    def __init__(self, settings, manifest: ModelManifest, quarantine: Quarantine,
                 emit: Callable[[str, dict], None]) -> None:
        self.settings = settings
        self.manifest = manifest
        self.quarantine = quarantine
        self._emit = emit
        self._said: set = set()  # fallback reasons and plan notes already logged

    def first_that_serves(self, target: str, threads: int, stop_at: str | None = None) -> tuple:
        """Opens ``target``, else the model's other CPU variants in manifest order, until one serves or the
        chain reaches ``stop_at``. Returns (engine or None, [(variant, fault), ...] of those that failed).

        Raises:
            DelegateUnavailable: for ``target`` itself (a fallback variant that cannot use the delegate is
                only a failure of that variant).
        """
        skip = {target, self.manifest.cpu_fallback(target).name}
        chain = [target] + [v.name for v in self.manifest.variants.values()
                            if v.requires is None and v.name not in skip]
        failures: list = []
        for name in chain:
            if name == stop_at:
                break
            try:
                return self.open_variant(name, threads), failures
            except E.DelegateUnavailable as exc:
                if name == target:
                    raise
                failures.append((name, exc))
            except E.BackendUnavailable as exc:  # no interpreter at all: no variant will do better
                failures.append((name, exc))
                break
            except E.RuntimeFault as exc:  # a model fault: crashed, hung, quarantined, refused
                failures.append((name, exc))
        return None, failures

    def open_variant(self, name: str, threads: int):
        """Starts an engine for variant ``name``; a crash or hang while loading is retried until the file
        serves or is quarantined (the quarantine's threshold bounds the tries)."""
        for attempt in range(self.quarantine.threshold):
            try:
                return self.make(name, threads)
            except (E.WorkerCrashed, E.WorkerTimeout):
                if attempt == self.quarantine.threshold - 1:
                    raise

    def make(self, name: str, threads: int):
        """Starts an engine for variant ``name`` once (load and warm-up); raises its fault."""
        s = self.settings
        candidates, notes = plan(self.manifest, name, s.delegate, s.delegate_fallback)
        explicit = s.delegate not in ("auto", "cpu")  # asked for by name: its fallback is a warning and an event
        for n in notes:
            if self.say(n, logging.WARNING if explicit else logging.INFO) and explicit:
                self._emit("delegate_fallback", {"reason": n})
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
                self.report(exc, name, None)
            engine.close()
            raise
        for fb in engine.info.get("fallbacks", []):
            if self.say(fb, logging.WARNING):
                self._emit("delegate_fallback", {"reason": fb})
        return engine

    def say(self, text: str, level: int) -> bool:
        """Logs ``text`` at ``level`` the first time, at debug after; returns whether it was the first."""
        first = text not in self._said
        self._said.add(text)
        log.log(level if first else logging.DEBUG, "%s", text)
        return first

    def report(self, exc: E.InferenceFailed, variant: str | None, path: str | None) -> None:
        """Emits the event of a worker fault (crash, timeout, a quarantine that just happened)."""
        if isinstance(exc, E.ModelQuarantined) and not exc.newly:
            return  # refused without loading: the quarantine itself was reported when it happened
        self._emit(exc.code, {"message": str(exc), "variant": variant, "path": getattr(exc, "path", None) or path,
                              "counted": getattr(exc, "counted", True)})
