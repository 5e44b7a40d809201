"""The agent: sensor -> window -> worker -> result -> spool -> broker, steered by the governor and by commands.

:func:`device.agent.wiring.build` makes the parts from the configuration; :class:`Agent` runs their loops
(:mod:`device.agent.loops`), owns their threads, hands MQTT commands the few operations they need
(:class:`device.agent.commands.Ops`) and answers the local control socket (:mod:`device.control`) and the MQTT
``status`` command from one :meth:`Agent.status`. The parts:

* **sensor**: the serial sensor driver on ``drivers.sensor_url``. Simulation is only ever asked for (``--sim
  PROFILE``, ``drivers.virtual_board``, the demo's board), and then the birth, ``status`` and every result say
  ``"simulated": true``; otherwise an empty ``sensor_url`` is a configuration error naming the key;
* **inference loop** (the caller's thread in :meth:`Agent.run`, :class:`device.agent.loops.Pipeline`): each window
  through the :class:`device.runtime.runtime.Runtime`, each typed :class:`device.results.Result` spooled and
  published on ``results/<model>``, at most once per the plan's ``interval_ms``;
* **power loop** (:class:`device.agent.loops.PowerLoop`): every ``power.step_s`` the governor's plan applied, under
  the one lock an operator's override or variant pin also takes; **telemetry loop**: every plan ``telemetry_s``;
* **link** (when ``link.broker`` is set): :class:`device.link.client.Link` over a durable spool in the state
  directory. The spool and the link come up before the runtime, so a model that cannot serve leaves the board
  reachable, saying why, and a signed ``quarantine.release`` can still reach it;
* **updates**: :class:`device.update.agentside.AgentUpdates` says which model the runtime loads and watches a
  slot on trial (fed from the inference loop, which acts on its verdict);
* **faults** (:class:`device.agent.watch.Faults`): a sensor that cannot be read, a link down past its grace, a
  request late for its worker, and a runtime that cannot serve, each said once (log, event, LED) and in ``status``.

``fieldnode run`` runs it in the foreground as a ``Type=notify`` systemd service: ``READY=1`` once the model is
warm and the link started, ``STATUS=`` lines (with the faults), ``WATCHDOG=1`` only while the inference loop, the
power loop, the sensor (frames, or a reported fault) and the link's network thread all progress, and
``STOPPING=1``. SIGHUP reloads what is safe to reload (:meth:`Agent.reload`). One agent holds a state directory at
a time (:class:`device.agent.statelock.StateLock`).
"""

from __future__ import annotations

import logging
import os
import threading

from device import __version__, config
from device.agent import summary
from device.agent.summary import UpdateState
from device.clock import SYSTEM_CLOCK
from device.errors import ConfigError
from device.results import Result
from device.runtime.errors import DelegateUnavailable
from device.agent.sdnotify import Health, Notifier, describe, start_watchdog
from device.agent.watch import Faults
from device.linux import name_process
from device.threads import Thread, name_threads

log = logging.getLogger("device.agent")  # the agent's own messages

DIAG_COOLDOWN_S = 60.0  # the MQTT diag command runs at most this often
STOP_GRACE_S = 5.0  # how long a stop waits for the inference in flight before it kills the worker

# OS names of the threads the drivers start (the others are named by their Python names, see device.threads).
_DRIVER_THREADS = {"virtual-board": "sim-board"}

# Events after which the retained birth is published again: it says which variant serves, and whether any does.
_BIRTH_CHANGES = frozenset({"serving", "not_serving", "variant_changed", "variant_fallback", "model_changed",
                            "update_trial", "update_committed", "update_rolled_back"})


