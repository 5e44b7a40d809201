"""The installer's model side: the new slot's ``model.json`` and the validation of a staged model in a worker.

A release carries weights (one ``.tflite`` per variant) and, optionally, test vectors; it carries no labels, no
input description and no variant costs. The new slot's manifest is therefore built from a **template**: the
model that serves now (the active slot's, else the configured or bundled model). A release changes weights,
never labels or the input (a manifest target is future work, see docs/updates.md).

Validation loads each variant in a real inference worker (``isolation="process"``, a strict start, so a model
that crashes the interpreter takes down only that worker) and runs its test vectors with
:func:`device.runtime.selftest.check_variant`; a variant without vectors gets a finite-output probe instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np

from device.errors import FieldnodeError
from device.runtime.manifest import MANIFEST_NAME, ModelManifest, parse_manifest
from device.update.errors import ValidationFailed

log = logging.getLogger(__name__)

TOLERANCE_STEPS = 2  # what separates kernels that round differently from a wrong model (device/runtime/selftest.py)
PROBE_RUNS = 3
_TEMPLATE_META = ("input", "output", "description")  # per-variant accuracy belongs to the old weights: dropped


def model_file(name: str, variant: str) -> str:
    """The file name of a released variant in the new slot."""
    return f"{name}_{variant}.tflite"


def vectors_file(name: str, variant: str | None = None) -> str:
    """The file name of test vectors in the new slot: shared by every variant, or one variant's own."""
    return f"{name}_testvectors.npz" if variant is None else f"{name}_{variant}_testvectors.npz"


def build_manifest(template: ModelManifest, name: str, version: int, releases, vectors: str | None) -> dict:
    """The new slot's ``model.json`` as data.

    Args:
        template: The model that serves now: labels, input, output and variant costs come from it.
        name: The release's model name. version: Its integer version.
        releases: The released variants (``variant``, ``requires``), in the order they are listed.
        vectors: The shared test-vector file's name in the slot, or None.

    Returns:
        The manifest, checked with :func:`~device.runtime.manifest.parse_manifest`.

    Raises:
        ValidationFailed: The result is not a valid manifest (an Edge TPU variant with no CPU variant released
            beside it, a variant name a manifest cannot take).
    """
    cpu = [r.variant for r in releases if r.requires is None]
    variants = {}
    for r in releases:
        old = template.variants.get(r.variant)
        spec: dict = {"file": model_file(name, r.variant), "cost": old.cost if old is not None else 1.0}
        if r.requires is not None:
            fallback = old.cpu_variant if old is not None and old.cpu_variant in cpu else (cpu[0] if cpu else None)
            if fallback is None:
                raise ValidationFailed(f"{name} v{version}: variant {r.variant!r} needs an {r.requires} and no CPU "
                                       f"variant is released beside it to fall back to")
            spec.update(requires=r.requires, cpu_variant=fallback)
        variants[r.variant] = spec
    default = template.default_variant if template.default_variant in variants else (cpu or list(variants))[0]
    doc: dict = {"name": name, "version": str(version), "labels": list(template.labels),
                 "default_variant": default, "variants": variants}
    doc.update({k: template.meta[k] for k in _TEMPLATE_META if k in template.meta})
    if vectors is not None:
        doc["testvectors"] = vectors
    try:
        parse_manifest(doc, ".", source=f"{name} v{version} {MANIFEST_NAME}")
    except FieldnodeError as exc:
        raise ValidationFailed(f"{name} v{version}: cannot build its {MANIFEST_NAME}: {exc}") from exc
    return doc


def manifest_bytes(doc: dict) -> bytes:
    """``model.json`` as written into the slot."""
    return (json.dumps(doc, indent=2) + "\n").encode()


def validate(manifest: ModelManifest, settings, vectors: dict, *, tolerance: int = TOLERANCE_STEPS,
             rng: np.random.Generator | None = None) -> list:
    """Loads each variant of a staged model in a worker and checks it.

    Args:
        manifest: The staged model (``load_manifest`` of the staging directory).
        settings: The board's :class:`~device.runtime.runtime.RuntimeSettings` (backend, delegate, threads).
        vectors: ``{variant: path of its test vectors or None}``; None runs the finite-output probe.
        tolerance: Allowed difference in quantization steps.
        rng: Randomness of the probe's inputs.

    Returns:
        One result per variant: ``{"variant", "check": "vectors"|"probe", ...}`` (selftest's fields for vectors).

    Raises:
        ValidationFailed: Names the variant and what failed: it does not load, its worker crashed, its outputs
            miss the vectors (the worst difference) or are not finite.
    """
    from device.runtime.runtime import Runtime
    from device.runtime.selftest import check_variant, load_vectors

    results = []
    for name, variant in manifest.variants.items():
        where = f"{manifest.name} v{manifest.version}, variant {name}"
        delegate = settings.delegate
        if variant.requires is None and delegate == "edgetpu":  # the Edge TPU runs only its own files
            delegate = "cpu"
        s = dataclasses.replace(settings, isolation="process", variant=name, delegate=delegate,
                                model=manifest.root)
        rt = Runtime(s, manifest=manifest)  # quarantine in memory: a validation failure marks nothing on disk
        try:
            rt.start(strict=True)
            path = vectors.get(name)
            if path is not None:
                result = check_variant(rt, load_vectors(path), name, tolerance)
                if not result["ok"]:
                    raise ValidationFailed(_missed(where, result, tolerance))
                results.append(dict(result, check="vectors"))
            else:
                results.append(_probe(rt, where, name, rng or np.random.default_rng()))
        except ValidationFailed:
            raise
        except FieldnodeError as exc:  # the runtime's family: cannot load, crashed, refused the inputs
            raise ValidationFailed(f"{where}: [{getattr(exc, 'code', 'error')}] {exc}") from exc
        except (ValueError, TypeError, IndexError) as exc:  # vectors shaped for another model
            raise ValidationFailed(f"{where}: test vectors do not fit this model ({exc})") from exc
        finally:
            rt.close()
    return results


def _missed(where: str, result: dict, tolerance: int) -> str:
    if "error" in result:
        return f"{where}: test vectors: {result['error']}"
    top = "" if result["top_class_match"] else ", and the top class differs"
    return (f"{where}: test vectors: worst difference {result['max_diff_steps']} quantization steps over "
            f"{result['vectors']} vectors (at most {tolerance} allowed){top}")


def _probe(rt, where: str, name: str, rng: np.random.Generator) -> dict:
    """Random inputs across each input tensor's range; every output must be finite."""
    from device.runtime.tensors import dequantize, random_input

    # The runtime has no public accessor for its tensor specs; fieldnode bench reads them the same way.
    engine = rt._engine
    for _ in range(PROBE_RUNS):
        inputs = [random_input(spec, rng) for spec in engine.inputs]
        result = rt.infer(*inputs)
        for spec, raw in zip(engine.outputs, result.outputs):
            if not np.all(np.isfinite(dequantize(spec, raw))):
                raise ValidationFailed(f"{where}: finite-output probe (no test vectors): an output is not finite")
    return {"variant": name, "check": "probe", "ok": True, "runs": PROBE_RUNS}
