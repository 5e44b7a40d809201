"""Tensor metadata and the float <-> quantized conversions, shared by the in-process model and the worker.

A :class:`TensorSpec` is what the supervisor needs to lay out shared memory and to quantize inputs /
dequantize outputs without touching the interpreter. It is plain data, sent once when a worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from device.runtime.errors import InputInvalid


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of a model.

    Attributes:
        index: the interpreter's tensor index.
        name: the tensor's name in the model.
        shape: its shape.
        dtype: numpy dtype name (``int8``, ``uint8``, ``float32``...).
        scale: quantization scale, 0.0 when the tensor is not quantized.
        zero_point: quantization zero point.
    """

    index: int
    name: str
    shape: tuple
    dtype: str
    scale: float = 0.0
    zero_point: int = 0

    @classmethod
    def from_details(cls, d: Mapping[str, Any]) -> "TensorSpec":
        """Builds a spec from one entry of ``get_input_details()``/``get_output_details()``."""
        scale, zp = d.get("quantization", (0.0, 0)) or (0.0, 0)
        return cls(
            index=int(d["index"]),
            name=str(d.get("name", "")),
            shape=tuple(int(x) for x in d["shape"]),
            dtype=np.dtype(d["dtype"]).name,
            scale=float(scale),
            zero_point=int(zp),
        )

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def quantized(self) -> bool:
        """True when the tensor is integer with a nonzero scale."""
        return self.scale != 0.0 and self.np_dtype.kind in "iu"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.np_dtype.itemsize

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "scale": self.scale, "zero_point": self.zero_point}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(int(d["index"]), str(d["name"]), tuple(int(x) for x in d["shape"]), str(d["dtype"]),
                   float(d["scale"]), int(d["zero_point"]))


def write_input(spec: TensorSpec, value: Any, dest: np.ndarray, scratch: np.ndarray | None = None) -> None:
    """Writes ``value`` into ``dest`` (a view of the input tensor, or shared memory laid out like it).

    Values already in the tensor's dtype are copied straight in. Float values for a quantized tensor are
    quantized with the tensor's scale and zero point (round half to even, then clipped to the dtype's range).

    Args:
        spec: the input tensor's spec.
        value: an array-like of the tensor's shape (a leading batch dimension of 1 may be omitted).
        dest: where to write, shaped like ``spec.shape`` with ``spec.dtype``.
        scratch: an optional float32 array of ``spec.shape`` to quantize in, so no temporary is allocated.

    Raises:
        InputInvalid: the shape or dtype does not fit the tensor.
    """
    arr = np.asarray(value)
    if arr.shape != spec.shape:
        if arr.size == dest.size and (arr.shape == spec.shape[1:] or (1,) + arr.shape == spec.shape):
            arr = arr.reshape(spec.shape)
        else:
            raise InputInvalid(f"input {spec.name!r} must have shape {list(spec.shape)}, got {list(arr.shape)}")
    if arr.dtype == spec.np_dtype:
        np.copyto(dest, arr)
        return
    if arr.dtype.kind == "f" and spec.quantized:
        info = np.iinfo(spec.np_dtype)
        buf = scratch if scratch is not None else np.empty(spec.shape, np.float32)
        np.divide(arr, spec.scale, out=buf, casting="unsafe")
        np.rint(buf, out=buf)
        buf += spec.zero_point
        np.clip(buf, info.min, info.max, out=buf)
        np.copyto(dest, buf, casting="unsafe")
        return
    if arr.dtype.kind == "f" and spec.np_dtype.kind == "f":
        np.copyto(dest, arr, casting="same_kind")
        return
    raise InputInvalid(f"input {spec.name!r} is {spec.dtype}; cannot take {arr.dtype} values")


def dequantize(spec: TensorSpec, raw: np.ndarray) -> np.ndarray:
    """Returns ``raw`` as float32 real values (unchanged values, as float32, when not quantized)."""
    if spec.quantized:
        return (raw.astype(np.float32) - spec.zero_point) * np.float32(spec.scale)
    return raw.astype(np.float32, copy=False)


def random_input(spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    """A random input for ``spec``: its whole integer range, or standard-normal floats (benchmarks and probes)."""
    dt = spec.np_dtype
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, size=spec.shape, endpoint=True).astype(dt)
    return rng.standard_normal(spec.shape).astype(dt)
