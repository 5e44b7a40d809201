"""The framed protocol between the sensor MCU and the agent (see docs/serial-protocol.md).

Every frame is ``SYNC (AA 55) | LEN (u16 LE) | TYPE (u8) | SEQ (u16 LE) | PAYLOAD (LEN bytes) | CRC (u16 LE)``
with a CRC-16/CCITT-FALSE over LEN..PAYLOAD. The MCU writes frames back to back; the agent reads whatever
chunks the UART hands it and feeds them to a :class:`FrameDecoder`, which returns the complete, checked
frames and counts everything it had to throw away. The decoder never raises on bad input: a serial line
delivers garbage (boot messages, noise, a cable plugged mid-frame), and the only sane reaction is to resync.

Payloads are decoded lazily by :class:`Frame` (:meth:`Frame.samples`, :meth:`Frame.counts`, :meth:`Frame.hello`),
which raise :class:`drivers.errors.FrameError` naming what is malformed. Encoders (:func:`encode_frame`,
:func:`encode_samples`, :func:`encode_hello`, :func:`encode_heartbeat`) serve the simulated MCU and tests.
"""

from __future__ import annotations

import binascii
import math
from dataclasses import dataclass, field
from enum import IntEnum
from numbers import Real

import numpy as np

from drivers.errors import FrameError

SYNC = b"\xaa\x55"
HEADER_SIZE = 7  # SYNC(2) + LEN(2) + TYPE(1) + SEQ(2)
CRC_SIZE = 2
OVERHEAD = HEADER_SIZE + CRC_SIZE
MAX_PAYLOAD = 1024
SEQ_MODULO = 1 << 16
INT16_FULL = 32767  # a sample of +32767 is +full_scale g


class FrameType(IntEnum):
    """The frame types this agent understands; others are counted and skipped."""

    SAMPLES = 0x01
    HELLO = 0x02
    HEARTBEAT = 0x03


_KNOWN_TYPES = frozenset(int(t) for t in FrameType)
_TYPE_OF = {int(t): t for t in FrameType}  # a dict lookup per frame instead of an enum call


def crc16_ccitt(data: bytes) -> int:
    """CRC-16/CCITT-FALSE: poly 0x1021, init 0xFFFF, no reflection, no final xor.

    Args:
        data: The bytes to check (any bytes-like object).

    Returns:
        The CRC as an int in [0, 65535]; ``crc16_ccitt(b"123456789") == 0x29B1``.
    """
    # binascii.crc_hqx is exactly this CRC with a caller-chosen init value, and runs in C.
    return binascii.crc_hqx(data, 0xFFFF)


@dataclass(frozen=True)
class Hello:
    """What the MCU announces about itself in a HELLO frame."""

    sample_rate_hz: int
    axes: int
    full_scale_g: int
    firmware: str


@dataclass(frozen=True)
class Frame:
    """One checked frame.

    Attributes:
        type: The frame type.
        seq: The frame's sequence number (0..65535, wrapping).
        payload: The raw payload.
        missing: Frames lost just before this one according to SEQ: 0 when contiguous, ``None`` when
            continuity is unknown (first frame after a reset, or the MCU restarted). Set by the decoder; not
            part of equality.
    """

    type: FrameType
    seq: int
    payload: bytes
    missing: int | None = field(default=0, compare=False)

    def samples(self, full_scale_g: float = 8.0) -> np.ndarray:
        """Decodes a SAMPLES payload into accelerations.

        Args:
            full_scale_g: The full scale the MCU announced (an int16 of 32767 is this many g).

        Returns:
            float32 array ``[N, axes]`` in g: :meth:`counts` times :func:`gain` ``(full_scale_g)``.

        Raises:
            FrameError: The frame is not SAMPLES, or the payload is malformed (empty, zero axes, or a sample
                area that is not a whole number of ``axes`` int16 samples).
        """
        return self.counts().astype(np.float32) * gain(full_scale_g)

    def counts(self) -> np.ndarray:
        """The raw samples of a SAMPLES payload, without converting them to g.

        Returns:
            A read-only int16 array ``[N, axes]`` over the payload (no copy).

        Raises:
            FrameError: As :meth:`samples`.
        """
        if self.type != FrameType.SAMPLES:
            raise FrameError(f"frame type {_type_name(self.type)} (seq {self.seq}) has no samples")
        if not self.payload:
            raise FrameError(f"SAMPLES frame seq {self.seq}: empty payload, expected an axes byte first")
        axes = self.payload[0]
        if axes == 0:
            raise FrameError(f"SAMPLES frame seq {self.seq}: axes byte is 0, expected 1..255")
        body = len(self.payload) - 1
        if body % (2 * axes):
            raise FrameError(
                f"SAMPLES frame seq {self.seq}: {body} sample bytes is not a multiple of 2*axes = {2 * axes}"
                f" (LEN {len(self.payload)})")
        return np.frombuffer(self.payload, dtype="<i2", offset=1).reshape(-1, axes)

    def hello(self) -> Hello:
        """Decodes a HELLO payload.

        Returns:
            The announced sample rate, axes, full scale and firmware version.

        Raises:
            FrameError: The frame is not HELLO, the payload is shorter than 4 bytes, a field is zero, or the
                firmware version is not printable ASCII.
        """
        if self.type != FrameType.HELLO:
            raise FrameError(f"frame type {_type_name(self.type)} (seq {self.seq}) is not HELLO")
        p = self.payload
        if len(p) < 4:
            raise FrameError(f"HELLO frame seq {self.seq}: payload of {len(p)} bytes, expected at least 4")
        rate, axes, scale = p[0] | p[1] << 8, p[2], p[3]
        for name, value in (("sample rate", rate), ("axes", axes), ("full scale", scale)):
            if value == 0:
                raise FrameError(f"HELLO frame seq {self.seq}: {name} is 0")
        raw = p[4:]
        if any(b < 0x20 or b > 0x7E for b in raw):
            raise FrameError(f"HELLO frame seq {self.seq}: firmware version {raw!r} is not printable ASCII")
        return Hello(rate, axes, scale, raw.decode("ascii"))


