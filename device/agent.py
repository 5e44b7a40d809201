"""The agent: sensor -> window -> worker -> result -> spool -> broker, steered by the governor and by commands.

:class:`Agent` wires the parts built elsewhere and owns their threads:

* **sensor**: the serial sensor driver on ``drivers.sensor_url``. Simulation is only ever asked for: on a
  virtual board (``fieldnode run --sim PROFILE``, ``drivers.virtual_board``, or the demo's board) a simulated
  sensor MCU on a pseudo-terminal feeds the same driver, and the birth message, ``status`` and every result say
  ``"simulated": true``; otherwise an empty ``sensor_url`` is a configuration error naming the key. A sensor
  that cannot be opened or goes silent is a warning, a ``sensor_fault`` event and the LED's sensor-fault code
  (:class:`device.watch.FaultWatch`);
* **inference loop** (the caller's thread in :meth:`Agent.run`): each window goes through the
  :class:`device.runtime.runtime.Runtime`; each result is spooled and published on ``results/<model>``,
  at most once per the plan's ``interval_ms``;
* **governor loop**: every ``power.step_s`` the governor reads the board and the plan is applied
  (:class:`device.applier.PlanApplier`); level changes are events;
* **telemetry loop**: every plan ``telemetry_s``, a power, thermal, governor and latency summary;
* **link** (when ``link.broker`` is set): :class:`device.link.client.Link` over a durable
  :class:`device.link.spool.Spool` in the state directory, with the command registry of
  :mod:`device.agent_commands`. The spool and the link come up before the runtime, so a model that cannot
  serve (every variant crashing or quarantined, a requested delegate missing) leaves the board reachable and
  saying why (``runtime_fault`` event, ``status``), and a signed ``quarantine.release`` can still reach it;
* **updates**: :class:`device.update.agentside.AgentUpdates` recovers the A/B store of the state directory and
  says which model the runtime loads (the active slot, else the bundled model; ``runtime.model`` overrides
  both). A slot on trial is watched by the health gate, fed from the inference loop, which also acts on its
  verdict (commit, or roll back and switch the runtime back); installs run on their own thread.

``fieldnode run`` runs it in the foreground until SIGTERM or SIGINT; the daemon issue adds sd_notify and the
watchdog around the same object.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from device import __version__, config
from device.clock import SYSTEM_CLOCK
from device.errors import ConfigError
from device.runtime.errors import DelegateUnavailable
from device.sdnotify import Health, Notifier, describe, start_watchdog
from device.watch import FaultWatch

log = logging.getLogger(__name__)

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

    Raises:
        ConfigError: A configuration problem only the agent sees (no sensor and no virtual board, a state
            directory it cannot create, an unreadable password file), naming the key.
        on_event: Also called with every event (the demo prints them).
        on_result: Called with every result (the demo scores them against the simulated truth).
    """

    def __init__(self, cfg: config.Config, clock=SYSTEM_CLOCK, *, board=None, on_event=None, on_result=None):
        from device.applier import PlanApplier
        from device.hardware import BoardIO
        from device.runtime.runtime import Runtime, RuntimeSettings
        from device.update.agentside import AgentUpdates
        from drivers.accel import discover
        from drivers.cpufreq import CpuFreq
        from drivers.sensor import SerialSensor
        from drivers.sysfs import Sysfs, resolve_root
        from power.governor import Governor
        from power.policy import Policy
        from power.snapshot import BoardReader

        self.cfg = cfg
        self.clock = clock
        self.policy = Policy.from_config(cfg.power)  # cross-key checks first, before anything is opened
        self.device_id = config.device_id(cfg)
        self.state_dir = cfg.device.state_dir
        if board is None:
            config.check_agent(cfg)  # refused before anything is created or opened
        try:
            os.makedirs(self.state_dir, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the state directory: {exc.strerror or exc}", "device.state_dir",
                              cfg.source) from exc
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.notifier = self.watchdog = None  # sd_notify and the watchdog: made by start()
        self._early: list[tuple[str, dict]] = []  # events from before the link exists (a corrupt spool...)
        self.link = self.updates = None
        self.results = 0
        self.failures = 0
        self.last_result: dict | None = None
        self.last_trigger: dict | None = None
        self._on_event, self._on_result = on_event, on_result
        self.board, self.mcu = board, None
        d = cfg.drivers
        if self.board is None and d.virtual_board:
            from drivers.sim.board import VirtualBoard

            self.board = VirtualBoard(os.path.join(self.state_dir, "board"), d.virtual_board, ambient_c=25.0)
        self.simulated = self.board is not None
        fs = self.board.fs if self.board is not None else Sysfs(resolve_root(d.sysfs_root))
        # The governor runs on the board's time (a virtual board's clock may run faster than real time).
        self.board_clock = self.board.clock if self.board is not None else clock
        url = d.sensor_url
        if self.simulated:
            from drivers.sim.mcu import SimulatedMcu
            from drivers.sim.signal import VibrationSource, schedule

            log.warning("simulated board %s: the sensor, sysfs and battery are simulated, and every result "
                        "says so", self.board.profile.name)
            source = VibrationSource(seed=7)  # the simulated machine changes state every 6-12 s
            source.follow(schedule(7, 86400.0, segment_s=(6.0, 12.0)))
            link_dir = os.path.join(self.state_dir, "board")
            os.makedirs(link_dir, exist_ok=True)
            self.mcu = SimulatedMcu(source, link_dir=link_dir)
            url = self.mcu.port
        self.sensor = SerialSensor(url, baudrate=d.sensor_baudrate, read_timeout_s=d.sensor_timeout_s, clock=clock)
        self.sensor_watch = FaultWatch("sensor", self.event, clock=clock)
        try:
            self.io = BoardIO(d, on_trigger=self._on_trigger, clock=clock)
        except Exception:
            if self.mcu is not None:
                self.mcu.close()
            raise
        self.accelerators = discover(fs)
        self._started = False
        self.updates = AgentUpdates(cfg, self.event, lambda: self.governor.level.label, clock=clock)
        self.runtime = Runtime(RuntimeSettings.from_config(cfg.runtime), self.updates.manifest, self.event,
                               clock=clock, quarantine_path=os.path.join(self.state_dir, "quarantine.json"))
        self.updates.attach(self.runtime)
        policies = CpuFreq(fs).policies()
        self.reader = BoardReader(fs, clock=self.board_clock, slope_window_s=self.policy.slope_window_s,
                                  power_good=self.io.read_power_good if self.io.power_good is not None else None)
        self.governor = Governor(self.policy, self.reader.read,
                                 frequencies_khz=policies[0].frequencies_khz if policies else (),
                                 clock=self.board_clock, on_event=self.event)
        self.applier = PlanApplier(CpuFreq(fs), self.runtime, on_event=self.event)
        self.spool = self.dispatcher = None
        if cfg.link.broker:
            try:
                self._make_link()
            except Exception:
                self.io.close()
                if self.mcu is not None:
                    self.mcu.close()
                raise

    # ------------------------------------------------------------------------------------------- link

    def _make_link(self) -> None:
        from device.agent_commands import build_registry
        from device.link.client import Link
        from device.link.commands import Dispatcher
        from device.link.envelope import TrustStore, Verifier
        from device.link.errors import BrokerUrlError
        from device.link.spool import Spool
        from device.link.url import TlsFiles

        lc = self.cfg.link
        self.spool = Spool(os.path.join(self.state_dir, "spool", "spool.db"), commit_interval_s=lc.spool_commit_ms / 1000,
                           max_bytes=int(lc.spool_max_mb * 1024 * 1024), max_age_s=lc.spool_max_age_h * 3600,
                           on_event=self.event)
        self.trust = TrustStore(lc.trust_dir)
        verifier = Verifier(self.trust, device_id=self.device_id, max_ttl_s=lc.envelope_max_ttl_s,
                            skew_s=lc.envelope_skew_s, nonce_path=os.path.join(self.state_dir, "envelope-nonces.json"))
        self.dispatcher = Dispatcher(build_registry(self), verifier=verifier, max_payload=int(lc.max_payload_kb * 1024),
                                     dedupe_window_s=lc.dedupe_window_s, rate_burst=lc.commands_burst,
                                     rate_per_s=lc.commands_per_s)
        password = ""
        if lc.password_file:
            try:
                with open(lc.password_file, encoding="utf-8") as f:
                    password = f.read().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read {lc.password_file}: {exc.strerror or exc}", "link.password_file",
                                  self.cfg.source) from exc
        try:
            self.link = Link(lc.broker, self.device_id, self.spool, prefix=lc.prefix, protocol=lc.protocol,
                             tls=TlsFiles(lc.ca_file, lc.cert_file, lc.key_file), username=lc.username,
                             password=password, keepalive_s=lc.keepalive_s,
                             backoff=(lc.backoff_min_s, lc.backoff_max_s), inflight=lc.inflight,
                             dispatcher=self.dispatcher, birth=self.birth, on_event=self.event)
        except BrokerUrlError as exc:  # the loader checked these; a TLS file changed since: name its key again
            self.spool.close()
            key, message = (lc.validate() or [("link.broker", str(exc))])[0]
            raise ConfigError(message, key, self.cfg.source) from exc
        for kind, data in self._early:
            self.link.publish_event(kind, data)
        self._early = []

    def birth(self) -> dict:
        st = self.runtime.status()
        m = self.runtime.manifest
        return {"version": __version__, "boot_id": _boot_id(),
                "models": {m.name: {"version": m.version, "variants": list(m.variants)}},
                "variant": st["variant"], "backend": st["backend"], "backend_version": st["backend_version"],
                "delegate": st["delegate"], "serving": self.serving, "level": self.governor.level.label,
                "accelerators": self.accelerators.summary(), "update": self.updates.summary(), **self._simulation()}

    def _simulation(self) -> dict:
        """How a board says whether it is simulated: in the birth message, ``status`` and every result."""
        return {"simulated": self.simulated, "virtual_board": self.board.profile.name if self.simulated else None}

    @property
    def serving(self) -> bool:
        """The runtime can classify windows (it started, and some variant is healthy)."""
        return self._started and self.runtime.serving

    def _runtime_problem(self) -> str | None:
        """Why the runtime does not serve once started (its own ``not_serving`` / ``serving`` events say when)."""
        if not self._started or self.runtime.serving:
            return None
        return self.runtime.status().get("not_serving_reason") or "no variant can serve"

    def event(self, kind: str, data: dict) -> None:
        """Every event of every part: logged, and published on ``events`` when there is a link."""
        log.info("event %s: %s", kind, data)
        if self.updates is not None:
            self.updates.on_event(kind, data)  # a fault of a model on trial fails its trial
        if kind in _BIRTH_CHANGES and self.link is not None:
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

    # ------------------------------------------------------------------------------------------ status

    def status(self) -> dict:
        return {"device": self.device_id, "version": __version__, **self._simulation(), "results": self.results,
                "failures": self.failures, "serving": self.serving,
                "faults": self._faults(),
                "runtime": self.runtime.status(),
                "governor": self.governor.status(),
                "sensor": self.sensor.health().to_dict(),
                "link": self.link.status() if self.link is not None else None,
                "spool": self.spool.stats() if self.spool is not None else None,
                "trust_problems": getattr(self, "trust", None) and self.trust.problems,
                "hardware": self.io.describe(), "accelerators": self.accelerators.summary(),
                "update": self.updates.status()}

    def _faults(self) -> dict:
        """What is wrong now, by part: ``{"sensor": {"problem", "for_s"}, "runtime": {"problem"}}``."""
        out = {}
        if self.sensor_watch.active:
            out["sensor"] = self.sensor_watch.status()
        problem = self._runtime_problem()
        if problem is not None:
            out["runtime"] = {"problem": problem}
        return out

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

    # -------------------------------------------------------------------------------------------- loops

    def infer_once(self, window) -> dict:
        """Classifies one window; spools and returns the result."""
        t0 = self.clock.monotonic()
        p = self.runtime.predict(window)
        m = p.model or self.runtime.manifest  # the model that answered, even if a switch came since
        result = {"model": m.name, "variant": p.variant, "label": p.label, "score": round(float(p.score), 5),
                  "scores": {lab: round(float(s), 5) for lab, s in zip(m.labels, p.scores)},
                  "latency_ms": round((self.clock.monotonic() - t0) * 1000.0, 3), "time": self.clock.time(),
                  "simulated": self.simulated}
        if self.link is not None:
            result["id"] = self.link.publish_result(m.name, result)
        self.results += 1
        self.last_result = result
        if self._on_result is not None:
            self._on_result(result)
        try:
            self.updates.observe(window, p)  # after publishing: the shadow's time never delays a result
        except Exception:  # the health gate must never take a result down with it
            log.exception("the update trial could not observe a result")
        return result

    def _on_trigger(self, stamp: float) -> None:
        """The wake/trigger input fired (a PIR, a button): classify the latest window now."""
        window = self.sensor.latest_window(max_age_s=5.0)
        result = self.infer_once(window) if window is not None else None
        self.last_trigger = {"at": stamp, "result": result}
        self.event("trigger", {"at": stamp, "result_id": None if result is None else result.get("id"),
                               "label": None if result is None else result["label"]})

    def _update_led(self) -> None:
        from power.policy import Level

        self.io.update(started=self._started,
                       broker_ok=None if self.link is None else self.link.connected,
                       sensor_ok=not self.sensor_watch.active,
                       runtime_ok=self._runtime_problem() is None,
                       critical=self.governor.level == Level.CRITICAL)

    def _watch(self) -> None:
        """Brings a sensor fault to the log, the events and the LED, and the runtime's state to the LED (the
        runtime says itself when it stops and starts serving)."""
        from drivers.sensor import SensorState

        h = self.sensor.health()
        faulty = h.state in (SensorState.DISCONNECTED, SensorState.STALE) and h.last_error is not None
        self.sensor_watch.update(h.last_error if faulty else None, port=self.sensor.url, state=h.state.value)
        self._update_led()

    def _govern(self) -> None:
        speed = getattr(self.board_clock, "factor", 1.0)
        while not self._stop.is_set():
            self.health.beat("governor")
            try:
                self.governor.step()
                applied = self.applier.apply(lambda: self.governor.plan)  # the latest, were a command faster
                plan = self.governor.plan
                if self.board is not None:
                    self._load_board(plan, applied)
                self._watch()
                self.notifier.status_if_changed(describe(self.runtime.status(), self.cfg.link.broker,
                                                         self.simulated, self.governor.level.label))
            except Exception:  # the governor must never take the agent down
                log.exception("governor step failed")
            self._stop.wait(self.policy.step_s / speed)

    def _load_board(self, plan, applied: dict) -> None:
        """A virtual board's simulated workload follows the plan: the board's physics need a load heavier than
        one small model to react to (threads up to the board's cores, the variant's cost, the duty cycle)."""
        m = self.runtime.manifest
        variant = m.variants.get(applied.get("variant") or m.default_variant)
        cores = self.board.profile.cpus if plan.threads >= (os.cpu_count() or 1) else plan.threads
        self.board.set_demand(cores, variant.cost if variant else 1.0, plan.interval_ms / 1000.0)

    def _telemetry(self) -> None:
        while not self._stop.wait(self.governor.plan.telemetry_s):
            if self.link is not None:
                try:
                    self.link.publish_telemetry(self.telemetry())
                except Exception:
                    log.exception("telemetry failed")

    def start(self) -> None:
        """Starts everything but the inference loop (which :meth:`run` runs on the caller's thread).

        The spool and the link come first, so whatever happens to the model the board stays reachable and its
        events are spooled. A runtime that cannot start at all (a requested delegate that is missing) is a
        runtime fault, not the end of the agent.
        """
        self.notifier, self.health = Notifier(), Health(self.clock)
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
        for target, name in ((self._govern, "governor"), (self._telemetry, "telemetry")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._notify_ready()

    def _notify_ready(self) -> None:
        """``READY=1`` with a readable status, and the watchdog (when systemd gave one) from now on."""
        # The loop turns at least every 0.5 s (its sensor poll); the governor every step (on the board's time).
        self.health.require("loop", lambda: 3 * 0.5 + self.governor.plan.interval_ms / 1000.0)
        self.health.require("governor", max(1.0, 3 * self.policy.step_s / getattr(self.board_clock, "factor", 1.0)))
        self.health.beat("loop")  # about to start on the caller's thread
        self.notifier.ready(describe(self.runtime.status(), self.cfg.link.broker, self.simulated,
                                     self.governor.level.label))
        self.watchdog = start_watchdog(self.notifier, self.health)

    def run(self, seconds: float | None = None) -> int:
        """Runs the inference loop until :meth:`stop` (or ``seconds``).

        Returns:
            0, or 1 when a run of limited ``seconds`` ends with the sensor or the runtime faulty (a technician's
            ``fieldnode run --seconds 30`` on a board whose sensor is not wired fails).
        """
        from device.runtime.errors import NotServing

        last = watched = 0.0
        faults: list[str] = []
        try:
            self.start()
            deadline = None if seconds is None else self.clock.monotonic() + seconds
            while not self._stop.is_set() and (deadline is None or self.clock.monotonic() < deadline):
                window = self.sensor.next_window(timeout=0.5)
                self.health.beat("loop")  # progress (a hung read, worker or update stops the watchdog pings)
                now = self.clock.monotonic()
                if now - watched >= 1.0:
                    watched = now
                    try:
                        self._watch()
                    except Exception:  # the watch (LED, GPIO) must never take the agent down
                        log.exception("watching the sensor and runtime failed")
                try:
                    self.updates.tick()  # a trial's verdict: commit, or roll back (serving or not)
                except Exception:
                    log.exception("the update trial's verdict could not be applied")
                if not self.runtime.serving:
                    self.runtime.retry_if_due()  # paced by runtime.not_serving_retry_s: a plugged-in TPU...
                    continue
                if window is None:
                    continue
                interval = self.governor.plan.interval_ms / 1000.0
                if interval and now - last < interval:
                    continue  # duty cycle: skip windows between planned inferences
                last = now
                try:
                    self.infer_once(window)
                except NotServing:
                    pass  # no variant can serve: a runtime fault (watched), not one failure per window
                except Exception as exc:  # a model fault is an event, never the end of the agent
                    self.failures += 1
                    log.warning("inference failed: %s", exc)
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
        self._stop.set()

    def close(self) -> None:
        """Stops every thread; the link publishes ``offline``; the spool commits what it holds."""
        if self.notifier is not None:
            self.notifier.stopping()
        if self.watchdog is not None:
            self.watchdog.stop()
        self._stop.set()
        for t in self._threads:
            t.join(10)
        self._threads = []
        self.sensor.stop()
        if self.mcu is not None:
            self.mcu.close()
        if self.link is not None:
            self.link.stop()
        if self.spool is not None:
            self.spool.close()
        self.updates.close()
        self.runtime.close()
        self.io.close()
        if self.board is not None:
            self.board.stop()


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


# ------------------------------------------------------------------------------------------ fieldnode run


def add_arguments(p) -> None:
    from device.cli import nonnegative_float, sim_argument

    p.add_argument("--seconds", type=nonnegative_float, default=None,
                   help="stop after this long and exit 1 if the sensor or the runtime is faulty then "
                        "(default: until SIGTERM)")
    sim_argument(p, "run on a simulated board of this profile (default rpi4): simulated sensor, sysfs and "
                    "battery, and every result says so")


def run(args) -> int:
    from device.cli import load_config

    cfg = load_config(args)
    if args.sim:
        cfg = cfg.with_overrides({"drivers.virtual_board": args.sim})
    if not getattr(args, "verbose", False):  # -v wins; otherwise the configured level
        logging.getLogger().setLevel(cfg.device.log_level.upper())
    agent = Agent(cfg)
    log.info("fieldnode %s: device %s, state %s, link %s%s", __version__, agent.device_id, agent.state_dir,
             cfg.link.broker or "off", f", SIMULATED board {args.sim or cfg.drivers.virtual_board}"
             if agent.simulated else "")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    return agent.run(args.seconds)
