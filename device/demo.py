"""``fieldnode demo``: real inference on the virtual board's simulated vibration sensor.

The simulated machine (:mod:`drivers.sim.signal`, the same physics the model was trained on) changes state
on a schedule; every ``interval_ms`` the loop takes the next window of samples and classifies it through
the agent's runtime (an isolated worker by default). Half-way through it hot-swaps to the ``lite`` variant
while inference continues. One line per second shows the backend and delegate, the variant, the p50
latency and the results so far.
"""

from __future__ import annotations

import threading

from device.clock import SYSTEM_CLOCK


def add_arguments(p) -> None:
    p.add_argument("--seconds", type=float, default=None, help="how long to run (default: config demo.seconds)")
    p.add_argument("--interval-ms", type=int, default=None, help="time between inferences (default: config)")
    p.add_argument("--isolation", choices=("process", "inline"), default=None, help="default: config")
    p.add_argument("--variant", default=None, help="starting variant (default: config runtime.variant)")
    p.add_argument("--no-swap", action="store_true", help="do not hot-swap variants half-way")
    p.add_argument("--seed", type=int, default=7, help="seed of the simulated machine (default 7)")


def run(args, clock=SYSTEM_CLOCK, out=print) -> int:
    from device.cli import load_config
    from device.runtime.runtime import Runtime, RuntimeSettings
    from drivers.sim.signal import LABELS, WINDOW, VibrationSource, schedule

    cfg = load_config(args)
    overrides = {}
    if args.isolation:
        overrides["runtime.isolation"] = args.isolation
    if args.variant:
        overrides["runtime.variant"] = args.variant
    if overrides:
        cfg = cfg.with_overrides(overrides)
    seconds = cfg.demo.seconds if args.seconds is None else args.seconds
    interval = (cfg.demo.interval_ms if args.interval_ms is None else args.interval_ms) / 1000.0

    rt = Runtime(RuntimeSettings.from_config(cfg.runtime),
                 on_event=lambda kind, data: out(f"event {kind}: {_short(data)}"))
    source = VibrationSource(seed=args.seed)
    # The signal advances one window (256 ms) per inference, so segments are in signal time.
    source.follow(schedule(args.seed, max(seconds, 1.0) * WINDOW / 1000.0 / interval + 60, segment_s=(6.0, 12.0)))
    out(f"fieldnode demo: model {rt.manifest.name} {rt.manifest.version}, variants "
        f"{', '.join(rt.manifest.variants)}, {seconds:g} s")
    rt.start()
    st = rt.status()
    out(f"backend {st['backend']} {st['backend_version']}, delegate {st['delegate']}, isolation "
        f"{st['isolation']}, threads {st['threads']}, variant {st['variant']}")
    for fb in st["delegate_fallbacks"]:
        out(f"  fallback: {fb}")

    results = failures = correct = judged = 0
    swapper = None
    counts = {label: 0 for label in LABELS}
    start = clock.monotonic()
    next_tick = start
    next_line = start + 1.0
    swap_at = start + seconds / 2 if not args.no_swap and "lite" in rt.manifest.variants else None
    try:
        while True:
            now = clock.monotonic()
            if now - start >= seconds:
                break
            if swap_at is not None and now >= swap_at:
                target = "lite" if rt.variant != "lite" else rt.manifest.default_variant
                swapper = threading.Thread(target=rt.set_variant, args=(target,), name="demo-swap", daemon=True)
                swapper.start()  # the loop keeps inferring while the new worker loads
                swap_at = None
            state_before = source.state
            window = source.read(WINDOW)
            truth = source.state if source.state == state_before else None
            try:
                p = rt.predict(window)
            except Exception as exc:  # the demo reports failures and keeps going, as the agent does
                failures += 1
                out(f"inference failed: {exc}")
            else:
                results += 1
                counts[p.label] += 1
                if truth is not None:
                    judged += 1
                    correct += p.label == truth
                last = (p.label, p.score, truth, p.variant)
            if clock.monotonic() >= next_line:
                next_line += 1.0
                s = rt.status()
                lat = s["latency"]["p50_ms"]
                acc = f"{100.0 * correct / judged:.0f}%" if judged else "-"
                label, score, truth_now, variant = last if results else ("-", 0.0, None, s["variant"])
                out(f"t={clock.monotonic() - start:5.1f}s {s['backend']}/{s['delegate']} variant={variant:<5} "
                    f"p50={lat if lat is not None else float('nan'):.3f}ms results={results} failures={failures} "
                    f"last={label}({score:.2f}) truth={truth_now or 'changing'} agree={acc}")
            next_tick += interval
            clock.sleep(next_tick - clock.monotonic())
    finally:
        if swapper is not None:
            swapper.join()
        s = rt.status()
        rt.close()
    acc = f"{100.0 * correct / judged:.1f}%" if judged else "n/a"
    out(f"done: {results} results, {failures} failures, agreement with the simulated truth {acc}, "
        f"p50 {s['latency']['p50_ms']} ms, p99 {s['latency']['p99_ms']} ms, swaps {s['swaps']}, "
        f"classes {counts}")
    return 0 if failures == 0 and results > 0 else 1


def _short(data: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in data.items() if v not in (None, "", []))