class Agent:
    """Everything one board runs.

    Args:
        cfg: The validated configuration.
        clock: Time source for the loops, the sensor, the LED and (without a virtual board) the governor.
        board: A virtual board to run on instead of the one ``drivers.virtual_board`` would make (the demo
            passes one whose clock runs faster than real time); its clock paces the governor. A board makes
            the run simulated, and everything it publishes says so.
        on_event: Also called with every event (the demo prints them).
        on_result: Called with every :class:`device.results.Result` (the demo scores them).
        control: Answer ``fieldnode status`` on the local control socket of ``device.runtime_dir`` (the demo, a
            tool beside a running service, does not: the socket is the service's).

    Raises:
        ConfigError: A configuration problem only the agent sees (no sensor and no virtual board, a state
            directory it cannot create, an unreadable password file), naming the key.
        StateDirBusy: Another agent holds the state directory.
    """

    def __init__(self, cfg: config.Config, clock=SYSTEM_CLOCK, *, board=None, on_event=None, on_result=None,
                 control: bool = True):
        from device.agent import wiring
        from device.agent.loops import Pipeline, PowerLoop
        from device.agent.statelock import StateLock

        if board is None:
            config.check_agent(cfg)  # refused before anything is created or opened
        try:
            os.makedirs(cfg.device.state_dir, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the state directory: {exc.strerror or exc}", "device.state_dir",
                              cfg.source) from exc
        self.cfg, self.clock = cfg, clock
        self._lock = StateLock(cfg.device.state_dir).acquire()  # one agent per state directory
        self._stop = threading.Event()
        # Set by SIGHUP's handler, read by the inference thread: a plain flag, since an Event takes a lock, and
        # a handler that takes one nests under a flood of HUPs until the stack overflows.
        self._reload = False
        self._running = threading.Event()  # the inference loop runs (stop() may have to end a hung request)
        self._threads: list[threading.Thread] = []
        self.notifier = self.watchdog = self.control = None  # made by start()
        self.health = Health(clock)
        self._early: list[tuple[str, dict]] = []  # events from before the link exists (a corrupt spool...)
        self.link = self.updates = None
        self.last_trigger: dict | None = None
        self._on_event = on_event
        self._control = control
        self._diag_lock, self._diag_at = threading.Lock(), None  # the MQTT diag command's cool-down
        self.log_args: tuple = (None, False)  # fieldnode run's --log-format and -v, kept over the file on reload
        self._started = False
        self._sensor_frames = -1
        self.update_state = None  # made once the updates are (their events before that change nothing)
        try:
            p = wiring.build(cfg, clock, self, board=board)
        except BaseException:
            self._lock.release()
            raise
        self.parts = p
        self.policy, self.device_id, self.state_dir = p.policy, p.device_id, p.state_dir
        self.board, self.board_clock, self.mcu, self.simulated = p.board, p.board_clock, p.mcu, p.simulated
        self.sensor, self.io, self.accelerators = p.sensor, p.io, p.accelerators
        self.updates, self.runtime, self.reader, self.governor, self.applier = (p.updates, p.runtime, p.reader,
                                                                               p.governor, p.applier)
        self.update_state = UpdateState(self.updates.status().get("store"),
                                        os.path.join(p.state_dir, "update-summary.json"))
        self.spool, self.link, self.dispatcher, self.trust = p.spool, p.link, p.dispatcher, p.trust
        self.groups = p.groups
        self.groups.on_change(lambda groups: self.event("groups_changed", {"groups": list(groups),
                                                                          "source": self.groups.source}))
        self.faults = Faults(self.event, clock=clock)  # sensor, link and worker; said once, and when they clear
        self.last_reload: dict | None = None  # the last SIGHUP's result, for status
        for kind, data in self._early if self.link is not None else ():
            self.link.publish_event(kind, data)
        self._early = []
        speed = getattr(self.board_clock, "factor", 1.0)
        self.power = PowerLoop(self.governor, self.applier, step_s=self.policy.step_s, speed=speed, board=self.board,
                               runtime=self.runtime, on_step=self._after_step,
                               beat=lambda: self.health.beat("governor"), planner_for=p.planner_for)
        self.pipeline = Pipeline(self.sensor, self.runtime, self.updates, self.power, clock=clock,
                                 simulated=self.simulated,
                                 publish=self.link.publish_result if self.link is not None else None,
                                 on_result=on_result, beat=lambda: self.health.beat("loop"))
        self.governor.read_work = self.pipeline.work  # what each operating point delivers, for the planner

    # ------------------------------------------------------------------------------ what parts call

    def birth(self) -> dict:
        """The retained ``online`` state's fields besides ``state``, ``device``, ``session`` and ``time`` (the
        link's): what serves, and the fleet summary (:mod:`device.agent.summary`)."""
        st = self.runtime.status()
        m = self.runtime.manifest
        update = {**self.updates.summary(), **self.update_state.summary()}
        return {"version": __version__, "boot_id": _boot_id(),
                "models": {m.name: {"version": m.version, "variants": list(m.variants)}},
                "variant": st["variant"], "backend": st["backend"], "backend_version": st["backend_version"],
                "delegate": st["delegate"], "serving": self.serving, "level": self.governor.level.label,
                "faults": summary.faults(self._faults()), "groups": list(self.groups.current),
                "accelerators": self.accelerators.kinds(), "update": update, **self._simulation()}

    def event(self, kind: str, data: dict) -> None:
        """Every event of every part: logged, and published on ``events`` when there is a link."""
        log.debug("event %s: %s", kind, data)  # the part that emitted it said it already, once
        if self.updates is not None:
            self.updates.on_event(kind, data)  # a fault of a model on trial fails its trial
        rebirth = self.update_state is not None and self.update_state.on_event(kind, data)
        if (rebirth or kind in _BIRTH_CHANGES or summary.republish_on(kind)) and self.link is not None:
            self.link.refresh_birth()  # the retained state says which variant serves, and whether any does
        if self._on_event is not None:
            self._on_event(kind, data)
        if self.link is None:
            if self.cfg.link.broker and len(self._early) < 100:
                self._early.append((kind, data))
        else:
            try:
                self.link.publish_event(kind, data)
            except Exception:  # a closed spool during shutdown
                log.debug("event %s not spooled", kind, exc_info=True)

    def on_trigger(self, stamp: float) -> None:
        """The wake/trigger input fired (a PIR, a button): classify the latest window now."""
        window = self.sensor.latest_window(max_age_s=5.0)
        result = self.infer_once(window) if window is not None else None
        self.last_trigger = {"at": stamp, "result": None if result is None else result.to_dict()}
        self.event("trigger", {"at": stamp, "result_id": None if result is None else result.id,
                               "label": None if result is None else result.label})

    def command_ops(self):
        """The operations MQTT commands may call (:class:`device.agent.commands.Ops`)."""
        from device.agent.commands import Ops

        def pin_variant(name, by):
            applied = self.power.pin(name)
            self.event("variant_set", {"variant": name or "auto", "by": by})
            return {"variant": self.runtime.variant, "pinned": self.applier.pinned_variant,
                    "applied": applied.to_dict()}

        # Late-bound: the link (and so this registry) is built before the loops exist.
        return Ops(clock=self.clock, status=lambda: self.status(),
                   latest_window=lambda age: self.sensor.latest_window(max_age_s=age),
                   sensor_state=lambda: self.sensor.health().state.value, infer=lambda w: self.infer_once(w),
                   config=lambda: self.cfg.to_dict(), variants=lambda: list(self.runtime.manifest.variants),
                   pin_variant=pin_variant, set_level=lambda *a: self.power.override(*a),
                   set_target=lambda hours, by: self.power.set_target(hours, by),
                   release_quarantine=lambda sha, by: self.runtime.release_quarantine(sha, by=by),
                   quarantined=lambda: self.runtime.status()["quarantined"], updates=_Late(lambda: self.updates),
                   diag=lambda: self.diag(), groups=_Late(lambda: self.groups))

    # ------------------------------------------------------------------------------------------ status

    def _simulation(self) -> dict:
        """How a board says whether it is simulated: in the birth message, ``status`` and every result."""
        return {"simulated": self.simulated, "virtual_board": self.board.profile.name if self.simulated else None}

    @property
    def serving(self) -> bool:
        """The runtime can classify windows (it started, and some variant is healthy)."""
        return self._started and self.runtime.serving

    @property
    def results(self) -> int:
        return self.pipeline.results

    @property
    def failures(self) -> int:
        return self.pipeline.failures

    @property
    def last_result(self) -> Result | None:
        return self.pipeline.last_result

    def _runtime_problem(self) -> str | None:
        """Why the runtime does not serve once started (its own ``not_serving`` / ``serving`` events say when)."""
        if not self._started or self.runtime.serving:
            return None
        return self.runtime.status().get("not_serving_reason") or "no variant can serve"

    def status(self) -> dict:
        """What the agent is doing: the MQTT ``status`` command and ``fieldnode status`` both answer with it."""
        last = self.last_result
        return {"device": self.device_id, "version": __version__, "pid": os.getpid(), **self._simulation(),
                "results": self.results, "failures": self.failures, "serving": self.serving,
                "faults": self._faults(), "last_result": None if last is None else last.to_dict(),
                "runtime": self.runtime.status(),
                "governor": self.power.status(),
                "sensor": self.sensor.health().to_dict(),
                "link": self.link.status() if self.link is not None else None,
                "spool": self.spool.stats() if self.spool is not None else None,
                "trust_problems": self.trust.problems if self.trust is not None else None,
                "hardware": self.io.describe(), "accelerators": self.accelerators.summary(),
                "update": {**self.updates.status(), "summary": self.update_state.summary()},
                "groups": self.groups.status(), "config": self._config_status()}

    def _faults(self) -> dict:
        """What is wrong now, by part (:meth:`device.agent.watch.Faults.by_part`)."""
        return self.faults.by_part(self._runtime_problem())

    def _config_status(self) -> dict:
        """The config in force: its file, and since a reload (SIGHUP) the changed keys that wait for a restart
        and the reload's error (a file that did not load changed nothing)."""
        r = self.last_reload or {}
        return {"source": self.cfg.source, "needs_restart": r.get("needs_restart", []),
                "reload_error": r.get("error"), "reloaded_at": r.get("at")}

    def telemetry(self) -> dict:
        snap = self.governor.snapshot
        h = self.sensor.health()
        return {"power": snap.to_dict() if snap is not None else None,
                "governor": {"level": self.governor.level.label, "reason": self.governor.reason,
                             "plan": self.governor.plan.to_dict()},
                "latency": self.runtime.latency.summary(), "results": self.results, "failures": self.failures,
                "sensor": {"state": h.state.value, "frames": h.frames, "crc_errors": h.crc_errors,
                           "dropped_frames": h.dropped_frames, "timeouts": h.timeouts},
                "spool": ({k: self.spool.stats()[k] for k in ("messages", "bytes", "dropped")}
                          if self.spool is not None else None)}

    def diag(self) -> dict:
        """``fieldnode diag``'s checks from inside the agent (the MQTT ``diag`` command): one at a time, at most
        once per :data:`DIAG_COOLDOWN_S` (it starts model workers and holds the command thread for seconds: anyone
        who may publish commands must not keep a battery board busy with it).

        Raises:
            TooSoon: Asked again within the cool-down, or while one runs.
        """
        from device.link.errors import TooSoon
        from device.diag.runner import diagnose

        now = self.clock.monotonic()
        with self._diag_lock:
            wait = self._diag_at + DIAG_COOLDOWN_S - now if self._diag_at is not None else 0.0
            if wait > 0:
                raise TooSoon(f"diag ran {DIAG_COOLDOWN_S - wait:.0f} s ago; it runs at most once a minute: "
                              f"ask again in {wait:.0f} s")
            self._diag_at = now
        return diagnose(self.cfg, agent_status=self.status())  # what the agent holds is read, not opened again

    # -------------------------------------------------------------------------------------------- loops

    def infer_once(self, window) -> Result:
        """Classifies one window; spools and returns the result."""
        return self.pipeline.infer_once(window)

    def _update_led(self) -> None:
        from power.policy import Level

        self.io.update(started=self._started,
                       broker_ok=None if self.link is None else not self.faults.link.active,
                       sensor_ok=not self.faults.sensor.active,
                       runtime_ok=self._runtime_problem() is None and not self.faults.worker.active,
                       critical=self.governor.level == Level.CRITICAL)

    def _watch(self) -> None:
        """Brings a fault of the sensor, the link or the worker to the log, the events and the LED, and the
        runtime's state to the LED (the runtime says itself when it stops and starts serving). The sensor is healthy
        for the watchdog while frames arrive or its fault is reported."""
        h = self.sensor.health()
        self.faults.check_sensor(h, self.sensor.url)
        if h.frames != self._sensor_frames or self.faults.sensor.active:
            self.health.beat("sensor")
        self._sensor_frames = h.frames
        self.faults.check_link(self.link.status() if self.link is not None else None)
        self.faults.check_worker(self.pipeline.waited_s(), deadline_s=self.runtime.settings.deadline_ms / 1000.0,
                                 pid=self.runtime.worker_pid, isolation=self.runtime.settings.isolation)
        self._update_led()

    def _after_step(self) -> None:
        # The fault watch runs on its own thread (_watch_loop): here only the STATUS= line follows the step.
        faults = self._faults()  # systemctl status shows them too: the agent runs, and something is wrong
        self.notifier.status_if_changed(describe(self.runtime.status(), self.cfg.link.broker, self.simulated,
                                                 self.governor.level.label)
                                        + (f"; FAULTS: {', '.join(faults)}" if faults else ""))

    def _every_second(self) -> None:
        if self._reload:
            self._reload = False  # HUPs that came since are one reload: this one reads the file as it is now
            self.reload()

    def _watch_loop(self) -> None:
        """The fault watch once a second on a thread of its own: a hung request can hold up both loops (a hot swap
        waits for it), and the LED must still say so."""
        while not self._stop.wait(1.0):
            try:
                self._watch()
            except Exception:  # the watch (LED, GPIO) must never take the agent down
                log.exception("the fault watch failed")

    def _telemetry(self) -> None:
        while not self._stop.wait(self.governor.plan.telemetry_s):
            if self.link is not None:
                try:
                    self.link.publish_telemetry(self.telemetry())
                except Exception:
                    log.exception("telemetry failed")

    # ------------------------------------------------------------------------------------------- reload

    def request_reload(self) -> None:
        """Asks for :meth:`reload` on the inference thread (safe from a signal handler: it only sets a flag, and
        any number of requests before the next turn are one reload)."""
        self._reload = True

    def reload(self) -> dict:
        """Reads the config file again and applies what is safe to change on a running agent
        (:func:`device.agent.reload.reload`): ``{"applied": [...], "needs_restart": [...]}`` or ``{"error": ...}``."""
        from device.agent.reload import reload

        out = reload(self)
        if "error" in out:  # nothing changed: the keys that waited for a restart still do
            self.last_reload = {**(self.last_reload or {}), "error": out["error"], "at": self.clock.time()}
        else:
            self.last_reload = {**out, "at": self.clock.time()}
        return out

    # ---------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Starts everything but the inference loop (which :meth:`run` runs on the caller's thread).

        The spool and the link come first, so whatever happens to the model the board stays reachable and its
        events are spooled. A runtime that cannot start at all (a requested delegate that is missing) is a
        runtime fault, not the end of the agent.
        """
        self.notifier = Notifier()
        if self._control:  # first: an agent refused here (another answers) must not touch the broker's state
            self._start_control()
        if self.spool is not None:
            self.spool.start()
        if self.link is not None:
            self.link.start()
        if self.board is not None:
            speed = getattr(self.board_clock, "factor", 1.0)
            self.board.start(period_s=max(0.005, min(0.05, 1.0 / speed)))  # about one board second a step
        self.io.start()
        try:
            self.runtime.start()
        except DelegateUnavailable:
            pass  # the runtime is down with the reason (its not_serving event) and retries by itself
        self._started = True
        self.updates.started()
        if self.link is not None:
            self.link.refresh_birth()  # the first birth went out before the model had loaded
        self._watch()
        if self.mcu is not None:
            self.mcu.start()
        self.sensor.start()
        for target, name in ((lambda: self.power.run(self._stop), "governor"), (self._telemetry, "telemetry"),
                             (self._watch_loop, "fault-watch")):
            t = Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        name_threads(_DRIVER_THREADS)  # the drivers' threads (sensor, LED, trigger, the simulation's) by name too
        self._notify_ready()

    def _start_control(self) -> None:
        """The local control socket (``fieldnode status``); a board runs without it when its directory cannot
        be made (a terminal run as a user), saying so once."""
        from device.agent.commands import build_registry
        from device.agent.controlserver import ControlServer
        from device.control import ControlBusy, ControlSocketError, socket_path

        path = socket_path(self.cfg)
        # The MQTT dispatcher's registry (its local commands only); a board without a broker builds the same one.
        registry = self.dispatcher.registry if self.dispatcher is not None else build_registry(self.command_ops())
        try:
            self.control = ControlServer(path, registry)
            self.control.start()
        except ControlBusy as exc:
            raise ConfigError(f"{exc}: another agent uses this runtime directory", "device.runtime_dir",
                              self.cfg.source) from exc
        except (ControlSocketError, OSError) as exc:
            self.control = None
            log.warning("no local control socket, so fieldnode status will not reach this agent: %s (set "
                        "device.runtime_dir to a directory it may write)", getattr(exc, "strerror", None) or exc)

    def _notify_ready(self) -> None:
        """``READY=1`` with a readable status, and the watchdog (when systemd gave one) from now on."""
        speed = getattr(self.board_clock, "factor", 1.0)
        # The loop turns at least every 0.5 s (its sensor poll); the governor every step (on the board's time).
        self.health.require("loop", lambda: 3 * 0.5 + self.governor.plan.interval_ms / 1000.0)
        self.health.require("governor", lambda: max(1.0, 3 * self.power.step_s / speed))
        # The sensor delivers frames, or its fault is reported (the watch runs every second and every step).
        self.health.require("sensor", max(10.0, 3 * self.cfg.drivers.sensor_timeout_s))
        self.health.beat("sensor")
        if self.link is not None:  # the network thread turns at least once per backoff wait (its jitter is at
            # most half of it on top) or connect attempt (paho's socket timeout is 5 s, then the TLS handshake)
            self.health.require("link", max(10.0, 1.5 * self.cfg.link.backoff_max_s + 10.0))
            self.link.on_turn = lambda: self.health.beat("link")
            self.health.beat("link")
        self.health.beat("loop")  # about to start on the caller's thread
        self.notifier.ready(describe(self.runtime.status(), self.cfg.link.broker, self.simulated,
                                     self.governor.level.label))
        self.watchdog = start_watchdog(self.notifier, self.health)

    def run(self, seconds: float | None = None) -> int:
        """Runs the inference loop until :meth:`stop` (or ``seconds``).

        Returns:
            0, or 1 when a run of limited ``seconds`` ends with a fault (:meth:`status`'s ``faults``: a
            technician's ``fieldnode run --seconds 60`` on a board whose sensor is not wired fails).
        """
        faults: list[str] = []
        # On the main thread this is the process's name as ps shows it, whatever started Python; elsewhere (the
        # demo, tests) the thread that runs the inference loop says so in top -H.
        name_process(b"fieldnode" if threading.current_thread() is threading.main_thread() else b"inference")
        try:
            self.start()
            deadline = None if seconds is None else self.clock.monotonic() + seconds
            self._running.set()
            try:
                self.pipeline.run(self._stop, deadline, every_second=self._every_second)
            finally:
                self._running.clear()
            if seconds is not None and self._started:
                self._watch()
                faults = [f"{part}: {f['problem']}" for part, f in self._faults().items()]
        finally:
            self.close()
        if faults:
            log.error("fieldnode run ended with faults: %s", "; ".join(faults))
            return 1
        return 0

    def stop(self) -> None:
        """Ends :meth:`run` (safe from a signal handler). An inference in flight may finish for
        :data:`STOP_GRACE_S`; one still hung then (a worker that never answers, with a long
        ``runtime.deadline_ms``) is given up by killing its worker, so a ``systemctl stop`` drains well within
        ``TimeoutStopSec`` instead of ending in systemd's SIGKILL."""
        if self._stop.is_set():
            return
        if self.watchdog is not None:
            self.watchdog.halt()  # no ping once stopping, and STOPPING=1 first, even while an inference hangs
        if self.notifier is not None:
            self.notifier.stopping()
        self._stop.set()
        if self._running.is_set():
            t = threading.Timer(STOP_GRACE_S, self._give_up_inference)
            t.daemon = True
            t.start()

    def _give_up_inference(self) -> None:
        if not self._running.is_set():
            return  # the loop ended by itself
        pid = self.runtime.worker_pid
        if pid is None:
            return
        log.warning("stopping: the inference in flight did not end within %g s; killing its worker (pid %d)",
                    STOP_GRACE_S, pid)
        self.runtime.abort()  # not counted against the model: a stop is not a crash

    def close(self) -> None:
        """Stops every thread; the link publishes ``offline``; the spool commits what it holds. Each part is
        closed even when one before it fails (a spool that cannot flush on a full disk still lets the worker,
        the GPIO lines and the state directory go)."""
        if self.notifier is not None:
            self.notifier.stopping()
        if self.watchdog is not None:
            self.watchdog.stop()
        self._stop.set()
        try:
            if self.control is not None:
                self.control, control = None, self.control
                _quietly(control.close, "the control socket")
            for t in self._threads:
                t.join(10)
            self._threads = []
            _quietly(self.sensor.stop, "the sensor")
            if self.mcu is not None:
                _quietly(self.mcu.close, "the simulated sensor MCU")
            log.info("stopping: the link says offline and the spool commits what it holds")
            if self.link is not None:
                _quietly(self.link.stop, "the link")
            if self.spool is not None:
                _quietly(self.spool.close, "the spool")
                kept = self.spool.stats()
                log.info("stopped: %d message(s) kept in the spool for the next start%s", kept["messages"],
                         f", {kept['pending']} not committed" if kept["pending"] else "")
            _quietly(self.updates.close, "the updates")
            _quietly(self.runtime.close, "the runtime")
            _quietly(self.io.close, "the GPIO lines")
            if self.board is not None:
                _quietly(self.board.stop, "the virtual board")
        finally:
            self._lock.release()


def _quietly(close, what: str) -> None:
    try:
        close()
    except Exception:
        log.exception("closing %s failed", what)


class _Late:
    """An attribute proxy to an object made later (the updates, reached by commands built before them)."""

    def __init__(self, get):
        self._get = get

    def __getattr__(self, name):
        return getattr(self._get(), name)


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None
