"""The agent: sensor -> window -> worker -> result -> spool -> broker, steered by the governor and by commands.

:class:`Agent` wires the parts built elsewhere and owns their threads:

* **sensor**: the serial sensor driver on ``drivers.sensor_url``; with no URL, or on a virtual board, a
  simulated sensor MCU on a pseudo-terminal feeds the same driver (so the path is always the real one);
* **inference loop** (the caller's thread in :meth:`Agent.run`): each window goes through the
  :class:`device.runtime.runtime.Runtime`; each result is spooled and published on ``results/<model>``,
  at most once per the plan's ``interval_ms``;
* **governor loop**: every ``power.step_s`` the governor reads the board and the plan is applied
  (:class:`device.applier.PlanApplier`); level changes are events;
* **telemetry loop**: every plan ``telemetry_s``, a power, thermal, governor and latency summary;
* **link** (when ``link.broker`` is set): :class:`device.link.client.Link` over a durable
  :class:`device.link.spool.Spool` in the state directory, with the command registry of
  :mod:`device.agent_commands`.

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

log = logging.getLogger(__name__)


class Agent:
    """Everything one board runs.

    Args:
        cfg: The validated configuration.
        clock: Time source for the loops.
        board: A virtual board to run on instead of the one ``drivers.virtual_board`` would make (the demo
            passes one whose clock runs faster than real time); its clock paces the governor.
        on_event: Also called with every event (the demo prints them).
        on_result: Called with every result (the demo scores them against the simulated truth).
    """

    def __init__(self, cfg: config.Config, clock=SYSTEM_CLOCK, *, board=None, on_event=None, on_result=None):
        from device.applier import PlanApplier
        from device.hardware import BoardIO
        from device.runtime.runtime import Runtime, RuntimeSettings
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
        try:
            os.makedirs(self.state_dir, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the state directory: {exc.strerror or exc}", "device.state_dir",
                              cfg.source) from exc
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._early: list[tuple[str, dict]] = []  # events from before the link exists (a corrupt spool...)
        self.link = None
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
        fs = self.board.fs if self.board is not None else Sysfs(resolve_root(d.sysfs_root))
        # The governor runs on the board's time (a virtual board's clock may run faster than real time).
        self.board_clock = self.board.clock if self.board is not None else SYSTEM_CLOCK
        url = d.sensor_url
        if not url or self.board is not None:
            from drivers.sim.mcu import SimulatedMcu
            from drivers.sim.signal import VibrationSource, schedule

            if self.board is None:
                log.warning("drivers.sensor_url is empty: reading the simulated sensor MCU (set it to the "
                            "sensor's port, e.g. /dev/ttyAMA0, on a real board)")
            source = VibrationSource(seed=7)  # the simulated machine changes state every 6-12 s
            source.follow(schedule(7, 86400.0, segment_s=(6.0, 12.0)))
            self.mcu = SimulatedMcu(source, link_dir=os.path.join(self.state_dir, "board"))
            url = self.mcu.port
        self.sensor = SerialSensor(url, baudrate=d.sensor_baudrate, read_timeout_s=d.sensor_timeout_s)
        try:
            self.io = BoardIO(d, on_trigger=self._on_trigger, clock=clock)
        except Exception:
            if self.mcu is not None:
                self.mcu.close()
            raise
        self.accelerators = discover(fs)
        self._started = False
        self.runtime = Runtime(RuntimeSettings.from_config(cfg.runtime), on_event=self.event,
                               quarantine_path=os.path.join(self.state_dir, "quarantine.json"))
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
        except BrokerUrlError as exc:  # a bad URL, prefix or TLS file: a configuration error naming the key
            self.spool.close()
            raise ConfigError(str(exc), "link.broker", self.cfg.source) from exc
        for kind, data in self._early:
            self.link.publish_event(kind, data)
        self._early = []

    def birth(self) -> dict:
        st = self.runtime.status()
        m = self.runtime.manifest
        return {"version": __version__, "boot_id": _boot_id(),
                "models": {m.name: {"version": m.version, "variants": list(m.variants)}},
                "variant": st["variant"], "backend": st["backend"], "backend_version": st["backend_version"],
                "delegate": st["delegate"], "level": self.governor.level.label,
                "accelerators": self.accelerators.summary()}

    def event(self, kind: str, data: dict) -> None:
        """Every event of every part: logged, and published on ``events`` when there is a link."""
        log.info("event %s: %s", kind, data)
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
        return {"device": self.device_id, "version": __version__, "results": self.results,
                "failures": self.failures, "runtime": self.runtime.status(), "governor": self.governor.status(),
                "sensor": self.sensor.health().to_dict(),
                "link": self.link.status() if self.link is not None else None,
                "spool": self.spool.stats() if self.spool is not None else None,
                "trust_problems": getattr(self, "trust", None) and self.trust.problems,
                "hardware": self.io.describe(), "accelerators": self.accelerators.summary()}

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
        m = self.runtime.manifest
        result = {"model": m.name, "variant": p.variant, "label": p.label, "score": round(float(p.score), 5),
                  "scores": {lab: round(float(s), 5) for lab, s in zip(m.labels, p.scores)},
                  "latency_ms": round((self.clock.monotonic() - t0) * 1000.0, 3), "time": self.clock.time()}
        if self.link is not None:
            result["id"] = self.link.publish_result(m.name, result)
        self.results += 1
        self.last_result = result
        if self._on_result is not None:
            self._on_result(result)
        return result

    def _on_trigger(self, stamp: float) -> None:
        """The wake/trigger input fired (a PIR, a button): classify the latest window now."""
        window = self.sensor.latest_window(max_age_s=5.0)
        result = self.infer_once(window) if window is not None else None
        self.last_trigger = {"at": stamp, "result": result}
        self.event("trigger", {"at": stamp, "result_id": None if result is None else result.get("id"),
                               "label": None if result is None else result["label"]})

    def _update_led(self) -> None:
        from drivers.sensor import SensorState
        from power.policy import Level

        st = self.runtime.status()
        self.io.update(started=self._started,
                       broker_ok=None if self.link is None else self.link.connected,
                       sensor_ok=self.sensor.health().state in (SensorState.OK, SensorState.STARTING),
                       runtime_ok=not st["quarantined"],
                       critical=self.governor.level == Level.CRITICAL)

    def _govern(self) -> None:
        speed = getattr(self.board_clock, "factor", 1.0)
        while not self._stop.is_set():
            try:
                plan = self.governor.step()
                applied = self.applier.apply(plan)
                if self.board is not None:
                    self._load_board(plan, applied)
                self._update_led()
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
        """Starts everything but the inference loop (which :meth:`run` runs on the caller's thread)."""
        if self.board is not None:
            speed = getattr(self.board_clock, "factor", 1.0)
            self.board.start(period_s=max(0.005, min(0.05, 1.0 / speed)))  # about one board second a step
        self.io.start()
        self.runtime.start()
        self._started = True
        if self.spool is not None:
            self.spool.start()
        if self.link is not None:
            self.link.start()
        if self.mcu is not None:
            self.mcu.start()
        self.sensor.start()
        for target, name in ((self._govern, "governor"), (self._telemetry, "telemetry")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def run(self, seconds: float | None = None) -> int:
        """Runs the inference loop until :meth:`stop` (or ``seconds``); returns an exit code."""
        self.start()
        deadline = None if seconds is None else self.clock.monotonic() + seconds
        last = 0.0
        try:
            while not self._stop.is_set() and (deadline is None or self.clock.monotonic() < deadline):
                window = self.sensor.next_window(timeout=0.5)
                if window is None:
                    continue
                interval = self.governor.plan.interval_ms / 1000.0
                if interval and self.clock.monotonic() - last < interval:
                    continue  # duty cycle: skip windows between planned inferences
                last = self.clock.monotonic()
                try:
                    self.infer_once(window)
                except Exception as exc:  # a model fault is an event, never the end of the agent
                    self.failures += 1
                    log.warning("inference failed: %s", exc)
        finally:
            self.close()
        return 0

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Stops every thread; the link publishes ``offline``; the spool commits what it holds."""
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
    p.add_argument("--seconds", type=float, default=None, help="stop after this long (default: until SIGTERM)")


def run(args) -> int:
    from device.cli import load_config

    cfg = load_config(args)
    if not getattr(args, "verbose", False):  # -v wins; otherwise the configured level
        logging.getLogger().setLevel(cfg.device.log_level.upper())
    agent = Agent(cfg)
    log.info("fieldnode %s: device %s, state %s, link %s", __version__, agent.device_id, agent.state_dir,
             cfg.link.broker or "off")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop())
    return agent.run(args.seconds)
