"""The agent's side of model updates: which model serves at start, the trial of a new one, installs by command.

:class:`AgentUpdates` owns the A/B store of the state directory (``<state_dir>/update``, always there, with or
without a repository), the :class:`~device.update.trial.Trial` of a model on trial, its shadow runtime and the
background install started by a command. The agent calls it at a few points and nowhere else:

* **construction**: ``recover(restarted=True)``; :attr:`manifest` is what the runtime loads: the store's active
  slot, else the bundled model. ``runtime.model`` set in the configuration is an operator's override: the store
  is only repaired (``restarted=False``, no trial restart counted), it does not serve, and status says so.
* **a slot on trial** (found at start, or just installed): a :class:`Trial` watches the new model from before
  its worker loads (a crash while loading counts). :meth:`observe` feeds it each prediction of the new model and,
  when ``update.shadow`` is on and the governor is not in saver or critical, the label the previous model (the
  store's fallback slot, or the bundled model) gives the same window, from a second runtime started at the first
  window (a second worker, during the trial only). :meth:`on_event` turns the runtime's ``worker_crashed``,
  ``worker_timeout``, ``model_quarantined`` and ``not_serving`` into a failed trial. :meth:`tick` (the inference
  loop, every turn, serving or not) acts on the verdict: Pass -> ``store.commit`` (``update_committed``); Fail ->
  ``store.rollback`` then ``Runtime.switch_model`` back to the fallback or the bundled model
  (``update_rolled_back`` {name, version, reason, code}). ``update_trial`` {version, windows, p50_ms, agreement}
  is emitted at the start and at the verdict. A reboot mid-trial resumes it from zero windows (the store counts
  restarts and rolls back a model that keeps taking the board down).
* **commands** (:mod:`device.agent.commands`): :meth:`status`, :meth:`rollback`, and the two that wait on the
  network, which return at once so that the link's single command thread never waits on a repository (one that
  never answers holds a request for ``(retries + 1) * update.timeout_s`` per file): :meth:`check` refreshes on
  an ``update-check`` thread (``update_check`` {state: started | checked | failed, ...} events; ``checked``
  carries what an install would install), and :meth:`start_install` installs on an ``update-install`` thread:
  ``update_install`` {state: started | progress | up_to_date | installed | failed, ...} events say how it goes,
  then the new slot serves on trial as above. One of them runs at a time; another is refused ``Busy``.

Store events are forwarded as ``store_<kind>`` (what changed on disk); the ``update_*`` events are the
agent's decisions. Every model change goes through one lock, so a verdict, a command's rollback and an
install's switch never interleave; the inference loop never waits for it (it judges again at its next turn).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Callable

from device.clock import SYSTEM_CLOCK
from device.errors import FieldnodeError
from device.runtime.manifest import bundled_model_dir, load_manifest
from device.update.errors import Busy, Deferred, HealthGateFailed, StoreError, UpdateError
from device.update.store.store import ModelStore
from device.update.trial import Trial, TrialSettings
from device.threads import Thread

log = logging.getLogger(__name__)

CRASH_EVENTS = frozenset({"worker_crashed", "worker_timeout", "model_quarantined", "not_serving"})
QUIET_LEVELS = frozenset({"saver", "critical"})  # no shadow (and installs deferred) at these governor levels
RETRY_S = 5.0  # a verdict the store could not record yet (its lock is held) is tried again this much later
DEFERRED_RETRY_S = 300.0  # a deferred install is tried again this often once the governor leaves saver/critical


class AgentUpdates:
    """See the module docstring.

    Args:
        cfg: the agent's configuration (``[update]``, ``runtime.model``, ``device.state_dir``).
        emit: the agent's ``event(kind, data)``.
        level: returns the governor's level label (``performance`` ... ``critical``).
        clock: the agent's clock (the trial's time, the store's stamps).
    """

    def __init__(self, cfg, emit: Callable[[str, dict], None], level: Callable[[], str], clock=SYSTEM_CLOCK):
        self.cfg, self._emit, self._level, self._clock = cfg, emit, level, clock
        self.settings = TrialSettings.from_config(cfg.update)
        self.override = cfg.runtime.model or None
        self.source = "override" if self.override else "bundled"
        self.recovery: str | None = None
        self.problem: str | None = None
        self.runtime = None
        self.manifest = None  # what the runtime loads (None: the override, loaded by the runtime as before)
        self._mu = threading.Lock()  # the trial, the shadow and the install job
        self._change = threading.Lock()  # model changes: a verdict, a command's rollback, an install's switch
        self._trial: Trial | None = None
        self._trial_root: str | None = None  # the new model's directory: only its predictions count
        self._shadow = None
        self._shadow_tried = False
        self._retry_at = 0.0
        self._job: threading.Thread | None = None
        self._job_state: dict | None = None
        self._check_job: threading.Thread | None = None
        self._check_start = threading.Lock()
        self._check_state: dict | None = None
        self._deferred: tuple | None = None  # (version, by, when) of an install deferred for power or heat
        self._recovering = True
        self.store = ModelStore.for_state_dir(cfg.device.state_dir, who="agent", clock=clock,
                                              on_event=self._store_event)
        try:
            self.recovery = self.store.recover(restarted=not self.override).value
        except UpdateError as exc:  # the CLI holds the lock, or the state directory is read-only: serve anyway
            self._trouble(f"the update store could not be recovered: {exc}", exc)
        self._recovering = False
        if not self.override:
            self._choose()

    def _choose(self) -> None:
        """The model to serve at start: the active slot (on trial: watched from now on), else the bundled one."""
        while True:
            active = self._active()
            if active is None:
                self.manifest = load_manifest(bundled_model_dir())
                return
            try:
                self.manifest = load_manifest(active.dir)
            except FieldnodeError as exc:  # recover checked the slot; a manifest can still go bad under it
                try:
                    self.store.rollback(f"its model cannot be read: {exc}", active.version)
                except UpdateError as err:
                    self._trouble(f"{active.name} v{active.version} cannot be read and not rolled back: {err}", err)
                    self.manifest = load_manifest(bundled_model_dir())
                    return
                continue
            self.source = "store"
            if active.state == "trial":
                self._arm(active, baseline=None)
            return

    # --- the agent's hooks ----------------------------------------------------------------------------

    def attach(self, runtime) -> None:
        """The runtime built from :attr:`manifest` (switches and the latency baseline go through it)."""
        self.runtime = runtime

    def started(self) -> None:
        """The runtime has started: a trial found at start says so."""
        trial = self._trial
        if trial is not None:
            self._emit("update_trial", {"name": trial.name, **trial.status(), "shadow": self.cfg.update.shadow})

    def on_event(self, kind: str, data: dict) -> None:
        """Every event of the agent: a fault of the new model's runtime fails its trial at once."""
        trial = self._trial
        # A worker killed from outside (an operator, the OOM killer) is not counted against the model, and does
        # not fail its trial either: the event says so (counted false).
        if trial is not None and kind in CRASH_EVENTS and not data.get("shadow") and data.get("counted", True):
            trial.crashed(f"{kind}: {data.get('message') or data.get('reason') or data}")

    def observe(self, window, prediction) -> None:
        """One prediction of the runtime (any thread): fed to the trial, with the shadow's label for ``window``."""
        with self._mu:
            trial, root = self._trial, self._trial_root
        if trial is None or prediction.model is None or prediction.model.root != root:
            return  # no trial, or the model before the switch still answered
        trial.observe(prediction.scores, prediction.result.latency_ns / 1e6, prediction.label)
        if not self.cfg.update.shadow or self._level() in QUIET_LEVELS:
            return
        shadow = self._shadow_runtime(trial)
        if shadow is None:
            return
        try:
            sp = shadow.predict(window)
        except FieldnodeError as exc:  # the previous model failing is not the new model's fault: stop comparing
            self._drop_shadow(f"the shadow failed: {exc}")
            return
        trial.shadow(prediction.label, sp.label, sp.result.latency_ns / 1e6)

    def tick(self) -> None:
        """Acts on the trial's verdict (the inference loop's thread, every turn); never waits for a change. Also
        starts again an install deferred for power or heat once the governor allows it."""
        trial = self._trial
        if trial is None:
            self._retry_deferred()
            return
        if self._clock.monotonic() < self._retry_at:
            return
        verdict = trial.verdict()
        if verdict is None or not self._change.acquire(blocking=False):
            return
        try:
            if self._trial is trial:
                self._finish(trial, verdict)
        finally:
            self._change.release()

    def close(self) -> None:
        self._drop_shadow(None)
        for job in (self._job, self._check_job):
            if job is not None:
                job.join(1.0)  # an install cut short here is cleaned by the store's recovery at the next start

    # --- the verdict ----------------------------------------------------------------------------------

    def _finish(self, trial: Trial, verdict) -> None:
        """Commits or rolls back (``_change`` held); the store lock held elsewhere retries later."""
        try:
            if verdict.passed:
                info = self.store.commit(trial.version)
            else:
                now = self.store.rollback(verdict.reason, trial.version)
        except Busy as exc:
            self._retry_at = self._clock.monotonic() + RETRY_S
            log.info("trial verdict for v%s waits for the store: %s", trial.version, exc)
            return
        except StoreError as exc:  # the CLI judged it first (committed or rolled back): follow the store
            self._end_trial()
            self._trouble(f"the verdict on v{trial.version} could not be recorded: {exc}", exc)
            self._serve_store_model()
            return
        self._end_trial()
        self._emit("update_trial", {"name": trial.name, **verdict.as_json(), "version": trial.version})
        if verdict.passed:
            self._emit("update_committed", {"name": info.name, "version": info.version, "slot": info.slot,
                                            **verdict.figures})
            return
        to = self._serve_store_model()
        self._emit("update_rolled_back", {"name": trial.name, "version": trial.version, "reason": verdict.reason,
                                          "code": verdict.code, "to": to if now is not None else "bundled"})

    def _serve_store_model(self) -> str:
        """Switches the runtime to what the store says serves (a slot, else the bundled model); returns which."""
        active = self._active()
        path = active.dir if active is not None else bundled_model_dir()
        self.source = "store" if active is not None else "bundled"
        which = f"{active.name} v{active.version}" if active is not None else "bundled"
        rt = self.runtime
        if rt is None or os.path.realpath(rt.manifest.root) == os.path.realpath(path):
            return which
        for candidate in dict.fromkeys([path, bundled_model_dir()]):
            try:
                rt.switch_model(load_manifest(candidate))
                return which if candidate == path else "bundled"
            except FieldnodeError as exc:  # the fallback cannot serve: the bundled model is the last resort
                self._trouble(f"cannot switch to the model in {candidate}: {exc}", exc)
        return which

    def _end_trial(self) -> None:
        with self._mu:
            self._trial = self._trial_root = None
        self._retry_at = 0.0
        self._drop_shadow(None)

    # --- installs and rollbacks by command ------------------------------------------------------------

    def rollback(self, reason: str, by: str | None = None) -> dict:
        """Goes back to the previous model now (an operator's decision: the version is marked failed).

        Raises:
            Busy: an install or a model change holds the store. StoreError: nothing is installed.
        """
        if not self._change.acquire(timeout=30):
            raise Busy("a model change is in progress; try again when it is done")
        try:
            trial = self._trial
            before = self.store.active()
            now = self.store.rollback(reason)
            if trial is not None:
                self._end_trial()
            to = self._serve_store_model()
        finally:
            self._change.release()
        data = {"name": before.name if before else None, "version": before.version if before else None,
                "reason": reason, "code": None, "by": by, "to": to if now is not None else "bundled"}
        self._emit("update_rolled_back", data)
        return data

    def check(self, by: str | None = None) -> dict:
        """Starts a repository refresh on its own thread and returns at once; ``update_check`` events follow,
        the last one ``checked`` (with what an install would install) or ``failed`` (with the error's code).

        Raises:
            ConfigError: updates are off. StoreError: ``runtime.model`` overrides the store. Busy: a check or an
                install runs.
        """
        with self._check_start:  # check-and-start, so two checks cannot both start
            self._refuse_if_busy()
            installer = self._installer(progress=None)  # a configuration error is the command's reply
            state = {"state": "started", "by": by, "started_at": self._clock.time()}
            job = Thread(target=self._check, args=(installer, by), name="update-check", daemon=True)
            with self._mu:
                self._check_state, self._check_job = dict(state), job
            self._emit("update_check", state)  # before the thread starts, so the outcome always comes after it
            try:
                job.start()
            except RuntimeError:  # no thread to be had: not busy for ever
                with self._mu:
                    self._check_job = None
                raise
        return {"started": True, "by": by, "events": "update_check"}

    def _check(self, installer, by: str | None) -> None:
        try:
            with installer:
                result = installer.check()
        except Exception as exc:  # noqa: BLE001 - every failure ends in an event, never a dead thread
            if not isinstance(exc, FieldnodeError):
                log.exception("the update check failed")
            state = {"state": "failed", "code": getattr(exc, "code", UpdateError.code), "message": str(exc),
                     "by": by}
        else:
            state = {"state": "checked", **result, "by": by}
        with self._mu:
            self._check_state = dict(state)
        self._emit("update_check", state)

    def start_install(self, version: int | None = None, force: bool = False, by: str | None = None) -> dict:
        """Starts an install on its own thread and returns at once (``update_install`` events follow).

        Raises:
            ConfigError: updates are off. Busy: an install runs or a model is on trial. StoreError: ``runtime.model``
                overrides the store.
        """
        self._refuse_if_busy()
        installer = self._installer(progress=self._progress)
        with self._mu:
            if self._trial is not None:
                raise Busy(f"{self._trial.name} v{self._trial.version} is on trial: wait for its verdict or roll "
                           f"it back")
            self._job_state = {"state": "started", "version": version, "force": force, "by": by}
            self._job = Thread(target=self._install, args=(installer, version, force, by),
                                         name="update-install", daemon=True)
            self._job.start()
        self._emit("update_install", dict(self._job_state))
        return {"started": True, "version": version, "force": force}

    def _refuse_if_busy(self) -> None:
        if self.override:
            raise StoreError(f"runtime.model is set ({self.override}): this board serves the operator's model, not "
                             f"the update store's; clear runtime.model to install updates")
        job = self._job
        if job is not None and job.is_alive():
            raise Busy("an install is already running (see update.status)")
        check = self._check_job
        if check is not None and (check.is_alive() or check.ident is None):  # running, or about to start
            since = (self._check_state or {}).get("started_at")
            raise Busy("an update check is already running" + (f" (started at {since:.0f})" if since else "")
                       + "; its outcome comes as an update_check event (and in update.status)")

    def _installer(self, progress):
        from device.update.install import Installer

        return Installer.from_config(self.cfg, store=self.store, who="agent", defer=self._defer,
                                     progress=progress, clock=self._clock)

    def _defer(self) -> str | None:
        level = self._level()
        return f"the power governor is at {level}" if level in QUIET_LEVELS else None

    def _progress(self, step: str, info: dict) -> None:
        if step == "download" and info.get("bytes") not in (0, info.get("total")):
            return  # a download says when it starts and ends, not at every chunk
        with self._mu:
            if self._job_state is not None:
                self._job_state.update(state="progress", step=step)
        self._emit("update_install", {"state": "progress", "step": step, **info})

    def _install(self, installer, version, force, by) -> None:
        rt = self.runtime
        baseline = rt.latency.percentile_ms(50) if rt is not None else None  # the model before, on this board
        try:
            with installer:
                result = installer.install(version, force=force)
        except Deferred as exc:  # power or heat: started again by tick() once the governor allows it
            self._deferred = (version, by, self._clock.monotonic())
            self._job_done({"state": "deferred", "version": version, "code": exc.code, "message": str(exc),
                            "retry": f"when the governor leaves {'/'.join(sorted(QUIET_LEVELS))}, at most every "
                                     f"{DEFERRED_RETRY_S:g} s"})
            return
        except Exception as exc:  # noqa: BLE001 - every failure ends in an event, never a dead thread
            code = getattr(exc, "code", UpdateError.code)
            if not isinstance(exc, FieldnodeError):
                log.exception("the update install failed")
            self._job_done({"state": "failed", "version": version, "code": code, "message": str(exc)})
            return
        if not result.get("installed"):
            self._job_done({"state": "up_to_date", "name": result.get("name"), "by": by})
            return
        self._job_done({"state": "installed", "name": result["name"], "version": result["version"],
                        "slot": result["slot"], "variants": result.get("variants"), "by": by})
        self.begin_trial(baseline)

    def _retry_deferred(self) -> None:
        deferred = self._deferred
        if deferred is None or self._level() in QUIET_LEVELS:
            return
        version, by, when = deferred
        if self._clock.monotonic() - when < DEFERRED_RETRY_S:
            return
        self._deferred = None
        try:
            self.start_install(version, force=False, by=by)
        except UpdateError as exc:  # busy, or the store is overridden now: said once, not retried
            self._emit("update_install", {"state": "failed", "version": version, "code": exc.code,
                                          "message": str(exc)})

    def _job_done(self, state: dict) -> None:
        with self._mu:
            self._job_state = dict(state)
        self._emit("update_install", state)

    def begin_trial(self, baseline_p50_ms: float | None = None) -> None:
        """Serves the store's active slot (just installed, on trial) and watches it: the switch is a hot swap,
        the trial starts before it so a crash while loading counts."""
        with self._change:
            active = self._active()
            if active is None or active.state != "trial":
                return
            self._arm(active, baseline_p50_ms)
            self.source = "store"
            try:
                manifest = load_manifest(active.dir)
                self.runtime.switch_model(manifest)
            except FieldnodeError as exc:  # the model before keeps serving; the loop's tick rolls back
                self._trial.crashed(f"it cannot serve: {exc}")
            self.started()

    # --- internals ------------------------------------------------------------------------------------

    def _arm(self, active, baseline) -> None:
        trial = Trial(active.version, self.settings, baseline, name=active.name, clock=self._clock)
        with self._mu:
            self._trial, self._trial_root = trial, os.path.realpath(active.dir)
            self._shadow_tried = False

    def _shadow_runtime(self, trial: Trial):
        """The previous model's runtime, started at the first window of a trial (None when it cannot run)."""
        with self._mu:
            if self._shadow is not None or self._shadow_tried or self._trial is not trial:
                return self._shadow
            self._shadow_tried = True
        from device.runtime.runtime import Runtime

        try:
            fb = self.store.fallback()
            manifest = load_manifest(fb.dir if fb is not None else bundled_model_dir())
            primary = self.runtime
            want = primary.variant if primary.variant in manifest.variants else "auto"
            settings = dataclasses.replace(primary.settings, variant=want, threads=primary.status()["threads"])
            rt = Runtime(settings, manifest=manifest, clock=self._clock,
                         on_event=lambda k, d: self._emit(k, dict(d, shadow=True)))
            rt.start()
        except FieldnodeError as exc:
            self._emit("update_shadow", {"state": "unavailable", "reason": str(exc)})
            return None
        if not rt.serving:
            rt.close()
            self._emit("update_shadow", {"state": "unavailable", "reason": "the previous model cannot serve"})
            return None
        with self._mu:
            if self._trial is not trial:  # the verdict came while it started
                rt.close()
                return None
            self._shadow = rt
        self._emit("update_shadow", {"state": "started", "model": manifest.name, "model_version": manifest.version,
                                     "variant": rt.variant})
        return rt

    def _drop_shadow(self, reason: str | None) -> None:
        with self._mu:
            rt, self._shadow = self._shadow, None
        if rt is not None:
            rt.close()
            if reason:
                self._emit("update_shadow", {"state": "stopped", "reason": reason})

    def _active(self):
        try:
            return self.store.active()
        except UpdateError as exc:
            self._trouble(str(exc), exc)
            return None

    def _store_event(self, kind: str, data: dict) -> None:
        self._emit(f"store_{kind}", data)
        if kind == "rolled_back" and self._recovering:  # recovery rolled a trial back (restarts, damage)
            self._emit("update_rolled_back", {**data, "code": HealthGateFailed.code, "by": "recovery"})

    def _trouble(self, message: str, exc: Exception | None = None) -> None:
        self.problem = message
        log.warning("%s", message)
        self._emit("update_problem", {"message": message, "code": getattr(exc, "code", None)})

    # --- status ---------------------------------------------------------------------------------------

    def status(self) -> dict:
        """For the ``status`` and ``update.status`` replies: the store, what serves and why, the trial, the install."""
        with self._mu:
            trial, shadow, job, check = self._trial, self._shadow, self._job_state, self._check_state
        out = {"source": self.source, "override": self.override, "recovery": self.recovery, "problem": self.problem,
               "store": self.store.status(), "trial": trial.status() if trial is not None else None,
               "install": dict(job) if job else None, "check": dict(check) if check else None}
        if out["trial"] is not None:
            out["trial"]["shadow"] = (None if shadow is None else
                                      {"model": shadow.manifest.name, "model_version": shadow.manifest.version})
        return out

    def summary(self) -> dict:
        """For the birth message: the installed versions and whether one is on trial."""
        st = self.store.status()
        return {"source": self.source, "active": st["active"], "fallback": st["fallback"], "floors": st["floors"],
                "on_trial": self._trial is not None}
