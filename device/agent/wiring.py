"""Builds one board's parts from the configuration: the one place that knows which part needs which.

:func:`build` returns :class:`Parts` and opens nothing the agent would have to undo on a configuration error:
cross-key checks run first, and a part that fails closes the ones opened before it. It starts no thread
(:class:`device.agent.agent.Agent` starts and stops them).

The parts reach the agent through a :class:`Hub`: ``event(kind, data)`` for every part's events,
``on_trigger(stamp)`` for the wake input, ``birth()`` for the retained state and ``command_ops()`` for the
narrow operations MQTT commands may call (:class:`device.agent.commands.Ops`).

The board's groups (:class:`device.link.groups.Groups`, ``<state_dir>/groups.json`` over ``device.groups``) are made
with or without a link; the verifier checks group envelopes against them and the link subscribes to their topics.
The link's session counter is ``<state_dir>/link-session.json``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Protocol

from device import config
from device.errors import ConfigError

log = logging.getLogger("device.agent")  # the agent's own messages, whichever module builds it


class Hub(Protocol):
    def event(self, kind: str, data: dict) -> None: ...

    def on_trigger(self, stamp: float) -> None: ...

    def birth(self) -> dict: ...

    def command_ops(self) -> Any: ...


@dataclass
class Parts:
    """Everything one board runs (see :mod:`device.agent.agent` for what each does)."""

    cfg: config.Config
    clock: Any
    policy: Any
    device_id: str
    state_dir: str
    board: Any  # a virtual board, or None
    board_clock: Any  # the governor's time: the virtual board's (may run faster than real time), else ``clock``
    mcu: Any  # the simulated sensor MCU of a virtual board, or None
    sensor: Any
    io: Any
    accelerators: Any
    updates: Any
    runtime: Any
    reader: Any
    governor: Any
    applier: Any
    planner_for: Any = None  # planner_for(manifest): the governor's planner for a model, or None without one
    spool: Any = None
    link: Any = None
    dispatcher: Any = None
    trust: Any = None
    groups: Any = None  # the board's groups (device.link.groups.Groups), with or without a link

    @property
    def simulated(self) -> bool:
        return self.board is not None

    def close(self) -> None:
        """Closes what construction opened (a failed build, or after the agent's threads stopped)."""
        for close in (getattr(self.spool, "close", None), self.io.close,
                      getattr(self.mcu, "close", None)):
            if close is not None:
                try:
                    close()
                except Exception:
                    log.debug("closing a part failed", exc_info=True)


def build(cfg: config.Config, clock, hub: Hub, *, board=None) -> Parts:
    """Builds the parts of ``cfg``'s board.

    Args:
        cfg: The validated configuration.
        clock: Time source for the loops, the sensor, the LED and (without a virtual board) the governor.
        hub: Where the parts' events, triggers, birth and commands go.
        board: A virtual board to run on instead of the one ``drivers.virtual_board`` would make.

    Raises:
        ConfigError: A configuration problem only the agent sees, naming the key.
    """
    from device.agent.applier import PlanApplier
    from device.agent.hardware import BoardIO
    from device.runtime.runtime import Runtime, RuntimeSettings
    from device.update.agentside import AgentUpdates
    from drivers.accel import discover
    from drivers.cpufreq import CpuFreq
    from drivers.sensor import SerialSensor
    from drivers.sysfs import Sysfs, resolve_root
    from power.governor import Governor
    from power.policy import Policy
    from power.snapshot import BoardReader

    policy = Policy.from_config(cfg.power)  # cross-key checks first, before anything is opened
    state_dir = cfg.device.state_dir
    d = cfg.drivers
    if board is None and d.virtual_board:
        from drivers.sim.board import VirtualBoard

        board = VirtualBoard(os.path.join(state_dir, "board"), d.virtual_board, ambient_c=25.0)
    fs = board.fs if board is not None else Sysfs(resolve_root(d.sysfs_root))
    board_clock = board.clock if board is not None else clock
    url, mcu = d.sensor_url, None
    if board is not None:
        from drivers.sim.mcu import SimulatedMcu
        from drivers.sim.signal import VibrationSource, schedule

        log.warning("simulated board %s: the sensor, sysfs and battery are simulated, and every result says so",
                    board.profile.name)
        source = VibrationSource(seed=7)  # the simulated machine changes state every 6-12 s
        source.follow(schedule(7, 86400.0, segment_s=(6.0, 12.0)))
        link_dir = os.path.join(state_dir, "board")
        os.makedirs(link_dir, exist_ok=True)
        mcu = SimulatedMcu(source, link_dir=link_dir)
        url = mcu.port
    sensor = SerialSensor(url, baudrate=d.sensor_baudrate, read_timeout_s=d.sensor_timeout_s, clock=clock)
    try:
        io = BoardIO(d, on_trigger=hub.on_trigger, clock=clock)
    except Exception:
        if mcu is not None:
            mcu.close()
        raise
    governor_box: list = []  # the update gate asks the governor's level; the governor is made below
    updates = AgentUpdates(cfg, hub.event, lambda: governor_box[0].level.label, clock=clock)
    runtime = Runtime(RuntimeSettings.from_config(cfg.runtime), updates.manifest, hub.event, clock=clock,
                      quarantine_path=os.path.join(state_dir, "quarantine.json"))
    updates.attach(runtime)
    policies = CpuFreq(fs).policies()
    reader = BoardReader(fs, clock=board_clock, slope_window_s=policy.slope_window_s,
                         power_good=io.read_power_good if io.power_good is not None else None)
    accelerators = discover(fs)
    planner_for = None
    if cfg.power.planner:
        def planner_for(manifest):
            return planner_for_model(manifest, policies, accelerators)
    governor = Governor(policy, reader.read, frequencies_khz=policies[0].frequencies_khz if policies else (),
                        clock=board_clock, on_event=hub.event,
                        planner=planner_for(runtime.manifest) if planner_for is not None else None,
                        power_model=_power_model(board, accelerators), runtime_target_h=cfg.power.runtime_target_h)
    governor_box.append(governor)
    parts = Parts(cfg=cfg, clock=clock, policy=policy, device_id=config.device_id(cfg), state_dir=state_dir,
                  board=board, board_clock=board_clock, mcu=mcu, sensor=sensor, io=io,
                  accelerators=accelerators, updates=updates, runtime=runtime, reader=reader, governor=governor,
                  applier=PlanApplier(CpuFreq(fs), runtime, on_event=hub.event), planner_for=planner_for)
    from device.link.groups import Groups

    parts.groups = Groups(cfg.device.groups, os.path.join(state_dir, "groups.json"), clock=clock)
    if cfg.link.broker:
        try:
            _link(parts, hub)
        except Exception:
            parts.close()
            raise
    return parts


def planner_for_model(manifest, policies, accelerators):
    """The governor's measured planner over ``manifest``'s variants this board can run, each weighted by its
    accuracy relative to the default variant's (``model.json``)."""
    from power.planner import Planner, Variant, quality_of

    usable = [v for v in manifest.variants.values() if v.requires is None or accelerators.has_edgetpu]
    if not usable:
        return None
    if any(v.accuracy is None for v in usable):
        # Without each variant's accuracy the planner cannot weigh a cheaper variant's windows: it plans the
        # frequency and threads of the default variant only, and never trades accuracy for energy unasked.
        default = manifest.variants.get(manifest.default_variant)
        usable = [default] if default is not None and default in usable else usable[:1]
        log.info("model %s gives no accuracy per variant: the governor plans with variant %s only",
                 manifest.name, usable[0].name)
    accuracy = {v.name: v.accuracy for v in usable if v.accuracy is not None}
    quality = quality_of(accuracy, [v.name for v in usable], manifest.default_variant)
    cpus = os.cpu_count() or 1
    return Planner([Variant(v.name, v.cost, quality[v.name]) for v in usable],
                   policies[0].frequencies_khz if policies else (), cpus)


def _power_model(board, accelerators):
    """Board power from its profile, for a board that can measure neither its input nor its battery."""
    from drivers.sim.profiles import for_board

    profile = board.profile if board is not None else for_board(accelerators.cpu.board)
    return None if profile is None else profile.power_w


def _link(parts: Parts, hub: Hub) -> None:
    """The spool, the trust store, the command dispatcher and the MQTT link of ``[link]``."""
    from device.agent.commands import build_registry
    from device.link.client import Link
    from device.link.commands import Dispatcher
    from device.link.envelope import TrustStore, Verifier
    from device.link.errors import BrokerUrlError
    from device.link.spool.spool import Spool
    from device.link.url import TlsFiles

    cfg, lc, state_dir = parts.cfg, parts.cfg.link, parts.state_dir
    parts.spool = Spool(os.path.join(state_dir, "spool", "spool.db"), commit_interval_s=lc.spool_commit_ms / 1000,
                        max_bytes=int(lc.spool_max_mb * 1024 * 1024), max_age_s=lc.spool_max_age_h * 3600,
                        on_event=hub.event)
    parts.trust = TrustStore(lc.trust_dir)
    verifier = Verifier(parts.trust, device_id=parts.device_id, max_ttl_s=lc.envelope_max_ttl_s,
                        skew_s=lc.envelope_skew_s, nonce_path=os.path.join(state_dir, "envelope-nonces.json"),
                        groups=parts.groups)
    parts.dispatcher = Dispatcher(build_registry(hub.command_ops()), verifier=verifier,
                                  max_payload=int(lc.max_payload_kb * 1024), dedupe_window_s=lc.dedupe_window_s,
                                  rate_burst=lc.commands_burst, rate_per_s=lc.commands_per_s,
                                  device=parts.device_id)
    password = None
    if lc.password_file:
        from device.link.url import PasswordFileError, read_password

        try:
            password = read_password(lc.password_file)  # the one reader: one trailing line ending is not part of it
        except PasswordFileError as exc:
            raise ConfigError(str(exc), "link.password_file", cfg.source) from exc
    try:
        parts.link = Link(lc.broker, parts.device_id, parts.spool, prefix=lc.prefix, protocol=lc.protocol,
                          tls=TlsFiles(lc.ca_file, lc.cert_file, lc.key_file), username=lc.username,
                          password=password, keepalive_s=lc.keepalive_s,
                          backoff=(lc.backoff_min_s, lc.backoff_max_s), inflight=lc.inflight,
                          ack_timeout_s=lc.ack_timeout_s, dispatcher=parts.dispatcher, birth=hub.birth,
                          on_event=hub.event, session_path=os.path.join(state_dir, "link-session.json"),
                          groups=parts.groups)
    except BrokerUrlError as exc:  # the loader checked these; a TLS file changed since: name its key again
        key, message = (lc.validate() or [("link.broker", str(exc))])[0]
        raise ConfigError(message, key, cfg.source) from exc

