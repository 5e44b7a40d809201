"""The structural flatbuffer check refuses truncated and mis-pointed files before an interpreter sees them
(tflite-runtime 2.14 would crash on them), and accepts every model we ship."""

import glob
import struct

import pytest

from device.runtime.errors import ModelInvalid
from device.runtime.flatbuf import verify_model_bytes
from tests.conftest import ROOT
from tests.runtime.crashmodel import make_crashing_model

SHIPPED = sorted(glob.glob(str(ROOT / "device" / "models" / "*" / "*.tflite"))
                 + glob.glob(str(ROOT / "tests" / "models" / "*.tflite")))


def test_every_shipped_model_passes():
    assert len(SHIPPED) >= 5
    for path in SHIPPED:
        verify_model_bytes(open(path, "rb").read(), path)


@pytest.mark.parametrize("path", SHIPPED[:3])
def test_every_truncation_is_refused_with_the_reason(path):
    data = open(path, "rb").read()
    step = max(1, len(data) // 150)
    for cut in range(8, len(data), step):
        with pytest.raises(ModelInvalid, match="truncated or corrupt flatbuffer") as err:
            verify_model_bytes(data[:cut], "m.tflite")
        assert f"the file has {cut} bytes" in str(err.value)


def test_root_offset_outside_the_file_is_named():
    data = bytearray(open(SHIPPED[0], "rb").read())
    struct.pack_into("<I", data, 0, len(data) + 100)
    with pytest.raises(ModelInvalid, match="the model table starts at byte"):
        verify_model_bytes(bytes(data), "m.tflite")


def test_a_model_without_subgraphs_is_refused():
    # A minimal flatbuffer: root offset, identifier, an empty vtable and a table with no fields.
    vt = struct.pack("<HH", 4, 4)
    data = struct.pack("<I", 12) + b"TFL3" + vt + struct.pack("<i", 4)
    with pytest.raises(ModelInvalid, match="no subgraphs"):
        verify_model_bytes(data, "m.tflite")


def test_the_crash_test_model_still_passes_so_the_crash_tests_reach_the_interpreter():
    for path in SHIPPED:
        verify_model_bytes(make_crashing_model(open(path, "rb").read()), path)
