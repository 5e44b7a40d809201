"""Each variant's held-out accuracy in model.json: read per variant (and from the older top-level map), refused
with the key named when it is not a number in (0, 1]."""

from __future__ import annotations

import pytest

from device.runtime.errors import ModelInvalid
from device.runtime.manifest import parse_manifest


def doc(**variant_extra) -> dict:
    return {"name": "m", "version": "1", "labels": ["a", "b"], "default_variant": "full",
            "variants": {"full": {"file": "m_full.tflite", **variant_extra}, "lite": {"file": "m_lite.tflite"}}}


def test_each_variant_carries_its_accuracy():
    m = parse_manifest(doc(accuracy=0.97), "/models/m")
    assert m.variants["full"].accuracy == 0.97 and m.variants["lite"].accuracy is None


def test_the_older_top_level_map_is_still_read():
    d = doc()
    d["accuracy"] = {"full": 0.97, "lite": 0.95}
    m = parse_manifest(d, "/models/m")
    assert (m.variants["full"].accuracy, m.variants["lite"].accuracy) == (0.97, 0.95)


@pytest.mark.parametrize("value", [0, 1.5, -0.1, "0.9", True, None])
def test_an_accuracy_that_is_not_a_share_is_refused_naming_the_key(value):
    if value is None:
        d = doc()
        d["accuracy"] = ["full", 0.9]
        with pytest.raises(ModelInvalid, match="accuracy"):
            parse_manifest(d, "/models/m")
        return
    with pytest.raises(ModelInvalid, match=r"variants\.full\.accuracy"):
        parse_manifest(doc(accuracy=value), "/models/m")


def test_a_bad_value_in_the_older_map_is_refused_naming_it():
    d = doc()
    d["accuracy"] = {"full": "high"}
    with pytest.raises(ModelInvalid, match=r"accuracy\.full"):
        parse_manifest(d, "/models/m")
