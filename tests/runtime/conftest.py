"""Fixtures of the runtime tests."""

from __future__ import annotations

import shutil

import pytest

from device.runtime.manifest import load_manifest


@pytest.fixture
def tpu_model(tmp_path, vibration):
    """The vibration model plus an 'edgetpu' variant whose file is garbage: it must never be opened (no
    Edge TPU here). It ships the vibration test vectors, for selftest."""
    for v in ("full", "lite"):
        shutil.copyfile(vibration.variant(v).path, tmp_path / f"vib_{v}.tflite")
    shutil.copyfile(vibration.testvectors, tmp_path / "vib_testvectors.npz")
    (tmp_path / "vib_full_edgetpu.tflite").write_bytes(b"not a model at all")
    (tmp_path / "model.json").write_text("""{"name": "vib", "version": "1", "labels": ["a", "b", "c", "d"],
      "default_variant": "full", "testvectors": "vib_testvectors.npz",
      "variants": {"full": {"file": "vib_full.tflite"}, "lite": {"file": "vib_lite.tflite", "cost": 0.3},
                   "edgetpu": {"file": "vib_full_edgetpu.tflite", "cost": 0.1, "cpu_variant": "full"}}}""")
    return load_manifest(str(tmp_path))
