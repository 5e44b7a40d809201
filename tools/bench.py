"""``fieldnode bench``: measure a model through the agent's runtime against the bare interpreter.

Like TFLite's benchmark_model, plus the comparison that matters for an isolated runtime: in the same run,
the bare interpreter's ``invoke()`` on the same model, input and thread count (``raw_p50_ms``), with the two
measurements alternated so that drift (thermal, frequency, other load) hits both alike. ``overhead_ratio``
is ``p50_ms / raw_p50_ms``. Outputs are compared bit for bit at the end (``identical``).

The runtime loads exactly the variant asked for (no fallback to another variant), and an explicit
``--delegate edgetpu``/``gpu`` that cannot be used is an error (``delegate_unavailable``, with the reason)
unless ``runtime.delegate_fallback`` allows the CPU. An error is one line on stderr and, with ``--json``,
``{"ok": false, "error": {"code", "message"}}`` on stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from device.errors import Exit

BLOCK = 10  # inferences per side between switches (see run_bench)


def add_arguments(p) -> None:
    from device.cliargs import nonnegative_float, number, positive_int

    p.add_argument("model", help="a .tflite file or a model directory with model.json")
    p.add_argument("--variant", default="auto", help="variant of a model directory (default: auto)")
    p.add_argument("--runs", type=positive_int, default=200, help="timed inferences (default 200)")
    p.add_argument("--warmup", type=number(int, minimum=0), default=20, help="untimed inferences first (default 20)")
    p.add_argument("--threads", type=positive_int, default=None, help="interpreter threads (default: config)")
    p.add_argument("--isolation", choices=("process", "inline"), default=None, help="default: config")
    p.add_argument("--delegate", choices=("auto", "cpu", "edgetpu", "gpu"), default=None, help="default: config")
    p.add_argument("--backend", choices=("auto", "litert", "tflite"), default=None, help="default: config")
    p.add_argument("--pace-ms", type=nonnegative_float, default=0.0,
                   help="idle this long before each inference, as at a sensor's pace (default 0: back to back)")
    p.add_argument("--stages", action="store_true",
                   help="also report where a request's time goes, stage by stage (process isolation)")
    p.add_argument("--no-raw", action="store_true", help="skip the bare-interpreter comparison")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")


def rss_mb(pid: int | None = None) -> float | None:
    """Resident set size of a process in MiB, from /proc (None where there is no /proc)."""
    try:
        with open(f"/proc/{pid or 'self'}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        return None
    return None


def _pcts(samples_ns) -> tuple:
    a = np.asarray(samples_ns, dtype=np.float64) / 1e6
    return tuple(round(float(x), 4) for x in np.percentile(a, (50, 95, 99)))


def run_bench(model: str, variant: str = "auto", runs: int = 200, warmup: int = 20, threads: int = 2,
              isolation: str = "process", delegate: str = "auto", backend: str = "auto", raw: bool = True,
              pace_ms: float = 0.0, stages: bool = False, progress=None, delegate_fallback: bool = False) -> dict:
    """Benchmarks ``model`` and returns the report as a dict (see the module docstring).

    Raises:
        DelegateUnavailable: an explicit ``delegate`` cannot be used and ``delegate_fallback`` is False.
        RuntimeFault: the variant cannot be loaded (invalid file, worker crash...).
    """
    from device.runtime.backends import load_backend
    from device.runtime.manifest import load_manifest
    from device.runtime.runtime import Runtime, RuntimeSettings
    from device.runtime.tensors import random_input

    manifest = load_manifest(model)
    settings = RuntimeSettings(backend=backend, delegate=delegate, isolation=isolation, threads=threads,
                               warmup_runs=0, variant=variant, delegate_fallback=delegate_fallback)
    rt = Runtime(settings, manifest=manifest)
    t0 = time.perf_counter_ns()
    rt.start(strict=True)
    init_ms = (time.perf_counter_ns() - t0) / 1e6
    try:
        eng = rt._engine
        rng = np.random.default_rng(0)
        inputs = [random_input(s, rng) for s in eng.inputs]
        t0 = time.perf_counter_ns()
        rt.infer(*inputs)
        first_ms = (time.perf_counter_ns() - t0) / 1e6

        bare = None
        if raw:
            b = load_backend(eng.info["backend"])
            bare = b.Interpreter(model_path=eng.info["path"], num_threads=threads)
            bare.allocate_tensors()
            bare_in = [bare.tensor(s.index) for s in eng.inputs]
            bare_out = [bare.tensor(s.index) for s in eng.outputs]
            for fn, x in zip(bare_in, inputs):
                np.copyto(fn(), x)

        for _ in range(warmup):
            rt.infer(*inputs)
            if bare is not None:
                bare.invoke()

        ours, theirs, staged = [], [], []
        clock = time.perf_counter_ns

        pace_s = pace_ms / 1000.0

        def bare_block(n: int) -> None:
            for _ in range(n):
                if pace_s:
                    time.sleep(pace_s)
                t = clock(); bare.invoke(); theirs.append(clock() - t)  # noqa: E702

        # Alternate in blocks of BLOCK inferences, each side back to back as benchmark_model runs it, and
        # alternate which side leads. Drift within a block is negligible and cancels over the run; a
        # request-by-request alternation would instead make every request of each side pay for the other
        # side having just run (a cold cache, a woken CPU).
        last_report = time.monotonic()
        done = 0
        while done < runs:
            n = min(BLOCK, runs - done)
            bare_first = bare is not None and (done // BLOCK) % 2 == 1
            if bare_first:
                bare_block(n)
            for _ in range(n):
                if pace_s:
                    time.sleep(pace_s)
                t = clock()
                rt.infer(*inputs)
                ours.append(clock() - t)
                if stages:
                    staged.append(eng.last_stages())
            if bare is not None and not bare_first:
                bare_block(n)
            done += n
            if progress is not None and time.monotonic() - last_report >= 1.0:
                last_report = time.monotonic()
                progress(done, runs)

        identical = None
        if bare is not None:
            got = rt.infer(*inputs).outputs
            bare.invoke()
            identical = all(np.array_equal(g, fn()) for g, fn in zip(got, bare_out))

        st = rt.status()
        p50, p95, p99 = _pcts(ours)
        report = {
            "model": os.path.basename(eng.info["path"]),
            "variant": st["variant"],
            "backend": st["backend"],
            "backend_version": st["backend_version"],
            "delegate": st["delegate"],
            "delegate_fallbacks": st["delegate_fallbacks"],
            "isolation": isolation,
            "threads": threads,
            "runs": runs,
            "pace_ms": pace_ms,
            "init_ms": round(init_ms, 3),
            "first_ms": round(first_ms, 3),
            "p50_ms": p50,
            "p95_ms": p95,
            "p99_ms": p99,
            "rss_mb": rss_mb(rt.worker_pid) if isolation == "process" else rss_mb(),
            "agent_rss_mb": rss_mb(),
        }
        if stages and staged and staged[0] is not None:
            report["stages_us"] = {k: round(float(np.median([d[k] for d in staged])) / 1000.0, 1)
                                   for k in staged[0]}
        if bare is not None:
            rp50, rp95, rp99 = _pcts(theirs)
            report.update({
                "raw_p50_ms": rp50,
                "raw_p95_ms": rp95,
                "raw_p99_ms": rp99,
                "overhead_ratio": round(p50 / rp50, 4) if rp50 else None,
                "overhead_us": round((p50 - rp50) * 1000.0, 1),
                "identical": identical,
            })
        return report
    finally:
        rt.close()


def run(args) -> int:
    from device.cliargs import load_config

    # An error (a model that will not load, a delegate that is missing) is printed by the command line: one line
    # on stderr, and with --json the error object on stdout too.
    cfg = load_config(args).runtime
    report = run_bench(
        args.model, variant=args.variant, runs=args.runs, warmup=args.warmup,
        threads=args.threads or cfg.threads, isolation=args.isolation or cfg.isolation,
        delegate=args.delegate or cfg.delegate, backend=args.backend or cfg.backend, raw=not args.no_raw,
        pace_ms=args.pace_ms, stages=args.stages, delegate_fallback=cfg.delegate_fallback,
        progress=lambda i, n: print(f"bench: {i}/{n} runs", file=sys.stderr, flush=True),
    )
    if args.json:
        print(json.dumps(report))
    else:
        from device.cliargs import for_people

        width = max(len(k) for k in report)
        for k, v in report.items():
            print(f"{k:<{width}}  {for_people(v, none='-')}")
    return Exit.OK if report.get("identical") in (True, None) else Exit.FAILED
