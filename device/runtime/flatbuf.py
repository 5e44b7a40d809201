"""A structural check of a TFLite flatbuffer, run before any interpreter sees the file.

tflite-runtime 2.14 does not verify the flatbuffer it is given: a truncated or cut-short file (the most
common corrupt model in the field: a copy or download that stopped early) makes it read past the end and
crash the process. This walks the parts of the ``Model`` table that reach the far end of the file (the
root table and its vtable, the subgraph and operator-code vectors, and every buffer's data) and refuses a
file whose offsets or lengths point outside it, naming what is out of bounds. It is not a full verifier;
a model that passes can still be malformed inside a subgraph, which is why inference runs in a worker.
"""

from __future__ import annotations

import struct

from device.runtime.errors import ModelInvalid

# Model table fields, in schema order (tensorflow/lite/schema/schema.fbs).
_F_OPERATOR_CODES, _F_SUBGRAPHS, _F_BUFFERS = 1, 2, 4
# Buffer table fields.
_B_DATA, _B_OFFSET, _B_SIZE = 0, 1, 2


class _Reader:
    def __init__(self, data: bytes, name: str) -> None:
        self.data, self.n, self.name = data, len(data), name

    def fail(self, what: str) -> ModelInvalid:
        return ModelInvalid(f"model file {self.name}: truncated or corrupt flatbuffer: {what} "
                            f"(the file has {self.n} bytes)")

    def u16(self, p: int) -> int:
        if not 0 <= p <= self.n - 2:
            raise self.fail(f"a vtable entry at byte {p} lies outside the file")
        return struct.unpack_from("<H", self.data, p)[0]

    def u32(self, p: int, what: str) -> int:
        if not 0 <= p <= self.n - 4:
            raise self.fail(f"{what} at byte {p} lies outside the file")
        return struct.unpack_from("<I", self.data, p)[0]

    def u64(self, p: int, what: str) -> int:
        if not 0 <= p <= self.n - 8:
            raise self.fail(f"{what} at byte {p} lies outside the file")
        return struct.unpack_from("<Q", self.data, p)[0]

    def table(self, t: int, what: str):
        """Returns a function mapping field number -> absolute position of the field (0 when absent)."""
        if not 0 < t <= self.n - 4:
            raise self.fail(f"{what} starts at byte {t}, outside the file")
        vt = t - struct.unpack_from("<i", self.data, t)[0]
        vsize = self.u16(vt)
        if vsize < 4 or vt + vsize > self.n or t + self.u16(vt + 2) > self.n:
            raise self.fail(f"the vtable of {what} runs past the end")

        def field(i: int) -> int:
            o = 4 + 2 * i
            off = self.u16(vt + o) if o < vsize else 0
            return t + off if off else 0

        return field

    def vector(self, at: int, elem: int, what: str) -> tuple[int, int]:
        """Follows the offset at ``at`` to a vector; returns (first element position, length)."""
        start = at + self.u32(at, f"the offset of {what}")
        length = self.u32(start, f"the length of {what}")
        end = start + 4 + length * elem
        if end > self.n:
            raise self.fail(f"{what} ({length} x {elem} bytes) ends at byte {end}, past the end")
        return start + 4, length


def verify_model_bytes(data: bytes, name: str) -> None:
    """Raises ModelInvalid when the top-level structure of a TFLite flatbuffer points outside ``data``."""
    r = _Reader(data, name)
    root = r.u32(0, "the root offset")
    model = r.table(root, "the model table")
    at = model(_F_SUBGRAPHS)
    if not at:
        raise r.fail("the model has no subgraphs")
    first, count = r.vector(at, 4, "the subgraph list")
    if count == 0:
        raise r.fail("the model has no subgraphs")
    for i in range(count):
        p = first + 4 * i
        r.table(p + r.u32(p, f"subgraph {i}"), f"subgraph {i}")
    at = model(_F_OPERATOR_CODES)
    if at:
        first, count = r.vector(at, 4, "the operator-code list")
        for i in range(count):
            p = first + 4 * i
            r.table(p + r.u32(p, f"operator code {i}"), f"operator code {i}")
    at = model(_F_BUFFERS)
    if not at:
        return
    first, count = r.vector(at, 4, "the buffer list")
    for i in range(count):
        p = first + 4 * i
        buf = r.table(p + r.u32(p, f"buffer {i}"), f"buffer {i}")
        if buf(_B_DATA):
            r.vector(buf(_B_DATA), 1, f"the data of buffer {i}")
        if buf(_B_OFFSET):
            # Buffers stored after the flatbuffer (models over 2 GB): offset and size from the file start.
            off = r.u64(buf(_B_OFFSET), f"the offset of buffer {i}")
            size = r.u64(buf(_B_SIZE), f"the size of buffer {i}") if buf(_B_SIZE) else 0
            if off > 1 and off + size > r.n:
                raise r.fail(f"buffer {i} ({size} bytes at {off}) ends past the end")
