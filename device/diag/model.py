"""Diag checks of inference: whether each accelerator delegate really loads, and the installed model.

* ``delegates``: the interpreter backend, and for each accelerator this board has (or the config asks for) a
  real load of its delegate library. The load runs in a child process with a timeout: a delegate library is
  native code that may crash or hang, and the technician's verdict must still come. An accelerator the
  running agent holds is reported from its status (an Edge TPU opens in one process at a time).
* ``models``: the model the agent serves (``runtime.model``, else the update store's active slot, else the
  bundled one) against its shipped test vectors (``fieldnode selftest``'s own check, every CPU variant), then
  the latency of the variant the runtime picks, run as the agent runs it, against the baseline recorded on
  this board: the first diag records it in ``<state_dir>/diag-baseline.json`` (one entry per model version,
  variant, backend, delegate, threads and isolation), later runs compare with it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from device.diag.checks import Check, fail, ok, register, warn, worst

LATENCY_FACTOR = 2.0  # p50 this many times the recorded baseline: the board got slower
ROUNDS = 3  # passes over the test vectors for the latency
BASELINE_FILE = "diag-baseline.json"
BACKEND_REMEDY = "install an interpreter: pip install ai-edge-litert (or tflite-runtime with numpy<2 on Python 3.11)"

_PROBE = """
import json, sys
from device.runtime.backends import load_backend
from device.runtime.delegates import EDGETPU_LIBRARY, GPU_LIBRARIES, _load
backend, kind, device, gpu = sys.argv[1:5]
libs = (EDGETPU_LIBRARY,) if kind == "edgetpu" else ((gpu,) if gpu else GPU_LIBRARIES)
opts = {"device": device} if kind == "edgetpu" and device else {}
d, why = _load(load_backend(backend), libs, opts)
print(json.dumps({"loaded": d is not None, "why": why}))
"""


def probe_delegate(backend: str, kind: str, edgetpu_device: str, gpu_library: str, timeout: float) -> tuple[bool, str]:
    """Loads a delegate in a child process (the runtime's own loader); ``(loaded, why not)``."""
    import device

    root = os.path.dirname(os.path.dirname(os.path.abspath(device.__file__)))  # where `device` is importable from
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, backend, kind, edgetpu_device, gpu_library],
                              capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return False, f"loading it did not finish within {timeout:.1f} s"
    if proc.returncode < 0:
        return False, f"loading it crashed the process (signal {-proc.returncode})"
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        return bool(out["loaded"]), str(out["why"])
    except (ValueError, IndexError, KeyError, TypeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"the probe failed: {tail}"


def _agent_runtime(ctx) -> dict:
    if ctx.sim:
        return {}
    status, _why = ctx.agent()
    rt = status.get("runtime") if status else None
    return rt if isinstance(rt, dict) else {}


@register("delegates")
def check_delegates(ctx) -> Check:
    from device.errors import FieldnodeError
    from device.runtime.backends import load_backend

    rc = ctx.cfg.runtime
    try:
        backend = load_backend(rc.backend)
    except FieldnodeError as exc:
        return fail("delegates", str(exc), BACKEND_REMEDY)
    acc = ctx.accelerators()
    wanted = []
    if rc.delegate == "edgetpu" or (rc.delegate == "auto" and acc.has_edgetpu):
        wanted.append("edgetpu")
    if rc.delegate == "gpu" or (rc.delegate == "auto" and acc.jetson is not None and acc.jetson.gpu):
        wanted.append("gpu")
    in_use = _agent_runtime(ctx).get("delegate")
    found, parts = [], [f"backend {backend.name} {backend.version}, delegate = {rc.delegate}"]
    for kind in wanted:
        if in_use == kind:
            parts.append(f"{kind}: in use by the running agent")
            continue
        if kind == "edgetpu" and ctx.held_by_agent("delegates") is not None:  # a TPU opens once at a time
            parts.append("edgetpu: not probed, an agent that did not answer may hold it (run diag with sudo)")
            continue
        loaded, why = probe_delegate(backend.name, kind, rc.edgetpu_device, rc.gpu_delegate, ctx.remaining(8.0))
        if loaded:
            parts.append(f"{kind}: loads")
            continue
        what = f"the {kind} delegate does not load: {why}"
        fix = ("install libedgetpu (Coral's apt repository: libedgetpu1-std), check the udev rule, replug the TPU"
               if kind == "edgetpu" else "install the GPU delegate library, or set runtime.gpu_delegate to its path")
        if rc.delegate == kind and not rc.delegate_fallback:
            found.append(fail("delegates", f"{what}; runtime.delegate = {kind}, so the agent does not serve", fix))
        else:
            found.append(warn("delegates", f"{what}; inference falls back to the CPU", fix))
    if not wanted:
        parts.append("no accelerator delegate to load here: the CPU runs inference (XNNPACK)")
    return worst("delegates", found, "; ".join(parts))


# ------------------------------------------------------------------------------------------------- models


def serving_model(cfg) -> tuple[str, str]:
    """The model directory the agent would serve, and where that choice comes from."""
    from device.runtime.manifest import bundled_model_dir

    if cfg.runtime.model:
        return cfg.runtime.model, "runtime.model"
    root = os.path.join(cfg.device.state_dir, "update")
    if os.path.isdir(root):
        from device.update.store.store import ModelStore

        try:
            active = ModelStore(root, who="fieldnode diag").active()
        except Exception:  # a damaged store: the update_store check says why; the agent serves the bundled model
            active = None
        if active is not None:
            return active.dir, f"update store, {active.name} v{active.version} ({active.state})"
    return bundled_model_dir(), "bundled"


@register("models")
def check_models(ctx) -> Check:
    from device.errors import FieldnodeError
    from device.runtime.selftest import check_model

    cfg = ctx.cfg
    rt = _agent_runtime(ctx)
    if rt.get("delegate") == "edgetpu":  # it holds the TPU: its own figures, not a second load
        lat = (rt.get("latency") or {}).get("p50_ms")
        return ok("models", f"{rt.get('model')} {rt.get('model_version')} serves on the Edge TPU in the running agent "
                            f"(variant {rt.get('variant')}, p50 {lat} ms); test vectors not run while it holds the TPU")
    model_dir, source = serving_model(cfg)
    path = cfg.source if os.path.isfile(cfg.source) else None
    args = argparse.Namespace(config=path, model=model_dir, isolation=None, tolerance=2)
    try:
        report = check_model(args)  # fieldnode selftest's check: every CPU variant against the vectors
    except FieldnodeError as exc:
        return fail("models", f"{model_dir} ({source}): [{exc.code}] {exc}",
                    "reinstall the model (fieldnode update rollback, or reinstall fieldnode for the bundled one); "
                    "for a delegate error see the delegates check")
    bad = [r for r in report["variants"] if not r["ok"]]
    head = f"{report['model']} {report['version']} ({source})"
    if bad:
        why = "; ".join(f"{r['variant']}: " + (r.get("error") or f"off by {r.get('max_diff_steps')} steps, top class "
                                                                 f"{'matches' if r.get('top_class_match') else 'differs'}")
                        for r in bad)
        return fail("models", f"{head}: test vectors fail: {why}",
                    "the model or the interpreter is broken: fieldnode update rollback, or reinstall fieldnode")
    passed = ", ".join(r["variant"] for r in report["variants"])
    return worst("models", [_latency(ctx, model_dir)], f"{head}: test vectors pass ({passed}) on "
                                                       f"{report['backend']} {report['backend_version']}/{report['delegate']}")


def _latency(ctx, model_dir: str) -> Check:
    """The p50 of the variant the runtime picks, on the test vectors, against this board's recorded baseline."""
    from dataclasses import replace

    from device.runtime.manifest import load_manifest
    from device.runtime.runtime import Runtime, RuntimeSettings
    from device.runtime.selftest import load_vectors

    manifest = load_manifest(model_dir)
    inputs = load_vectors(manifest.testvectors)["inputs"]
    settings = RuntimeSettings.from_config(ctx.cfg.runtime)
    # The configured isolation, as the agent runs it: a worker also keeps the interpreter's native messages
    # (XNNPACK's INFO line) off the technician's terminal.
    settings = replace(settings, model="", start_timeout_s=min(settings.start_timeout_s, ctx.remaining(5.0)))
    rt = Runtime(settings, manifest=manifest)
    try:
        rt.start()
        if not rt.serving:
            st = rt.status()
            return fail("models", f"the runtime does not serve: {st.get('not_serving_reason')}",
                        "see the delegates check; fieldnode selftest -v shows the worker's messages")
        deadline = time.monotonic() + ctx.remaining(2.0)
        for _ in range(ROUNDS):
            for x in inputs:
                if time.monotonic() > deadline:
                    break
                rt.infer(x)
        st = rt.status()
    finally:
        rt.close()
    p50 = st["latency"]["p50_ms"]
    key = "/".join(str(v) for v in (manifest.name, manifest.version, st["variant"], st["backend"], st["delegate"],
                                    st["threads"], st["isolation"]))
    what = f"variant {st['variant']} p50 {p50:.3f} ms over {st['latency']['count']} inferences"
    base, note = _baseline(ctx.state_dir, key, p50)
    if base is not None and p50 > LATENCY_FACTOR * base["p50_ms"]:
        return warn("models", f"{what}: {p50 / base['p50_ms']:.1f}x the baseline {base['p50_ms']:.3f} ms recorded "
                              f"on this board", "the board got slower: see the throttle, thermal and cpufreq checks "
                                                "and the CPU load (top); after a hardware change delete "
                              f"{os.path.join(ctx.state_dir, BASELINE_FILE)} to record a new baseline")
    return ok("models", f"{what}{note}")


def _baseline(state_dir: str, key: str, p50: float) -> tuple[dict | None, str]:
    """The recorded baseline for ``key``, recording ``p50`` as it when there is none (and the directory allows)."""
    from device.statefile import write_atomic

    path = os.path.join(state_dir, BASELINE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    entry = data.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("p50_ms"), (int, float)) and entry["p50_ms"] > 0:
        return entry, f" (baseline {entry['p50_ms']:.3f} ms)"
    if not os.path.isdir(state_dir) or not os.access(state_dir, os.W_OK):
        return None, " (no baseline recorded: the state directory is not writable here)"
    data[key] = {"p50_ms": p50, "at": time.time()}
    try:
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode(), mode=0o644)
    except OSError as exc:
        return None, f" (no baseline recorded: {exc.strerror or exc})"
    return None, " (recorded as this board's baseline)"

