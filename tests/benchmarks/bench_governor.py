"""Closed-loop governor figures on the virtual board, against every baseline a user could choose, in the same run.

One JSON line per scenario and profile (``power.scenarios``): ``scenario``, ``profile``, ``ratio_vs_best_static``,
``ratio_vs_best_kernel``, ``best_static``, ``best_kernel``, ``met`` and the figures behind them. The scenarios
(hot, rate, rate-light, target, solar, plug) and their targets are described in ``power/scenarios.py`` and
``docs/power.md``. Every static plan (frequency x threads x variant, with duty-cycle intervals where energy is
the limit) and the kernel's own cpufreq governors run on the same simulated board in the same run.

``--quick`` runs shorter scenarios (a smoke run, not the figures); ``--profile``/``--scenario`` narrow the run;
``--plot-dir DIR`` writes one PNG per scenario and profile (needs the dev-only ``plot`` extra, matplotlib).
Exits non-zero when a scenario could not run. Run with ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from drivers.sim.profiles import PROFILES, get_profile  # noqa: E402
from power import scenarios  # noqa: E402
from power.policy import Level, Policy  # noqa: E402
from power.simulate import Trace  # noqa: E402


def plot(name: str, profile: str, traces: list[Trace], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = [t for t in traces if t is not None and t.t]
    fig, axes = plt.subplots(4, 1, figsize=(9, 8.8), sharex=True)
    for tr in traces:
        hours = [t / 3600 for t in tr.t]
        style = "-" if tr.name == "governed" else "--"
        axes[0].plot(hours, tr.temp_c, style, label=tr.name, linewidth=1)
        k = max(1, int(round(60.0 / (tr.t[1] - tr.t[0])))) if len(tr.t) > 1 else 1
        freq = [sum(tr.freq_mhz[max(0, i - k + 1):i + 1]) / len(tr.freq_mhz[max(0, i - k + 1):i + 1])
                for i in range(len(tr.freq_mhz))]
        axes[1].plot(hours, freq, style, label=tr.name, linewidth=1)
        if tr.name == "governed":
            axes[2].step(hours, tr.level, where="post", linewidth=1)
        axes[3].plot(hours, tr.soc_pct, style, label=tr.name, linewidth=1)
    axes[0].axhline(get_profile(profile).soft_limit_c, color="red", linewidth=0.8, linestyle=":", label="soft throttle")
    axes[0].set_ylabel("SoC temp (C)")
    axes[0].legend(fontsize=7, loc="lower right")
    axes[1].set_ylabel("CPU MHz (1-min mean)")
    axes[2].set_ylabel("level")
    axes[2].set_yticks([int(lv) for lv in Level], [lv.label for lv in Level])
    axes[2].invert_yaxis()
    axes[3].set_ylabel("battery (%)")
    axes[-1].set_xlabel("simulated hours")
    fig.suptitle(f"{name}: {profile} virtual board")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", action="append", choices=sorted(PROFILES), help="profiles to run (default: all)")
    ap.add_argument("--scenario", action="append", choices=scenarios.SCENARIOS,
                    help="scenarios to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="shorter scenarios: a smoke run, not the figures")
    ap.add_argument("--plot-dir", help="write one PNG per scenario and profile here (needs matplotlib)")
    args = ap.parse_args(argv)
    policy = Policy.from_config()
    failed = 0
    for profile in args.profile or ("rpi4", "rpi5", "jetson-orin-nano"):
        for name in args.scenario or scenarios.SCENARIOS:
            t0 = time.monotonic()
            try:
                line, traces = scenarios.run(name, policy, profile, quick=args.quick)
            except Exception as exc:  # one scenario that cannot run must not hide the others' figures
                line, traces = {"scenario": name, "profile": profile, "error": f"{type(exc).__name__}: {exc}",
                                "met": False}, []
            if "error" in line:
                failed += 1
            line["bench_s"] = round(time.monotonic() - t0, 1)
            print(json.dumps(line), flush=True)
            if args.plot_dir and traces:
                os.makedirs(args.plot_dir, exist_ok=True)
                plot(name, profile, traces, os.path.join(args.plot_dir, f"governor_{name}_{profile}.png"))
    return 1 if failed else 0  # "met" carries the verdict on each target; an error is a benchmark failure


if __name__ == "__main__":
    sys.exit(main())
