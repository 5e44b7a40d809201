"""Model manifests: a model's name, labels and named variants (``full``, ``lite``, ``edgetpu``...).

A model is a directory holding ``model.json`` and the files it names, or a single ``.tflite`` file (one
variant called ``default``). Every malformed manifest is refused with a :class:`ModelInvalid` that names the
manifest and the field.

``model.json``::

    {"name": "vibration", "version": "1.0.0", "labels": ["normal", ...],
     "default_variant": "full",
     "variants": {"full": {"file": "vibration_full.tflite", "cost": 1.0},
                  "lite": {"file": "vibration_lite.tflite", "cost": 0.25},
                  "edgetpu": {"file": "vibration_full_edgetpu.tflite", "cost": 0.1,
                              "requires": "edgetpu", "cpu_variant": "full"}},
     "testvectors": "vibration_testvectors.npz"}

A variant that ``requires`` the Edge TPU (or whose file ends in ``_edgetpu.tflite``) must name the CPU
variant to fall back to: without a TPU the runtime loads that one and never the edgetpu file.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from device.runtime.errors import ModelInvalid

MANIFEST_NAME = "model.json"
MAX_MANIFEST_BYTES = 64 * 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_KNOWN_KEYS = {"name", "version", "labels", "default_variant", "variants", "testvectors", "input", "output",
               "accuracy", "description"}
_VARIANT_KEYS = {"file", "cost", "accuracy", "requires", "cpu_variant", "description"}
REQUIRES = ("edgetpu",)


@dataclass(frozen=True)
class Variant:
    """One loadable form of a model.

    Attributes:
        name: the variant's name.
        path: absolute path of its ``.tflite`` file.
        cost: relative cost per inference (1.0 for the reference variant), used by the governor.
        requires: ``edgetpu`` when the file is compiled for the Edge TPU, else None.
        cpu_variant: for an Edge TPU variant, the CPU variant used when no TPU is there.
        accuracy: its accuracy on the model's held-out data (0..1], or None when the model does not say; the
            governor weighs a window classified by a cheaper variant by its accuracy relative to the default's.
    """

    name: str
    path: str
    cost: float = 1.0
    requires: str | None = None
    cpu_variant: str | None = None
    accuracy: float | None = None


@dataclass(frozen=True)
class ModelManifest:
    """A model and its variants, as read from ``model.json`` (or synthesised for a bare ``.tflite``)."""

    name: str
    version: str
    root: str
    variants: Mapping[str, Variant]
    default_variant: str
    labels: tuple = ()
    testvectors: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)

    def variant(self, name: str) -> Variant:
        """Returns the named variant.

        Raises:
            ModelInvalid: there is no such variant (the message lists the ones there are).
        """
        try:
            return self.variants[name]
        except KeyError:
            raise ModelInvalid(
                f"model {self.name!r} has no variant {name!r} (variants: {', '.join(self.variants)})"
            ) from None

    def cpu_fallback(self, name: str) -> Variant:
        """Returns the variant to run on the CPU in place of ``name`` (itself when it needs no accelerator)."""
        v = self.variant(name)
        return self.variant(v.cpu_variant) if v.requires else v


def load_manifest(path: str) -> ModelManifest:
    """Reads a model directory (with ``model.json``), a ``model.json`` path, or a single ``.tflite`` file.

    Raises:
        ModelInvalid: the path is missing, or the manifest is malformed; the message names the field.
    """
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST_NAME)
    if path.endswith(".tflite"):
        if not os.path.isfile(path):
            raise ModelInvalid(f"model file {path}: no such file")
        name = os.path.basename(path)[: -len(".tflite")]
        requires = "edgetpu" if name.endswith("_edgetpu") else None
        if requires:
            raise ModelInvalid(f"model file {path}: an Edge TPU model needs a model.json naming its cpu_variant")
        v = Variant("default", os.path.abspath(path))
        return ModelManifest(_safe_name(name), "", os.path.dirname(os.path.abspath(path)), {"default": v}, "default")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ModelInvalid(f"model manifest {path}: cannot read: {exc.strerror or exc}") from exc
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ModelInvalid(f"model manifest {path}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelInvalid(f"model manifest {path}: not valid JSON: {exc}") from exc
    return parse_manifest(data, os.path.dirname(os.path.abspath(path)), source=path)


def parse_manifest(data: Any, root: str, source: str = "model.json") -> ModelManifest:
    """Validates a decoded manifest; file names are resolved against ``root``.

    Raises:
        ModelInvalid: a field is missing, of the wrong type, or inconsistent.
    """

    def bad(key: str, msg: str) -> ModelInvalid:
        return ModelInvalid(f"model manifest {source}: {key}: {msg}")

    if not isinstance(data, dict):
        raise ModelInvalid(f"model manifest {source}: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - _KNOWN_KEYS)
    if unknown:
        raise bad(unknown[0], f"unknown key (known keys: {', '.join(sorted(_KNOWN_KEYS))})")
    name = _req_str(data, "name", bad)
    if not _NAME_RE.match(name):
        raise bad("name", f"must match {_NAME_RE.pattern}, got {name!r}")
    version = data.get("version", "")
    if not isinstance(version, str):
        raise bad("version", f"expected a string, got {type(version).__name__}")
    labels = data.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise bad("labels", "expected a list of strings")
    raw_variants = data.get("variants")
    if not isinstance(raw_variants, dict) or not raw_variants:
        raise bad("variants", "expected a non-empty object of variant name -> {file, cost}")
    variants = {}
    legacy_accuracy = data.get("accuracy", {})  # the older form: one map beside the variants
    if not isinstance(legacy_accuracy, dict):
        raise bad("accuracy", f"expected an object of variant name to accuracy, got {type(legacy_accuracy).__name__}")
    for vname, spec in raw_variants.items():
        key = f"variants.{vname}"
        if not _NAME_RE.match(vname) or vname == "auto":
            raise bad(key, "a variant name must match [A-Za-z0-9_.-]{1,64} and not be 'auto'")
        if not isinstance(spec, dict):
            raise bad(key, f"expected an object, got {type(spec).__name__}")
        extra = sorted(set(spec) - _VARIANT_KEYS)
        if extra:
            raise bad(f"{key}.{extra[0]}", f"unknown key (known keys: {', '.join(sorted(_VARIANT_KEYS))})")
        fname = _req_str(spec, "file", bad, prefix=key + ".")
        if os.path.isabs(fname) or ".." in fname.replace("\\", "/").split("/") or not fname.endswith(".tflite"):
            raise bad(f"{key}.file", f"must be a relative .tflite path inside the model directory, got {fname!r}")
        cost = spec.get("cost", 1.0)
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not 0 < cost <= 1000:
            raise bad(f"{key}.cost", f"expected a number in (0, 1000], got {cost!r}")
        requires = spec.get("requires")
        if requires is None and fname.endswith("_edgetpu.tflite"):
            requires = "edgetpu"
        if requires is not None and requires not in REQUIRES:
            raise bad(f"{key}.requires", f"expected one of {', '.join(REQUIRES)}, got {requires!r}")
        cpu_variant = spec.get("cpu_variant")
        if requires and not isinstance(cpu_variant, str):
            raise bad(f"{key}.cpu_variant", "an Edge TPU variant must name the CPU variant to fall back to")
        accuracy = spec.get("accuracy", legacy_accuracy.get(vname))
        if accuracy is not None and (isinstance(accuracy, bool) or not isinstance(accuracy, (int, float))
                                     or not 0 < accuracy <= 1):
            where = f"{key}.accuracy" if "accuracy" in spec else f"accuracy.{vname}"
            raise bad(where, f"expected a number in (0, 1], got {accuracy!r}")
        variants[vname] = Variant(vname, os.path.join(root, fname), float(cost), requires, cpu_variant,
                                  None if accuracy is None else float(accuracy))
    for v in variants.values():
        if v.cpu_variant is not None:
            target = variants.get(v.cpu_variant)
            if target is None or target.requires:
                raise bad(f"variants.{v.name}.cpu_variant", f"{v.cpu_variant!r} is not a CPU variant of this model")
    default = data.get("default_variant", next(iter(variants)))
    if default not in variants:
        raise bad("default_variant", f"{default!r} is not one of the variants ({', '.join(variants)})")
    tv = data.get("testvectors")
    if tv is not None and (not isinstance(tv, str) or os.path.isabs(tv) or ".." in tv.split("/")):
        raise bad("testvectors", "expected a relative file name")
    meta = {k: data[k] for k in ("input", "output", "accuracy", "description") if k in data}
    return ModelManifest(name, version, root, variants, default, tuple(labels),
                         os.path.join(root, tv) if tv else None, meta)


def _req_str(d: Mapping, key: str, bad, prefix: str = "") -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v:
        raise bad(prefix + key, f"expected a non-empty string, got {v!r}")
    return v


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64]
    return cleaned or "model"


def bundled_model_dir() -> str:
    """The directory of the vibration classifier that ships inside the package."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "vibration")