def gain(full_scale_g: float) -> np.float32:
    """g per count at ``full_scale_g``: a sample in g is its int16 count times this float32 (in float32)."""
    return np.float32(full_scale_g / INT16_FULL)


def _type_name(value: int) -> str:
    return FrameType(value).name if value in _KNOWN_TYPES else f"0x{value:02X}"


def encode_frame(type: int, seq: int, payload: bytes = b"") -> bytes:
    """Builds one frame.

    Args:
        type: Frame type, 0..255 (unknown types are allowed, to test forward compatibility).
        seq: Sequence number, 0..65535.
        payload: At most :data:`MAX_PAYLOAD` bytes.

    Returns:
        The frame bytes, SYNC to CRC.

    Raises:
        FrameError: A field is out of range.
    """
    if isinstance(type, bool) or not isinstance(type, int) or not 0 <= type <= 0xFF:
        raise FrameError(f"frame type must be an int in 0..255, got {type!r}")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < SEQ_MODULO:
        raise FrameError(f"frame seq must be an int in 0..65535, got {seq!r}")
    payload = bytes(payload)
    if len(payload) > MAX_PAYLOAD:
        raise FrameError(f"payload of {len(payload)} bytes exceeds the maximum of {MAX_PAYLOAD}")
    body = len(payload).to_bytes(2, "little") + bytes([type]) + seq.to_bytes(2, "little") + payload
    return SYNC + body + crc16_ccitt(body).to_bytes(2, "little")


def max_samples_per_frame(axes: int) -> int:
    """The most samples of ``axes`` axes one SAMPLES frame can carry (170 for 3 axes)."""
    return (MAX_PAYLOAD - 1) // (2 * axes)


