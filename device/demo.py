"""``fieldnode demo``: the agent's loop on the virtual board, end to end, with real inference.

What runs, all of it the production code path except the board itself:

* a :class:`drivers.sim.board.VirtualBoard` (``rpi4`` by default, on battery, warm) writes a live sysfs tree
  in a temporary directory; its clock runs ``--speed`` times faster than real time so the thermal and
  battery physics visibly move in a 30-second demo;
* a :class:`drivers.sim.mcu.SimulatedMcu` streams the simulated machine's vibration (the physics the model
  was trained on, changing state on a schedule) as framed serial data on a real pseudo-terminal, in real
  time; the :class:`drivers.sensor.SerialSensor` driver reads it and assembles windows;
* each window is classified through the agent's :class:`device.runtime.runtime.Runtime` (an isolated worker
  process by default);
* the power governor reads the board's tree every ``power.step_s`` of board time and its plan is applied
  by :class:`device.applier.PlanApplier`: the CPU cap is written to the board's ``scaling_max_freq`` and
  the runtime's variant and threads are hot-swapped when the level changes. The board's simulated load
  follows the plan (a heavier workload than one vibration model, so the physics have something to react to).

One line per second shows board time, the governor level, SoC temperature, CPU cap, battery, the variant,
p50 latency and the results so far, with the agreement between the model and the simulated machine's truth.
"""

from __future__ import annotations

import os
import tempfile
import threading

from device.clock import SYSTEM_CLOCK


def add_arguments(p) -> None:
    p.add_argument("--seconds", type=float, default=None, help="how long to run (default: config demo.seconds)")
    p.add_argument("--isolation", choices=("process", "inline"), default=None, help="default: config")
    p.add_argument("--board", default=None, choices=("rpi4", "rpi5", "jetson-orin-nano"),
                   help="virtual board profile (default: config drivers.virtual_board, else rpi4)")
    p.add_argument("--speed", type=float, default=60.0, help="board seconds per real second (default 60)")
    p.add_argument("--ambient", type=float, default=38.0, help="ambient temperature in C (default 38)")
    p.add_argument("--battery", type=float, default=54.0,
                   help="initial battery charge in %% of 5,000 mAh; 0 runs on mains (default 54)")
    p.add_argument("--seed", type=int, default=7, help="seed of the simulated machine (default 7)")


def run(args, clock=SYSTEM_CLOCK, out=print) -> int:
    from device.cli import load_config

    cfg = load_config(args)
    if args.isolation:
        cfg = cfg.with_overrides({"runtime.isolation": args.isolation})
    seconds = cfg.demo.seconds if args.seconds is None else args.seconds
    profile = args.board or cfg.drivers.virtual_board or "rpi4"
    with tempfile.TemporaryDirectory(prefix="fieldnode-demo-") as tmp:
        demo = _Demo(cfg, profile, tmp, args, out)
        try:
            return demo.run(seconds, clock)
        finally:
            demo.close()


