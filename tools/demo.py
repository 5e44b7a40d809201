"""``fieldnode demo``: the agent (:class:`device.agent.agent.Agent`) on a virtual board, end to end, with real inference.

The agent runs exactly as ``fieldnode run`` does on a virtual board; the demo only chooses the board and
watches:

* a :class:`drivers.sim.board.VirtualBoard` (``rpi4`` by default, on battery, warm) writes a live sysfs tree
  in a temporary directory; its clock runs ``--speed`` times faster than real time so the thermal and
  battery physics visibly move in a 30-second demo;
* the simulated sensor MCU streams the simulated machine's vibration (the physics the model was trained on,
  changing state on a schedule) as framed serial data on a real pseudo-terminal, in real time; the serial
  sensor driver reads it and assembles windows;
* each window is classified through the runtime (an isolated worker process by default);
* the power governor reads the board's tree every ``power.step_s`` of board time; the plan's CPU cap is
  written to the board's ``scaling_max_freq`` and the runtime's variant and threads are hot-swapped when the
  level changes. The board's simulated load follows the plan.

No MQTT link is started (``link.broker`` is ignored). One line per second shows board time, the governor
level, SoC temperature, CPU cap, battery, the variant, p50 latency and the results so far, with the agreement
between the model and the simulated machine's truth.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading

from device.clock import SYSTEM_CLOCK
from device.errors import Exit
from device.threads import Thread


def add_arguments(p) -> None:
    from device.cliargs import nonnegative_float, number, sim_argument

    p.add_argument("--seconds", type=nonnegative_float, default=None,
                   help="how long to run (default: config demo.seconds)")
    p.add_argument("--isolation", choices=("process", "inline"), default=None, help="default: config")
    sim_argument(p, "the virtual board profile (default: config drivers.virtual_board, else rpi4)",
                 default_profile=None)
    p.add_argument("--speed", type=number(float, minimum=1, maximum=3600), default=60.0,
                   help="board seconds per real second (default 60)")
    p.add_argument("--ambient", type=number(float, minimum=-40, maximum=60), default=38.0,
                   help="ambient temperature in C (default 38)")
    p.add_argument("--battery", type=number(float, minimum=0, maximum=100), default=54.0,
                   help="initial battery charge in %% of 5,000 mAh; 0 runs on mains (default 54)")
    p.add_argument("--json", action="store_true", help="print only the summary, as one JSON object")


def run(args, clock=SYSTEM_CLOCK, out=print) -> int:
    from device.agent.agent import Agent
    from device.cliargs import load_config
    from drivers.sim.board import VirtualBoard
    from drivers.sim.clock import ScaledClock

    cfg = load_config(args)
    seconds = cfg.demo.seconds if args.seconds is None else args.seconds
    profile = args.sim or cfg.drivers.virtual_board or "rpi4"
    if args.json:
        out = _quiet
    with tempfile.TemporaryDirectory(prefix="fieldnode-demo-") as tmp:
        overrides = {"device.state_dir": tmp, "link.broker": "", "drivers.virtual_board": profile}
        if args.isolation:
            overrides["runtime.isolation"] = args.isolation
        cfg = cfg.with_overrides(overrides)
        battery = args.battery if args.battery > 0 else None
        board = VirtualBoard(os.path.join(tmp, "board"), profile, clock=ScaledClock(args.speed),
                             ambient_c=args.ambient, battery_mah=5000.0 if battery else None,
                             soc_pct=battery or 100.0, mains=battery is None)
        score = _Score()
        agent = Agent(cfg, board=board, on_event=lambda kind, data: _echo(out, kind, data), on_result=score.add,
                      control=False)  # the control socket is the service's, were one running
        score.source = agent.mcu.source
        summary = _watch(agent, board, score, seconds, clock, out)
    if args.json:
        print(json.dumps(summary))
    else:
        out(_summary_line(summary))
    return Exit.OK if summary["ok"] else Exit.FAILED


def _quiet(line: str) -> None:
    pass


class _Score:
    """Agreement between results and the simulated machine's state (windows that straddle a change skipped)."""

    def __init__(self):
        self.source = None
        self.correct = self.judged = 0
        self.counts: dict[str, int] = {}
        self.last = ("-", 0.0)
        self._prev = None

    def add(self, result) -> None:
        state = self.source.state
        self.counts[result.label] = self.counts.get(result.label, 0) + 1
        self.last = (result.label, result.score)
        if state == self._prev:
            self.judged += 1
            self.correct += result.label == state
        self._prev = state

    def agreement(self, digits: int) -> str:
        return f"{100.0 * self.correct / self.judged:.{digits}f}%" if self.judged else "-"


