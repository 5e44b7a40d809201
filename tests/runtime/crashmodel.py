"""Builds a TFLite model that kills the interpreter's process, for crash-isolation tests.

``make_crashing_model(good_bytes)`` takes any valid ``.tflite`` flatbuffer and returns a model that
still passes the flatbuffer verifier and the interpreter's model checks, but makes the native
runtime dereference a null pointer in ``allocate_tensors()``, so the process dies from SIGSEGV
rather than raising a Python exception.

The corruption
--------------
The first operator of the main subgraph (the first node TFLite prepares) is turned into a
``RESHAPE`` whose shape operand is the "optional tensor" index ``-1``:

* a new ``OperatorCode`` table (``RESHAPE``, version 1) is appended to the buffer and the
  ``operator_codes`` slot used by that operator is pointed at it (so any other operator sharing
  that opcode also becomes a ``RESHAPE``; it never gets prepared);
* a new input vector ``[original_input_0, -1]`` is appended and the operator's ``inputs`` field
  is pointed at it.

Everything is written after the end of the original flatbuffer, and only existing offset slots are
rewritten (flatbuffer offsets point forward, so appended objects are reachable). No schema module or
``flatbuffers`` package is needed, and the weights and the other operators are left as they are.

Why it crashes
--------------
``-1`` is the legal marker for an omitted optional input, so the model loader accepts it, and
``GetInput()`` returns ``nullptr`` for it. ``RESHAPE``'s ``Prepare`` passes that shape tensor
straight to ``IsConstantOrPersistentTensor(shape)``, which reads ``shape->allocation_type`` without
a null check -> SIGSEGV inside ``tflite::ops::builtin::reshape::Prepare``
(``AllocateTensors -> PrepareOpsAndTensors -> PrepareOpsStartingAt``). This is the kernel's own
Prepare, not the XNNPACK delegate, so it happens with and without the default delegates.

Observed on x86-64 Linux (CPython 3.11), five int8 models (Conv1D classifiers with MEAN or
AVERAGE_POOL heads, a Conv2D model, a Dense-only model, one with float I/O), via ``model_content``
and ``model_path``, with the default, builtin, reference and no-default-delegate op resolvers:
loading succeeds and ``allocate_tensors()`` dies with SIGSEGV, every run, on both
ai-edge-litert 2.3.0 (numpy 2) and tflite-runtime 2.14.0 (numpy 1.26).

This is a crash by design; a runtime that adds the missing null check will instead raise
``RuntimeError`` (``... failed to prepare``), so a test should treat "the worker exited with an
error" as the fallback outcome and not require a particular signal.
"""

from __future__ import annotations

import struct

__all__ = ["make_crashing_model"]

_RESHAPE = 22  # BuiltinOperator_RESHAPE
_OPTIONAL_TENSOR = -1  # kTfLiteOptionalTensor

# Field numbers in the TFLite schema (schema.fbs).
_MODEL_OPERATOR_CODES, _MODEL_SUBGRAPHS = 1, 2
_SUBGRAPH_OPERATORS = 3
_OPERATOR_OPCODE_INDEX, _OPERATOR_INPUTS = 0, 1


class _Flatbuffer:
    """Just enough of a flatbuffer reader/appender for patching one TFLite model."""

    def __init__(self, data: bytes) -> None:
        self.buf = bytearray(data)

    def u32(self, pos: int) -> int:
        return struct.unpack_from("<I", self.buf, pos)[0]

    def field_pos(self, table: int, field: int) -> int | None:
        """Absolute position of a table field's value, or None if the field is absent."""
        vtable = table - struct.unpack_from("<i", self.buf, table)[0]
        vtable_size = struct.unpack_from("<H", self.buf, vtable)[0]
        if 4 + 2 * field >= vtable_size:
            return None
        rel = struct.unpack_from("<H", self.buf, vtable + 4 + 2 * field)[0]
        return table + rel if rel else None

    def deref(self, pos: int) -> int:
        """Follows the uoffset stored at ``pos``."""
        return pos + self.u32(pos)

    def vector(self, table: int, field: int) -> tuple[int, int]:
        """(position of element 0, length) of a vector field; raises if the field is absent."""
        pos = self.field_pos(table, field)
        if pos is None:
            raise ValueError(f"flatbuffer table at {table} has no vector field {field}")
        vec = self.deref(pos)
        return vec + 4, self.u32(vec)

    def append(self, data: bytes, align: int = 4) -> int:
        """Appends ``data`` at the next ``align``-aligned position; returns that position."""
        self.buf.extend(b"\0" * (-len(self.buf) % align))
        pos = len(self.buf)
        self.buf.extend(data)
        return pos

    def point(self, slot: int, target: int) -> None:
        """Makes the uoffset at ``slot`` refer to ``target`` (which must lie after it)."""
        if target <= slot:
            raise ValueError("flatbuffer offsets can only point forward")
        struct.pack_into("<I", self.buf, slot, target - slot)


def _append_reshape_opcode(fb: _Flatbuffer) -> int:
    """Appends an OperatorCode table {deprecated_builtin_code, version, builtin_code}; returns it."""
    # vtable: its size, the table's size, then the offsets of fields 0..3 (custom_code absent).
    vtable = fb.append(struct.pack("<6H", 12, 16, 12, 0, 8, 4), align=2)
    table = fb.append(b"\0" * 16, align=4)
    struct.pack_into("<iiib", fb.buf, table, table - vtable, _RESHAPE, 1, _RESHAPE)
    return table


def make_crashing_model(model_bytes: bytes) -> bytes:
    """Returns a copy of ``model_bytes`` that segfaults the TFLite interpreter in ``allocate_tensors()``.

    Args:
        model_bytes: a valid ``.tflite`` flatbuffer with at least one operator in its first subgraph.

    Raises:
        ValueError: ``model_bytes`` is not a TFLite flatbuffer this function can patch.
    """
    if len(model_bytes) < 8 or model_bytes[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (missing the TFL3 identifier)")
    try:
        return _patch(_Flatbuffer(model_bytes))
    except (struct.error, IndexError) as exc:
        raise ValueError(f"malformed TFLite flatbuffer: {exc}") from exc


def _patch(fb: _Flatbuffer) -> bytes:
    model = fb.deref(0)

    subgraphs, n_subgraphs = fb.vector(model, _MODEL_SUBGRAPHS)
    if not n_subgraphs:
        raise ValueError("model has no subgraphs")
    operators, n_operators = fb.vector(fb.deref(subgraphs), _SUBGRAPH_OPERATORS)
    if not n_operators:
        raise ValueError("first subgraph has no operators")
    op = fb.deref(operators)

    opcode_pos = fb.field_pos(op, _OPERATOR_OPCODE_INDEX)
    opcode_index = fb.u32(opcode_pos) if opcode_pos is not None else 0
    opcodes, n_opcodes = fb.vector(model, _MODEL_OPERATOR_CODES)
    if opcode_index >= n_opcodes:
        raise ValueError("operator refers to a missing operator code")

    inputs, n_inputs = fb.vector(op, _OPERATOR_INPUTS)
    if not n_inputs:
        raise ValueError("first operator has no inputs")
    data_input = struct.unpack_from("<i", fb.buf, inputs)[0]

    # The operator now runs RESHAPE(data_input, <optional tensor>).
    fb.point(opcodes + 4 * opcode_index, _append_reshape_opcode(fb))
    new_inputs = fb.append(struct.pack("<Iii", 2, data_input, _OPTIONAL_TENSOR))
    fb.point(fb.field_pos(op, _OPERATOR_INPUTS), new_inputs)
    return bytes(fb.buf)
