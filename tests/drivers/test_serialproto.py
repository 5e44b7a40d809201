"""The frame format, its CRC and the incremental decoder: byte-exact, any chunking, resync after anything."""

from __future__ import annotations

import random

import numpy as np
import pytest

from drivers.errors import FrameError
from drivers.serialproto import (
    MAX_PAYLOAD, Frame, FrameDecoder, FrameType, Hello, crc16_ccitt, encode_frame, encode_heartbeat, encode_hello,
    encode_samples, max_samples_per_frame,
)

pytestmark = pytest.mark.timeout(30)

LSB = 8.0 / 32767  # one int16 step at 8 g full scale
TOL = LSB / 2 + 1e-6  # quantization plus float32 rounding


def reference_crc(data: bytes) -> int:
    """Bit-by-bit CRC-16/CCITT-FALSE, written independently of the module under test."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def stream_of(n: int, seed: int = 0) -> tuple[bytes, list[Frame]]:
    """n frames of mixed types and sizes with consecutive SEQ, and the frames they encode."""
    rng = np.random.default_rng(seed)
    data, frames = b"", []
    for seq in range(n):
        kind = seq % 3
        if kind == 0:
            x = rng.normal(0.0, 2.0, (int(rng.integers(0, 40)), 3))
            raw = encode_samples(x, seq)
        elif kind == 1:
            raw = encode_hello(seq, 1000, 3, 8, f"fw {seq}")
        else:
            raw = encode_heartbeat(seq)
        data += raw
        frames.append(Frame(FrameType(raw[4]), seq, raw[7:-2]))
    return data, frames


# -- CRC and layout ---------------------------------------------------------------------------------------

def test_crc_check_value_and_reference():
    assert crc16_ccitt(b"123456789") == 0x29B1
    assert crc16_ccitt(b"") == 0xFFFF
    rng = random.Random(1)
    for size in (1, 2, 7, 100, 1030):
        data = bytes(rng.randrange(256) for _ in range(size))
        assert crc16_ccitt(data) == reference_crc(data)


def test_documented_example_frame_is_byte_exact():
    # The example in docs/serial-protocol.md: one sample (1.0, -0.5, 8.0) g, SEQ 0x0102.
    frame = encode_samples(np.array([[1.0, -0.5, 8.0]]), 0x0102)
    assert frame.hex(" ").upper() == "AA 55 07 00 01 02 01 03 00 10 00 F8 FF 7F EF 78"
    assert crc16_ccitt(frame[2:-2]) == 0x78EF
    assert encode_heartbeat(7).hex(" ").upper() == "AA 55 00 00 03 07 00 CB D1"
    hello = encode_hello(0, 1000, 3, 8, "fieldnode-sim 1.0")
    assert hello.hex(" ").upper() == (
        "AA 55 15 00 02 00 00 E8 03 03 08 66 69 65 6C 64 6E 6F 64 65 2D 73 69 6D 20 31 2E 30 84 14")


def test_encode_frame_layout():
    frame = encode_frame(0x42, 0xBEEF, b"\x01\x02\x03")
    assert frame[:2] == b"\xaa\x55"
    assert frame[2:4] == (3).to_bytes(2, "little")
    assert frame[4] == 0x42 and frame[5:7] == b"\xef\xbe" and frame[7:10] == b"\x01\x02\x03"
    assert int.from_bytes(frame[-2:], "little") == reference_crc(frame[2:-2])


@pytest.mark.parametrize("kwargs, message", [
    ({"type": 256, "seq": 0}, "frame type must be an int in 0..255, got 256"),
    ({"type": -1, "seq": 0}, "frame type must be an int in 0..255, got -1"),
    ({"type": 1, "seq": 65536}, "frame seq must be an int in 0..65535, got 65536"),
    ({"type": 1, "seq": -1}, "frame seq must be an int in 0..65535, got -1"),
    ({"type": 1, "seq": 0, "payload": bytes(1025)}, "payload of 1025 bytes exceeds the maximum of 1024"),
])
def test_encode_frame_rejects_out_of_range_fields(kwargs, message):
    with pytest.raises(FrameError, match=message):
        encode_frame(**kwargs)


# -- decoding ---------------------------------------------------------------------------------------------

def test_round_trip_all_at_once():
    data, frames = stream_of(60)
    dec = FrameDecoder()
    assert dec.feed(data) == frames
    assert (dec.frames, dec.crc_errors, dec.garbage_bytes, dec.length_errors, dec.pending) == (60, 0, 0, 0, 0)


def test_round_trip_extreme_payload_sizes():
    dec = FrameDecoder()
    big = bytes(range(256)) * 4
    got = dec.feed(encode_frame(FrameType.SAMPLES, 1, b"") + encode_frame(FrameType.HELLO, 2, big))
    assert got == [Frame(FrameType.SAMPLES, 1, b""), Frame(FrameType.HELLO, 2, big)]
    assert len(big) == MAX_PAYLOAD


def test_decoding_byte_by_byte():
    data, frames = stream_of(30, seed=2)
    dec = FrameDecoder()
    got = [f for i in range(len(data)) for f in dec.feed(data[i:i + 1])]
    assert got == frames
    assert dec.garbage_bytes == 0 and dec.pending == 0


@pytest.mark.parametrize("seed", range(5))
def test_decoding_in_random_chunkings(seed):
    data, frames = stream_of(40, seed=seed)
    rng = random.Random(seed)
    dec, got, i = FrameDecoder(), [], 0
    while i < len(data):
        n = rng.choice([0, 1, 2, 3, 5, 8, 64, 300])
        got += dec.feed(data[i:i + n])
        i += n
    assert got == frames
    assert [f.missing for f in got] == [None] + [0] * 39


def test_garbage_before_and_between_frames_is_counted_and_skipped():
    a, b = encode_heartbeat(0), encode_samples(np.ones((4, 3)), 1)
    noise = bytes([0x00, 0x55, 0xAA, 0x13, 0xAA])  # includes lone SYNC halves
    dec = FrameDecoder()
    got = dec.feed(noise + a + b"\xff" * 10 + b"\xaa" + b)
    assert got == [Frame(FrameType.HEARTBEAT, 0, b""), Frame(FrameType.SAMPLES, 1, b[7:-2])]
    assert dec.garbage_bytes == len(noise) + 11
    assert dec.crc_errors == dec.length_errors == 0


def test_sync_split_across_chunks_after_garbage():
    frame = encode_heartbeat(5)
    dec = FrameDecoder()
    assert dec.feed(b"\x01\x02" + frame[:1]) == []
    assert dec.pending == 1  # the trailing 0xAA may start a SYNC: kept, not yet garbage
    assert dec.feed(frame[1:]) == [Frame(FrameType.HEARTBEAT, 5, b"")]
    assert dec.garbage_bytes == 2


def test_trailing_sync_half_becomes_garbage_when_not_followed_by_0x55():
    dec = FrameDecoder()
    assert dec.feed(b"\x01\xaa") == [] and dec.pending == 1
    assert dec.feed(b"\x00") == []
    assert dec.garbage_bytes == 3 and dec.pending == 0


def test_sync_inside_a_payload_does_not_split_the_frame():
    fake = encode_heartbeat(9)  # a complete valid frame, carried as payload bytes
    payload = b"\xaa\x55" + fake + b"\xaa"
    data = encode_frame(FrameType.HELLO, 3, payload) + encode_heartbeat(4)
    for chunk in (len(data), 1, 7):
        dec = FrameDecoder()
        got = [f for i in range(0, len(data), chunk) for f in dec.feed(data[i:i + chunk])]
        assert got == [Frame(FrameType.HELLO, 3, payload), Frame(FrameType.HEARTBEAT, 4, b"")]
        assert dec.garbage_bytes == 0 and dec.crc_errors == 0


def test_bad_crc_is_counted_and_the_next_frame_still_decodes():
    bad = bytearray(encode_samples(np.zeros((8, 3)), 0))
    bad[10] ^= 0x04
    good = encode_heartbeat(1)
    dec = FrameDecoder()
    assert dec.feed(bytes(bad) + good) == [Frame(FrameType.HEARTBEAT, 1, b"")]
    assert dec.crc_errors == 1
    assert dec.garbage_bytes == len(bad)


def test_real_frame_hidden_inside_a_bad_frame_is_found():
    # A fake header claims 40 payload bytes; a real frame starts right after it. The fake candidate fails its
    # CRC, and the hunt restarts one byte after the fake SYNC, so the real frame is not lost.
    real = encode_samples(np.full((2, 3), 0.25), 77)
    fake_header = b"\xaa\x55" + (40).to_bytes(2, "little") + b"\x01\x00\x00"
    dec = FrameDecoder()
    got = dec.feed(fake_header + real + bytes(40))
    assert got == [Frame(FrameType.SAMPLES, 77, real[7:-2])]
    assert dec.crc_errors == 1
    assert dec.garbage_bytes == len(fake_header) + 40
    assert dec.pending == 0


def test_too_long_len_is_a_framing_error_and_resyncs():
    dec = FrameDecoder()
    too_long = b"\xaa\x55" + (MAX_PAYLOAD + 1).to_bytes(2, "little")
    got = dec.feed(too_long + encode_heartbeat(3))
    assert got == [Frame(FrameType.HEARTBEAT, 3, b"")]
    assert dec.length_errors == 1 and dec.crc_errors == 0
    assert dec.garbage_bytes == len(too_long)


def test_too_long_len_split_before_its_high_byte():
    dec = FrameDecoder()
    assert dec.feed(b"\xaa\x55\x01") == []
    assert dec.feed(b"\x04" + encode_heartbeat(0)) == [Frame(FrameType.HEARTBEAT, 0, b"")]
    assert dec.length_errors == 1


def test_unknown_type_is_counted_skipped_and_keeps_the_sequence():
    data = encode_heartbeat(10) + encode_frame(0x7F, 11, b"future") + encode_heartbeat(12)
    dec = FrameDecoder()
    got = dec.feed(data)
    assert got == [Frame(FrameType.HEARTBEAT, 10, b""), Frame(FrameType.HEARTBEAT, 12, b"")]
    assert got[1].missing == 0  # the unknown frame at SEQ 11 is not a gap
    assert (dec.unknown_types, dec.frames, dec.seq_gaps) == (1, 2, 0)


def test_gap_before_an_unknown_frame_is_carried_to_the_next_frame():
    dec = FrameDecoder()
    got = dec.feed(encode_heartbeat(1) + encode_frame(0x80, 5, b"") + encode_heartbeat(6))
    assert [f.missing for f in got] == [None, 3]
    assert (dec.seq_gaps, dec.dropped_frames) == (1, 3)


def test_truncated_stream_waits_then_completes():
    frame = encode_samples(np.ones((10, 3)), 4)
    dec = FrameDecoder()
    assert dec.feed(frame[:-1]) == []
    assert dec.pending == len(frame) - 1 and dec.garbage_bytes == 0
    assert dec.feed(frame[-1:]) == [Frame(FrameType.SAMPLES, 4, frame[7:-2])]
    assert dec.pending == 0


def test_reset_drops_pending_bytes_as_garbage_and_forgets_the_sequence():
    dec = FrameDecoder()
    dec.feed(encode_heartbeat(100) + encode_heartbeat(101)[:5])
    dec.reset()
    assert dec.garbage_bytes == 5 and dec.pending == 0
    (frame,) = dec.feed(encode_heartbeat(500))
    assert frame.missing is None and dec.seq_gaps == 0


def test_sequence_gaps_are_counted_across_the_wrap():
    dec = FrameDecoder()
    seqs = [65533, 65534, 65535, 2, 3, 10]
    got = dec.feed(b"".join(encode_heartbeat(s) for s in seqs))
    assert [f.missing for f in got] == [None, 0, 0, 2, 0, 6]
    assert (dec.seq_gaps, dec.dropped_frames) == (2, 8)


def test_wrap_without_loss_is_not_a_gap():
    dec = FrameDecoder()
    dec.feed(b"".join(encode_heartbeat(s) for s in (65534, 65535, 0, 1)))
    assert dec.seq_gaps == 0 and dec.restarts == 0


def test_hello_with_seq_zero_out_of_sequence_is_a_restart_not_a_gap():
    dec = FrameDecoder()
    got = dec.feed(encode_heartbeat(40) + encode_heartbeat(41) + encode_hello(0, 1000, 3, 8, "fw")
                   + encode_heartbeat(1))
    assert [f.missing for f in got] == [None, 0, None, 0]
    assert (dec.restarts, dec.seq_gaps, dec.dropped_frames) == (1, 0, 0)


# -- payloads ---------------------------------------------------------------------------------------------

def test_samples_round_trip_within_quantization():
    rng = np.random.default_rng(3)
    x = rng.uniform(-7.9, 7.9, (max_samples_per_frame(3), 3)).astype(np.float32)
    (frame,) = FrameDecoder().feed(encode_samples(x, 0))
    y = frame.samples()
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(y - x).max() <= TOL


def test_samples_saturate_at_full_scale_and_honour_other_scales():
    x = np.array([[20.0, -20.0, 0.0], [3.9, -4.5, 1.0]])
    (frame,) = FrameDecoder().feed(encode_samples(x, 0, full_scale_g=4.0))
    y = frame.samples(full_scale_g=4.0)
    np.testing.assert_allclose(y, [[4.0, -4.0, 0.0], [3.9, -4.0, 1.0]], atol=4.0 / 32767)
    raw = np.frombuffer(frame.payload, "<i2", offset=1)
    assert raw.max() == 32767 and raw.min() == -32767


@pytest.mark.parametrize("samples, kwargs, message", [
    (np.zeros(3), {}, r"samples must be an \[N, axes\] array with 1..255 axes, got shape \(3,\)"),
    (np.zeros((2, 0)), {}, r"got shape \(2, 0\)"),
    (np.zeros((171, 3)), {}, "171 samples of 3 axes exceed one frame \\(at most 170\\)"),
    (np.array([[0.0, np.nan, 0.0]]), {}, "samples hold NaN \\(first at row 0\\)"),
    (np.zeros((1, 3)), {"full_scale_g": 0}, "full_scale_g must be a positive number, got 0"),
    (np.zeros((1, 3)), {"full_scale_g": float("nan")}, "full_scale_g must be a positive number, got nan"),
])
def test_encode_samples_rejects_bad_input(samples, kwargs, message):
    with pytest.raises(FrameError, match=message):
        encode_samples(samples, 0, **kwargs)


@pytest.mark.parametrize("payload, message", [
    (b"", "SAMPLES frame seq 9: empty payload, expected an axes byte first"),
    (b"\x00\x01\x02", "SAMPLES frame seq 9: axes byte is 0, expected 1..255"),
    (b"\x03" + bytes(10), r"SAMPLES frame seq 9: 10 sample bytes is not a multiple of 2\*axes = 6 \(LEN 11\)"),
    (b"\x02\x01", r"SAMPLES frame seq 9: 1 sample bytes is not a multiple of 2\*axes = 4 \(LEN 2\)"),
])
def test_malformed_samples_payload_names_the_problem(payload, message):
    (frame,) = FrameDecoder().feed(encode_frame(FrameType.SAMPLES, 9, payload))
    with pytest.raises(FrameError, match=message):
        frame.samples()


def test_samples_of_a_non_samples_frame_is_refused():
    with pytest.raises(FrameError, match=r"frame type HEARTBEAT \(seq 2\) has no samples"):
        Frame(FrameType.HEARTBEAT, 2, b"").samples()


def test_axes_byte_alone_is_zero_samples():
    assert Frame(FrameType.SAMPLES, 0, b"\x03").samples().shape == (0, 3)


def test_hello_round_trip():
    (frame,) = FrameDecoder().feed(encode_hello(0, 1000, 3, 8, "mcu-fw 2.4.1"))
    assert frame.hello() == Hello(1000, 3, 8, "mcu-fw 2.4.1")


@pytest.mark.parametrize("payload, message", [
    (b"\xe8\x03\x03", "HELLO frame seq 4: payload of 3 bytes, expected at least 4"),
    (b"\x00\x00\x03\x08", "HELLO frame seq 4: sample rate is 0"),
    (b"\xe8\x03\x00\x08", "HELLO frame seq 4: axes is 0"),
    (b"\xe8\x03\x03\x00", "HELLO frame seq 4: full scale is 0"),
    (b"\xe8\x03\x03\x08fw\xff", r"HELLO frame seq 4: firmware version b'fw\\xff' is not printable ASCII"),
])
def test_malformed_hello_names_the_problem(payload, message):
    with pytest.raises(FrameError, match=message):
        Frame(FrameType.HELLO, 4, payload).hello()


def test_hello_of_another_type_is_refused():
    with pytest.raises(FrameError, match=r"frame type SAMPLES \(seq 1\) is not HELLO"):
        Frame(FrameType.SAMPLES, 1, b"\x03").hello()


@pytest.mark.parametrize("args, message", [
    ((0, 3, 8, "fw"), "HELLO sample_rate_hz must be an int in 1..65535, got 0"),
    ((1000, 256, 8, "fw"), "HELLO axes must be an int in 1..255, got 256"),
    ((1000, 3, 8.5, "fw"), "HELLO full_scale_g must be an int in 1..255, got 8.5"),
    ((1000, 3, 8, "fw\u00e9"), "HELLO firmware version must be printable ASCII, got 'fw\u00e9'"),
])
def test_encode_hello_rejects_bad_fields(args, message):
    with pytest.raises(FrameError, match=message):
        encode_hello(0, *args)