def _watch(agent, board, score: _Score, seconds: float, clock, out) -> dict:
    b, rt = board, agent.runtime
    out(f"fieldnode demo: model {rt.manifest.name} {rt.manifest.version}, variants {', '.join(rt.manifest.variants)}; "
        f"virtual {b.profile.name} at {b.ambient_c:g} C ambient, "
        f"{'battery %.0f%%' % b.soc if b.soc is not None else 'mains'}, board time x{b.clock.factor:g}; "
        f"sensor on {agent.mcu.port}; {seconds:g} s")
    runner = Thread(target=agent.run, name="demo-agent", daemon=True)
    runner.start()
    try:
        while rt.variant is None and runner.is_alive():  # the first worker is loading
            threading.Event().wait(0.02)
        st = rt.status()
        out(f"backend {st['backend']} {st['backend_version']}, delegate {st['delegate']}, isolation "
            f"{st['isolation']}, threads {st['threads']}, variant {st['variant']}")
        start = clock.monotonic()
        next_line = start + 1.0
        while clock.monotonic() - start < seconds and runner.is_alive():
            clock.sleep(min(0.1, next_line - clock.monotonic()))
            if clock.monotonic() >= next_line:
                next_line += 1.0
                _line(agent, score, clock.monotonic() - start, out)
    finally:
        agent.stop()
        runner.join(60)
    s, h, g = rt.status(), agent.sensor.health(), agent.governor.status()
    return {"ok": agent.failures == 0 and agent.results > 0, "simulated": True, "virtual_board": b.profile.name,
            "results": agent.results, "failures": agent.failures,
            "agreement_pct": round(100.0 * score.correct / score.judged, 1) if score.judged else None,
            "p50_ms": s["latency"]["p50_ms"], "p99_ms": s["latency"]["p99_ms"], "swaps": s["swaps"],
            "level": g["level"], "level_changes": g["changes"], "sensor_frames": h.frames,
            "crc_errors": h.crc_errors, "seq_gaps": h.seq_gaps, "classes": dict(score.counts),
            "backend": s["backend"], "delegate": s["delegate"]}


def _summary_line(r: dict) -> str:
    agree = "-" if r["agreement_pct"] is None else f"{r['agreement_pct']:.1f}%"
    classes = ", ".join(f"{k} {v}" for k, v in sorted(r["classes"].items())) or "none"
    return (f"done: {r['results']} results, {r['failures']} failures, agreement with the simulated truth {agree}, "
            f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, swaps {r['swaps']}, governor level {r['level']} after "
            f"{r['level_changes']} change{'' if r['level_changes'] == 1 else 's'}, sensor frames {r['sensor_frames']} (crc errors {r['crc_errors']}, "
            f"gaps {r['seq_gaps']}), classes: {classes}")


def _line(agent, score: _Score, t: float, out) -> None:
    st = agent.board.state()
    s = agent.runtime.status()
    lat = s["latency"]["p50_ms"]
    plan = agent.governor.plan
    battery = f"{st.soc_pct:.1f}%" if st.soc_pct is not None else "mains"
    out(f"t={t:4.1f}s board={st.t / 60:5.1f}min level={plan.level.label:<11} temp={st.temp_c:5.1f}C "
        f"cap={(plan.cpu_max_khz or 0) // 1000}MHz batt={battery} {s['backend']}/{s['delegate']} "
        f"variant={s['variant'] or '-':<4} threads={s['threads']} p50={lat if lat is not None else float('nan'):.3f}ms "
        f"results={agent.results} failures={agent.failures} last={score.last[0]}({score.last[1]:.2f}) "
        f"truth={score.source.state} agree={score.agreement(0)}")


def _echo(out, kind: str, data: dict) -> None:
    # A delegate fallback is already one warning line from the runtime: saying it again is noise.
    if kind != "delegate_fallback":
        out(f"event {kind}: {_short(data)}")


def _short(data: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in data.items() if v not in (None, "", []))