def encode_samples(samples: np.ndarray, seq: int, full_scale_g: float = 8.0) -> bytes:
    """Builds a SAMPLES frame, quantizing to int16 in units of ``full_scale_g / 32767`` g.

    Values beyond full scale saturate at +/-32767 (as the sensor would clip).

    Args:
        samples: Array-like ``[N, axes]`` of accelerations in g (1..255 axes).
        seq: Sequence number, 0..65535.
        full_scale_g: Full scale in g (> 0).

    Returns:
        The frame bytes.

    Raises:
        FrameError: The array has the wrong shape, holds NaN, does not fit in one frame, or the full scale
            is not positive.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 2 or not 1 <= x.shape[1] <= 255:
        raise FrameError(f"samples must be an [N, axes] array with 1..255 axes, got shape {x.shape}")
    axes = x.shape[1]
    if len(x) > max_samples_per_frame(axes):
        raise FrameError(
            f"{len(x)} samples of {axes} axes exceed one frame (at most {max_samples_per_frame(axes)})")
    if isinstance(full_scale_g, bool) or not isinstance(full_scale_g, Real) or not 0 < full_scale_g < math.inf:
        raise FrameError(f"full_scale_g must be a positive number, got {full_scale_g!r}")
    if np.isnan(x).any():
        raise FrameError(f"samples hold NaN (first at row {int(np.argwhere(np.isnan(x))[0][0])})")
    q = np.clip(np.rint(x * (INT16_FULL / full_scale_g)), -INT16_FULL, INT16_FULL).astype("<i2")
    return encode_frame(FrameType.SAMPLES, seq, bytes([axes]) + q.tobytes())


def encode_hello(seq: int, sample_rate_hz: int, axes: int, full_scale_g: int, firmware: str) -> bytes:
    """Builds a HELLO frame.

    Raises:
        FrameError: A field does not fit its width (rate 1..65535, axes and full scale 1..255) or the
            firmware version is not printable ASCII.
    """
    for name, value, top in (("sample_rate_hz", sample_rate_hz, 0xFFFF), ("axes", axes, 0xFF),
                             ("full_scale_g", full_scale_g, 0xFF)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise FrameError(f"HELLO {name} must be an int in 1..{top}, got {value!r}")
    if not firmware.isascii() or not firmware.isprintable():
        raise FrameError(f"HELLO firmware version must be printable ASCII, got {firmware!r}")
    payload = sample_rate_hz.to_bytes(2, "little") + bytes([axes, full_scale_g]) + firmware.encode("ascii")
    return encode_frame(FrameType.HELLO, seq, payload)


def encode_heartbeat(seq: int) -> bytes:
    """Builds an (empty) HEARTBEAT frame."""
    return encode_frame(FrameType.HEARTBEAT, seq)


class FrameDecoder:
    """Turns a byte stream, in chunks of any size, into checked frames.

    It hunts for SYNC, waits until the whole frame is there, and checks LEN and the CRC. A LEN above
    :data:`MAX_PAYLOAD` or a CRC mismatch rejects the candidate and restarts the hunt one byte after its SYNC,
    so a real frame hidden inside garbage (or inside a frame cut short by a reset MCU) is still found.
    It also follows SEQ and fills :attr:`Frame.missing`; a HELLO with SEQ 0 that breaks the sequence is an
    MCU restart, not a gap.

    Counters (cumulative, never reset):
        frames: Checked frames of a known type that were returned.
        crc_errors: Candidates rejected for a CRC mismatch.
        length_errors: Candidates rejected for a LEN above the maximum.
        garbage_bytes: Bytes thrown away outside valid frames (including what remains of rejected
            candidates, and what :meth:`reset` drops).
        unknown_types: Checked frames of an unknown type, skipped.
        seq_gaps: Times the sequence jumped; dropped_frames: frames missing in those jumps (modulo 65536).
        restarts: MCU restarts seen (HELLO with SEQ 0 out of sequence).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._expected: int | None = None
        self._carry: int | None = 0  # missing frames attributed to skipped unknown-type frames
        self.frames = 0
        self.crc_errors = 0
        self.length_errors = 0
        self.garbage_bytes = 0
        self.unknown_types = 0
        self.seq_gaps = 0
        self.dropped_frames = 0
        self.restarts = 0

    @property
    def pending(self) -> int:
        """Bytes held back, waiting for the rest of a frame (or the second SYNC byte)."""
        return len(self._buf)

    def reset(self) -> None:
        """Forgets buffered bytes (counted as garbage) and sequence continuity, e.g. after a reconnect."""
        self.garbage_bytes += len(self._buf)
        self._buf.clear()
        self._expected = None
        self._carry = 0

    def feed(self, data: bytes) -> list[Frame]:
        """Adds bytes and returns the frames completed by them, in order.

        Args:
            data: The next chunk of the stream (any length, including empty).

        Returns:
            The complete, CRC-checked frames of known types.
        """
        buf = self._buf
        buf += data
        out: list[Frame] = []
        pos, n = 0, len(buf)
        while True:
            start = buf.find(SYNC, pos)
            if start < 0:
                # A trailing 0xAA may be the first half of a SYNC split across chunks: keep it.
                keep = 1 if n > pos and buf[-1] == SYNC[0] else 0
                self.garbage_bytes += n - pos - keep
                pos = n - keep
                break
            self.garbage_bytes += start - pos
            pos = start
            if n - pos < 4:
                break
            length = buf[pos + 2] | buf[pos + 3] << 8
            if length > MAX_PAYLOAD:
                self.length_errors += 1
                self.garbage_bytes += 1
                pos += 1
                continue
            end = pos + OVERHEAD + length
            if n < end:
                break
            if crc16_ccitt(buf[pos + 2:end - CRC_SIZE]) != buf[end - 2] | buf[end - 1] << 8:
                self.crc_errors += 1
                self.garbage_bytes += 1
                pos += 1
                continue
            ftype, seq = buf[pos + 4], buf[pos + 5] | buf[pos + 6] << 8
            payload = bytes(buf[pos + HEADER_SIZE:end - CRC_SIZE])
            pos = end
            missing = self._follow(ftype, seq)
            if ftype not in _KNOWN_TYPES:
                self.unknown_types += 1
                self._carry = missing
                continue
            self.frames += 1
            out.append(Frame(_TYPE_OF[ftype], seq, payload, missing))
        del buf[:pos]
        return out

    def _follow(self, ftype: int, seq: int) -> int | None:
        """Updates the sequence state; returns the frames missing before this one (carry included)."""
        expected, self._expected = self._expected, (seq + 1) % SEQ_MODULO
        if expected is None:
            missing: int | None = None
        elif seq == expected:
            missing = 0
        elif ftype == FrameType.HELLO and seq == 0:
            self.restarts += 1
            missing = None
        else:
            missing = (seq - expected) % SEQ_MODULO
            self.seq_gaps += 1
            self.dropped_frames += missing
        carry, self._carry = self._carry, 0
        if missing is None or carry is None:
            return None
        return missing + carry
