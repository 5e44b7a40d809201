"""Every malformed model manifest is refused with an error naming the manifest and the field."""

import json

import pytest

from device.runtime.errors import ModelInvalid
from device.runtime.manifest import bundled_model_dir, load_manifest, parse_manifest

GOOD = {"name": "vib", "version": "1.0.0", "labels": ["a", "b"], "default_variant": "full",
        "variants": {"full": {"file": "f.tflite", "cost": 1.0}, "lite": {"file": "l.tflite", "cost": 0.25}}}


def with_(**changes):
    d = json.loads(json.dumps(GOOD))
    for k, v in changes.items():
        *parents, last = k.split("__")
        target = d
        for p in parents:
            target = target[p]
        if v is ...:
            del target[last]
        else:
            target[last] = v
    return d


def test_good_manifest_parses_with_absolute_paths(tmp_path):
    m = parse_manifest(GOOD, str(tmp_path))
    assert m.name == "vib" and m.default_variant == "full" and m.labels == ("a", "b")
    assert m.variant("lite").path == str(tmp_path / "l.tflite") and m.variant("lite").cost == 0.25
    assert m.cpu_fallback("full").name == "full"


@pytest.mark.parametrize("data,field,problem", [
    ([1, 2], "", "expected a JSON object, got list"),
    (with_(colour="red"), "colour", "unknown key"),
    (with_(name=...), "name", "expected a non-empty string"),
    (with_(name="a b"), "name", "must match"),
    (with_(version=3), "version", "expected a string"),
    (with_(labels="abc"), "labels", "expected a list of strings"),
    (with_(variants={}), "variants", "non-empty object"),
    (with_(variants__full="f.tflite"), "variants.full", "expected an object, got str"),
    (with_(variants__full__file=...), "variants.full.file", "expected a non-empty string"),
    (with_(variants__full__file="../x.tflite"), "variants.full.file", "relative .tflite path"),
    (with_(variants__full__file="/abs/x.tflite"), "variants.full.file", "relative .tflite path"),
    (with_(variants__full__file="x.bin"), "variants.full.file", "relative .tflite path"),
    (with_(variants__full__cost=0), "variants.full.cost", "expected a number in (0, 1000]"),
    (with_(variants__full__cost=True), "variants.full.cost", "expected a number"),
    (with_(variants__full__speed=1), "variants.full.speed", "unknown key"),
    (with_(variants__full__requires="tpu"), "variants.full.requires", "expected one of edgetpu"),
    (with_(variants__tpu={"file": "t_edgetpu.tflite"}), "variants.tpu.cpu_variant", "must name the CPU variant"),
    (with_(variants__tpu={"file": "t_edgetpu.tflite", "cpu_variant": "nope"}), "variants.tpu.cpu_variant",
     "not a CPU variant"),
    (with_(variants__auto={"file": "a.tflite"}), "variants.auto", "not be 'auto'"),
    (with_(default_variant="big"), "default_variant", "'big' is not one of the variants"),
    (with_(testvectors="../etc/passwd"), "testvectors", "relative file name"),
])
def test_malformed_manifests_name_the_field(tmp_path, data, field, problem):
    with pytest.raises(ModelInvalid) as err:
        parse_manifest(data, str(tmp_path), source="m.json")
    msg = str(err.value)
    assert msg.startswith("model manifest m.json: ")
    assert f": {field}: " in msg if field else True
    assert problem in msg


def test_edgetpu_file_name_implies_requirement(tmp_path):
    m = parse_manifest(with_(variants__tpu={"file": "f_edgetpu.tflite", "cpu_variant": "full"}), str(tmp_path))
    assert m.variant("tpu").requires == "edgetpu" and m.cpu_fallback("tpu").name == "full"


@pytest.mark.parametrize("raw,problem", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b" " * (64 * 1024 + 1), "larger than"),
])
def test_unreadable_manifest_files(tmp_path, raw, problem):
    (tmp_path / "model.json").write_bytes(raw)
    with pytest.raises(ModelInvalid, match=problem):
        load_manifest(str(tmp_path))


def test_missing_paths(tmp_path):
    with pytest.raises(ModelInvalid, match="cannot read"):
        load_manifest(str(tmp_path))
    with pytest.raises(ModelInvalid, match="no such file"):
        load_manifest(str(tmp_path / "x.tflite"))


def test_single_tflite_is_a_one_variant_model(tmp_path):
    p = tmp_path / "my model.tflite"
    p.write_bytes(b"x")
    m = load_manifest(str(p))
    assert list(m.variants) == ["default"] and m.name == "my_model"
    (tmp_path / "m_edgetpu.tflite").write_bytes(b"x")
    with pytest.raises(ModelInvalid, match="needs a model.json naming its cpu_variant"):
        load_manifest(str(tmp_path / "m_edgetpu.tflite"))


def test_unknown_variant_lists_the_known_ones(tmp_path):
    with pytest.raises(ModelInvalid, match=r"has no variant 'x' \(variants: full, lite\)"):
        parse_manifest(GOOD, str(tmp_path)).variant("x")


def test_bundled_model_manifest_is_valid_and_its_files_exist():
    import os

    m = load_manifest(bundled_model_dir())
    assert m.name == "vibration" and set(m.variants) >= {"full", "lite"}
    assert m.labels == ("normal", "imbalance", "bearing_fault", "loose_mount")
    assert all(os.path.isfile(v.path) for v in m.variants.values()) and os.path.isfile(m.testvectors)
    assert m.variant("lite").cost * 3 <= m.variant("full").cost