class _Demo:
    def __init__(self, cfg, profile: str, tmp: str, args, out):
        from device.applier import PlanApplier
        from device.runtime.runtime import Runtime, RuntimeSettings
        from drivers.cpufreq import CpuFreq
        from drivers.sensor import SerialSensor
        from drivers.sim.board import VirtualBoard
        from drivers.sim.clock import ScaledClock
        from drivers.sim.mcu import SimulatedMcu
        from drivers.sim.signal import VibrationSource, schedule
        from power.governor import Governor
        from power.policy import Policy
        from power.snapshot import BoardReader

        self.out = out
        self.board_clock = ScaledClock(args.speed)
        battery = args.battery if args.battery > 0 else None
        self.board = VirtualBoard(os.path.join(tmp, "board"), profile, clock=self.board_clock,
                                  ambient_c=args.ambient, battery_mah=5000.0 if battery else None,
                                  soc_pct=battery or 100.0, mains=battery is None)
        self.source = VibrationSource(seed=args.seed)
        self.source.follow(schedule(args.seed, 3600.0, segment_s=(6.0, 12.0)))
        self.mcu = SimulatedMcu(self.source, link_dir=tmp)
        self.sensor = SerialSensor(self.mcu.port, read_timeout_s=1.0)
        self.events: list[str] = []
        self.rt = Runtime(RuntimeSettings.from_config(cfg.runtime), on_event=self._event)
        self.policy = Policy.from_config(cfg.power)
        reader = BoardReader(self.board.fs, clock=self.board_clock, slope_window_s=self.policy.slope_window_s)
        freqs = CpuFreq(self.board.fs).policies()[0].frequencies_khz
        # The interpreter runs on this machine: its CPU count bounds the threads, not the board profile's.
        self.governor = Governor(self.policy, reader.read, frequencies_khz=freqs, cpus=os.cpu_count(),
                                 clock=self.board_clock, on_event=self._event)
        self.applier = PlanApplier(CpuFreq(self.board.fs), self.rt, on_event=self._event)
        self._stop = threading.Event()
        self._gov_thread: threading.Thread | None = None
        self._costs = {name: v.cost for name, v in self.rt.manifest.variants.items()}

    def _event(self, kind: str, data: dict) -> None:
        text = ", ".join(f"{k}={v}" for k, v in data.items() if v not in (None, "", []))
        self.out(f"event {kind}: {text}")

    def _govern(self) -> None:
        """The governor loop: read the board, plan, apply; the board's simulated load follows the plan."""
        while not self._stop.is_set():
            plan = self.governor.step()
            applied = self.applier.apply(plan)
            variant = applied.get("variant") or self.rt.manifest.default_variant
            self.board.set_demand(self.board.profile.cpus if plan.threads >= (os.cpu_count() or 1) else plan.threads,
                                  self._costs.get(variant, 1.0), plan.interval_ms / 1000.0)
            self._stop.wait(self.policy.step_s / self.board_clock.factor)

    def run(self, seconds: float, clock) -> int:
        from drivers.sim.signal import LABELS

        b = self.board
        self.out(f"fieldnode demo: model {self.rt.manifest.name} {self.rt.manifest.version}, variants "
                 f"{', '.join(self.rt.manifest.variants)}; virtual {b.profile.name} at {b.ambient_c:g} C ambient, "
                 f"{'battery %.0f%%' % b.soc if b.soc is not None else 'mains'}, board time x{self.board_clock.factor:g}; "
                 f"sensor on {self.mcu.port}; {seconds:g} s")
        b.start(period_s=max(0.005, min(0.05, 1.0 / self.board_clock.factor)))  # ~1 board second a step
        self.rt.start()
        st = self.rt.status()
        self.out(f"backend {st['backend']} {st['backend_version']}, delegate {st['delegate']}, isolation "
                 f"{st['isolation']}, threads {st['threads']}, variant {st['variant']}")
        for fb in st["delegate_fallbacks"]:
            self.out(f"  fallback: {fb}")
        self.mcu.start()
        self.sensor.start()
        self._gov_thread = threading.Thread(target=self._govern, name="demo-governor", daemon=True)
        self._gov_thread.start()
        results = failures = correct = judged = 0
        counts = {label: 0 for label in LABELS}
        last = ("-", 0.0)
        start = clock.monotonic()
        next_line = start + 1.0
        prev_state = self.source.state
        while clock.monotonic() - start < seconds:
            window = self.sensor.next_window(timeout=0.5)
            state = self.source.state
            if window is not None:
                try:
                    p = self.rt.predict(window)
                except Exception as exc:  # the demo reports failures and keeps going, as the agent does
                    failures += 1
                    self.out(f"inference failed: {exc}")
                else:
                    results += 1
                    counts[p.label] += 1
                    last = (p.label, p.score)
                    if state == prev_state:  # the machine did not change state during this window
                        judged += 1
                        correct += p.label == state
            prev_state = state
            if clock.monotonic() >= next_line:
                next_line += 1.0
                self._line(clock.monotonic() - start, results, failures, correct, judged, last, state)
        s = self.rt.status()
        h = self.sensor.health()
        acc = f"{100.0 * correct / judged:.1f}%" if judged else "n/a"
        g = self.governor.status()
        self.out(f"done: {results} results, {failures} failures, agreement with the simulated truth {acc}, "
                 f"p50 {s['latency']['p50_ms']} ms, p99 {s['latency']['p99_ms']} ms, swaps {s['swaps']}, "
                 f"governor level {g['level']} after {g['changes']} changes, sensor frames {h.frames} "
                 f"(crc errors {h.crc_errors}, gaps {h.seq_gaps}), classes {counts}")
        return 0 if failures == 0 and results > 0 else 1

    def _line(self, t, results, failures, correct, judged, last, truth) -> None:
        st = self.board.state()
        s = self.rt.status()
        lat = s["latency"]["p50_ms"]
        plan = self.governor.plan
        acc = f"{100.0 * correct / judged:.0f}%" if judged else "-"
        battery = f"{st.soc_pct:.1f}%" if st.soc_pct is not None else "mains"
        self.out(f"t={t:4.1f}s board={st.t / 60:5.1f}min level={plan.level.label:<11} temp={st.temp_c:5.1f}C "
                 f"cap={(plan.cpu_max_khz or 0) // 1000}MHz batt={battery} {s['backend']}/{s['delegate']} "
                 f"variant={s['variant']:<4} threads={s['threads']} p50={lat if lat is not None else float('nan'):.3f}ms "
                 f"results={results} failures={failures} last={last[0]}({last[1]:.2f}) truth={truth} agree={acc}")

    def close(self) -> None:
        self._stop.set()
        if self._gov_thread is not None:
            self._gov_thread.join()
        self.sensor.stop()
        self.mcu.close()
        self.board.stop()
        self.rt.close()
