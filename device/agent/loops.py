"""The agent's loops: the inference pipeline and the power loop.

* :class:`PowerLoop` owns the governor and the plan applier. A governor step, an operator's level override and
  a variant pin each change the plan and apply it under **one** lock, so a command and the governor never
  apply plans at the same time, and the plan in force is always the governor's latest.
* :class:`Pipeline` is the inference loop: sensor window -> runtime -> typed :class:`device.results.Result` ->
  spool, at most once per the plan's ``interval_ms`` (between two it sleeps until the next is due, at most a
  second, instead of waking for every window); it feeds the update trial's health gate and beats the watchdog's
  ``loop`` part at every turn.

Both are built by :mod:`device.agent.wiring` and run by :class:`device.agent.agent.Agent`; neither knows the agent.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Callable

from device.results import Applied, Result
from power.planner import Work

log = logging.getLogger(__name__)


class PowerLoop:
    """The governor and the applier behind one lock.

    Args:
        governor: The :class:`power.governor.Governor`.
        applier: The :class:`device.agent.applier.PlanApplier`.
        step_s: Board seconds between governor steps (``power.step_s``).
        speed: How many board seconds pass per real second (a virtual board may run faster).
        board: A virtual board whose simulated workload follows the plan, or None.
        runtime: The runtime (for the variant's cost on a virtual board), or None.
        on_step: Called after every step, outside the lock (the agent's fault watch and ``STATUS=``).
        beat: Called at every turn of the loop (the watchdog's ``governor`` part).
    """

    def __init__(self, governor, applier, *, step_s: float, speed: float = 1.0, board=None, runtime=None,
                 on_step: Callable[[], None] | None = None, beat: Callable[[], None] | None = None,
                 planner_for: Callable | None = None):
        self.governor, self.applier = governor, applier
        self.planner_for = planner_for
        self._planned_for = runtime.manifest if runtime is not None and planner_for is not None else None
        self.step_s, self.speed = step_s, speed
        self.board, self.runtime = board, runtime
        self.on_step, self.beat = on_step, beat
        self._lock = threading.RLock()  # one plan change at a time, from any thread

    @property
    def plan(self):
        return self.governor.plan

    @property
    def level(self):
        return self.governor.level

    def status(self) -> dict:
        """The governor's status with the variant pin (``pinned_variant``, None when the plan decides)."""
        with self._lock:
            return {**self.governor.status(), "pinned_variant": self.applier.pinned_variant}

    def step(self) -> Applied:
        """One governor step and its plan applied; a virtual board's load follows."""
        with self._lock:
            self._follow_model()
            self.governor.step()
            applied = self.applier.apply(self.governor.plan)
            if self.board is not None:
                self._load_board(self.governor.plan, applied)
        return applied

    def override(self, level: str, ttl_s: float, by: str) -> dict:
        """Forces ``level`` for ``ttl_s`` seconds (``auto`` ends an override) and applies the plan.

        Raises:
            ValueError: An unknown level or a TTL out of range (the governor's message).
        """
        with self._lock:
            if level == "auto":
                self.governor.clear_override(by=by)
            else:
                self.governor.override(level, ttl_s, by=by)
            self.applier.apply(self.governor.plan)
            return self.governor.status()

    def _follow_model(self) -> None:
        """A new model (an update committed or rolled back): the planner starts again on its variants, since what
        the old one's points cost says nothing of the new one's."""
        if self.planner_for is None or self.runtime is None:
            return
        manifest = self.runtime.manifest
        if manifest is not self._planned_for:
            self._planned_for = manifest
            self.governor.use_planner(self.planner_for(manifest))

    def set_target(self, hours: float, by: str) -> dict:
        """Sets the governor's runtime target (0 clears it) and applies the plan.

        Raises:
            ValueError: Hours the governor refuses.
        """
        with self._lock:
            self.governor.set_target(hours or None, by=by)
            self.applier.apply(self.governor.plan)
            return self.governor.status()

    def pin(self, variant: str | None) -> Applied:
        """Pins a variant (None: the plan decides again) and applies the plan, in one step."""
        with self._lock:
            return self.applier.pin(variant, self.governor.plan)

    def set_policy(self, policy) -> None:
        """A reloaded ``[power]`` policy: the next step decides by it (the level in force is kept)."""
        with self._lock:
            self.governor.policy = policy
            self.step_s = policy.step_s

    def run(self, stop: threading.Event) -> None:
        """Steps every ``step_s`` board seconds until ``stop``; a failing step is logged, never fatal."""
        while not stop.is_set():
            if self.beat is not None:
                self.beat()
            try:
                self.step()
                if self.on_step is not None:
                    self.on_step()
            except Exception:  # the governor must never take the agent down
                log.exception("governor step failed")
            stop.wait(self.step_s / self.speed)

    def _load_board(self, plan, applied: Applied) -> None:
        """A virtual board's simulated workload follows the plan: the board's physics need a load heavier than
        one small model to react to (threads up to the board's cores, the variant's cost, the duty cycle)."""
        m = self.runtime.manifest if self.runtime is not None else None
        variant = m.variants.get(applied.variant or m.default_variant) if m is not None else None
        cores = self.board.profile.cpus if plan.threads >= (os.cpu_count() or 1) else plan.threads
        self.board.set_demand(cores, variant.cost if variant else 1.0, plan.interval_ms / 1000.0)


class Pipeline:
    """The inference loop: windows in, typed results out.

    Args:
        sensor: The :class:`drivers.sensor.SerialSensor`.
        runtime: The :class:`device.runtime.runtime.Runtime`.
        updates: The :class:`device.update.agentside.AgentUpdates` (its trial observes results and its verdict is
            acted on here).
        power: The :class:`PowerLoop` (its plan's interval paces inference).
        clock: Time source.
        simulated: Whether the windows come from a simulated sensor (every result says so).
        publish: ``publish(model, result_dict) -> id`` (the link), or None without a link.
        on_result: Called with every :class:`Result` (the demo scores them).
        beat: Called at every turn (the watchdog's ``loop`` part): a hung read or worker stops the pings.
    """

    POLL_S = 0.5  # the longest one turn waits for a window
    IDLE_S = 1.0  # the longest one turn sleeps before a planned inference (its other duties come once a second)

    def __init__(self, sensor, runtime, updates, power: PowerLoop, *, clock, simulated: bool,
                 publish: Callable[[str, dict], int] | None = None, on_result: Callable[[Result], None] | None = None,
                 beat: Callable[[], None] | None = None):
        self.sensor, self.runtime, self.updates, self.power = sensor, runtime, updates, power
        self.clock, self.simulated = clock, simulated
        self.publish, self.on_result, self.beat = publish, on_result, beat
        self.results = 0
        self.busy_s = 0.0  # inference time spent on the results, for the governor's cost per window
        self.failures = 0
        self.last_result: Result | None = None
        self._in_flight: dict[int, float] = {}  # request number -> when it started (monotonic)
        self._flights = 0
        self._flight_lock = threading.Lock()  # the loop, a trigger and the MQTT infer command all infer

    def waited_s(self) -> float | None:
        """How long the request in flight longest has waited for its answer; None when none is in flight (the
        agent's fault watch: a late request is a hung worker)."""
        with self._flight_lock:
            oldest = min(self._in_flight.values(), default=None)
        return None if oldest is None else max(0.0, self.clock.monotonic() - oldest)

    def infer_once(self, window) -> Result:
        """Classifies one window; publishes (spools) and returns the result.

        Raises:
            NotServing: No variant can serve.
            FieldnodeError: The model failed on this window.
        """
        t0 = self.clock.monotonic()
        with self._flight_lock:
            self._flights += 1
            n = self._flights
            self._in_flight[n] = t0
        try:
            p = self.runtime.predict(window)
        finally:
            with self._flight_lock:
                del self._in_flight[n]
        m = p.model or self.runtime.manifest  # the model that answered, even if a switch came since
        result = Result(model=m.name, variant=p.variant, label=p.label, score=round(float(p.score), 5),
                        scores={lab: round(float(s), 5) for lab, s in zip(m.labels, p.scores)},
                        latency_ms=round((self.clock.monotonic() - t0) * 1000.0, 3), time=self.clock.time(),
                        simulated=self.simulated)
        if self.publish is not None:
            result = dataclasses.replace(result, id=self.publish(m.name, result.to_dict()))
        self.results += 1
        self.busy_s += result.latency_ms / 1000.0
        self.last_result = result
        if self.on_result is not None:
            self.on_result(result)
        try:
            self.updates.observe(window, p)  # after publishing: the shadow's time never delays a result
        except Exception:  # the health gate must never take a result down with it
            log.exception("the update trial could not observe a result")
        return result

    def _next_window(self, stop: threading.Event, last: float):
        """The window for this turn. Between planned inferences (``interval_ms``) the loop sleeps until the next
        one is due instead of taking every window as it comes; then it takes the newest waiting (the ones before
        it are skipped, as the duty cycle always skipped them). None when nothing is due yet."""
        interval = self.power.plan.interval_ms / 1000.0
        if interval and last and self.runtime.serving:
            wait = last + interval - self.clock.monotonic()
            if wait > 0:
                stop.wait(min(wait, self.IDLE_S))
                if last + interval > self.clock.monotonic():
                    return None
            newest = None
            while (window := self.sensor.next_window(timeout=0)) is not None:
                newest = window
            if newest is not None:
                return newest
        return self.sensor.next_window(timeout=self.POLL_S)

    def work(self) -> Work:
        """The governor's work counters: windows classified, windows the sensor dropped because the loop did not
        take them in time (not those a duty cycle skips on purpose), and the inference time spent."""
        return Work(done=float(self.results), late=float(self.sensor.health().windows_overflowed), busy_s=self.busy_s)

    def run(self, stop: threading.Event, deadline: float | None = None,
            every_second: Callable[[], None] | None = None) -> None:
        """Runs until ``stop`` is set or the monotonic ``deadline`` passes.

        Args:
            stop: Ends the loop.
            deadline: A monotonic time to stop at, or None.
            every_second: Called about once a second on this thread (the agent's fault watch, a pending reload).
        """
        from device.runtime.errors import NotServing, RuntimeClosed

        last = ticked = 0.0
        while not stop.is_set() and (deadline is None or self.clock.monotonic() < deadline):
            window = self._next_window(stop, last)
            if self.beat is not None:
                self.beat()  # progress (a hung read, worker or update stops the watchdog pings)
            now = self.clock.monotonic()
            if every_second is not None and now - ticked >= 1.0:
                ticked = now
                try:
                    every_second()
                except Exception:  # the watch (LED, GPIO) must never take the agent down
                    log.exception("the agent's periodic check failed")
            try:
                self.updates.tick()  # a trial's verdict: commit, or roll back (serving or not)
            except Exception:
                log.exception("the update trial's verdict could not be applied")
            if not self.runtime.serving:
                self.runtime.retry_if_due()  # paced by runtime.not_serving_retry_s: a plugged-in TPU...
                continue
            if window is None:
                continue
            interval = self.power.plan.interval_ms / 1000.0
            if interval and now - last < interval:
                continue  # duty cycle: skip windows between planned inferences
            last = now
            try:
                self.infer_once(window)
            except NotServing:
                pass  # no variant can serve: a runtime fault (watched), not one failure per window
            except RuntimeClosed:
                if stop.is_set():
                    break  # the agent is stopping and gave up the inference in flight
                self.failures += 1
                log.warning("inference failed: the runtime is closed")
            except Exception as exc:  # a model fault is an event, never the end of the agent
                self.failures += 1
                log.warning("inference failed: %s", exc)
