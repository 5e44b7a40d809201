"""``fieldnode selftest``: run each variant of a model on its shipped test vectors.

The vectors (``testvectors`` in model.json, an ``.npz`` with ``inputs``, ``labels`` and ``expected_<variant>``
raw outputs) were produced by the model maker with XNNPACK kernels. A variant passes when every output is within
``--tolerance`` quantization steps of the expected one and the top class matches. The default, 2 steps, is
what separates kernels that round differently (tflite-runtime 2.14 runs int8 on its reference kernels and
differs by up to 2 steps on the full vibration model; LiteRT with XNNPACK matches exactly) from a broken
install or a wrong model, which miss by far more. It is what a technician runs after an
install and what the update installer runs before switching to a new model.

Each variant is loaded on its own, exactly (no fallback to another variant): a variant that crashes its
worker or is refused fails with the reason, and the others are still checked. With ``delegate = "edgetpu"``
the variant the agent would run is loaded first, so a board without a usable Edge TPU fails at once with
``delegate_unavailable`` (and the CPU variants, which the Edge TPU cannot run, are checked on the CPU). An
explicit delegate that cannot be used is an error (one line on stderr, and ``{"ok": false, "error": {...}}``
with ``--json``), unless ``runtime.delegate_fallback`` allows the CPU.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace

import numpy as np

from device.errors import Exit
from device.runtime.errors import InferenceFailed, ModelInvalid


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="model directory (default: config runtime.model, else bundled)")
    p.add_argument("--isolation", choices=("process", "inline"), default=None, help="default: config")
    p.add_argument("--tolerance", type=int, default=2, help="allowed difference in quantization steps (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def load_vectors(path: str) -> dict:
    """Loads a test-vector file, refusing anything but plain arrays.

    Raises:
        ModelInvalid: the file is missing, not an npz, or lacks ``inputs``.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise ModelInvalid(f"test vectors {path}: cannot read: {exc}") from exc
    if "inputs" not in data:
        raise ModelInvalid(f"test vectors {path}: no 'inputs' array")
    return data


def check_variant(runtime, vectors: dict, variant: str, tolerance: int = 2) -> dict:
    """Runs ``vectors`` through ``runtime`` (already on ``variant``); returns a result dict."""
    expected = vectors.get(f"expected_{variant}")
    if expected is None:
        return {"variant": variant, "ok": False, "error": f"no expected_{variant} in the test vectors"}
    worst, top_ok = 0, True
    for x, want in zip(vectors["inputs"], expected):
        got = runtime.infer(x).outputs[0].reshape(want.shape)
        worst = max(worst, int(np.max(np.abs(got.astype(np.int32) - want.astype(np.int32)))))
        top_ok &= int(np.argmax(got)) == int(np.argmax(want))
    return {"variant": variant, "ok": worst <= tolerance and top_ok, "max_diff_steps": worst,
            "top_class_match": top_ok, "vectors": int(len(expected))}


def run(args) -> int:
    report = check_model(args)  # an error: the command line prints it (as JSON too with --json)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"model {report['model']} {report['version']} on {report['backend']} {report['backend_version']} / "
              f"{report['delegate']}")
        for r in report["variants"]:
            print(f"  {r['variant']:<8} {'PASS' if r['ok'] else 'FAIL'}  "
                  + ", ".join(f"{k}={v}" for k, v in r.items() if k not in ('variant', 'ok')))
    return Exit.OK if report["ok"] else Exit.FAILED


def check_model(args) -> dict:
    """Checks every CPU variant of the model that ``args`` names; returns the report.

    Raises:
        DelegateUnavailable: the configured explicit delegate cannot be used.
        ModelInvalid: the model or its test vectors cannot be read.
    """
    from device.cliargs import load_config
    from device.runtime.manifest import bundled_model_dir, load_manifest
    from device.runtime.runtime import Runtime, RuntimeSettings

    cfg = load_config(args)
    settings = RuntimeSettings.from_config(cfg.runtime)
    if args.isolation:
        settings = replace(settings, isolation=args.isolation)
    manifest = load_manifest(args.model or cfg.runtime.model or bundled_model_dir())
    if not manifest.testvectors:
        raise ModelInvalid(f"model {manifest.name!r} ships no test vectors")
    vectors = load_vectors(manifest.testvectors)
    st: dict = {}
    if settings.delegate == "edgetpu":  # the Edge TPU runs only *_edgetpu files: prove it is usable first
        with _started(Runtime(settings, manifest=manifest)) as rt:
            st = rt.status()
        settings = replace(settings, delegate="cpu")
    results, fallbacks = [], []
    for name in [v.name for v in manifest.variants.values() if not v.requires]:
        try:
            with _started(Runtime(replace(settings, variant=name), manifest=manifest)) as rt:
                results.append(check_variant(rt, vectors, name, args.tolerance))
                st = rt.status()
        except (ModelInvalid, InferenceFailed) as exc:  # this variant's fault: report it, check the others
            results.append({"variant": name, "ok": False, "error": f"[{exc.code}] {exc}"})
            continue
        fallbacks += [f for f in st.get("delegate_fallbacks", []) if f not in fallbacks]
        if settings.delegate == "auto" and st.get("delegate") in ("xnnpack", "cpu"):
            # auto settled on the CPU: the next variants need not try (and warn about) the same delegates again
            settings = replace(settings, delegate="cpu")
    ok = bool(results) and all(r["ok"] for r in results)
    return {"model": manifest.name, "version": manifest.version, "backend": st.get("backend"),
            "backend_version": st.get("backend_version"), "delegate": st.get("delegate"),
            "delegate_fallbacks": fallbacks, "ok": ok, "variants": results}


@contextlib.contextmanager
def _started(runtime):
    """``with _started(runtime) as rt``: a strict start (exactly that variant), closed on the way out."""
    try:
        runtime.start(strict=True)
        yield runtime
    finally:
        runtime.close()
