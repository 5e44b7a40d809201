"""The simulated sensor MCU on a real pseudo-terminal, read back with real pyserial and the real decoder."""

from __future__ import annotations

import os

import numpy as np
import pytest
import serial

from drivers.serialproto import FrameDecoder, FrameType
from drivers.sim.clock import SimClock
from drivers.sim.mcu import FIRMWARE, LINK_NAME, Fault, FaultKind, SimulatedMcu
from drivers.sim.signal import VibrationSource
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(30)

TOL = 8.0 / 32767 / 2 + 1e-6
HELLO_SIZE = 9 + 4 + len(FIRMWARE)


def frame_size(spf: int = 32) -> int:
    return 9 + 1 + spf * 6


@pytest.fixture
def make_mcu():
    made = []

    def make(**kw):
        mcu = SimulatedMcu(**kw)
        made.append(mcu)
        return mcu

    yield make
    for mcu in made:
        mcu.close()


@pytest.fixture
def open_port():
    opened = []

    def open_(path):
        port = serial.Serial(path, timeout=5)
        opened.append(port)
        return port

    yield open_
    for port in opened:
        port.close()


class Reader:
    """Reads exactly what the MCU wrote since the last call and decodes it."""

    def __init__(self, port, mcu):
        self.port, self.mcu, self.seen = port, mcu, mcu.injected["bytes_written"]
        self.decoder = FrameDecoder()

    def take(self):
        n = self.mcu.injected["bytes_written"] - self.seen
        data = self.port.read(n)
        assert len(data) == n, f"expected {n} bytes from the pty, got {len(data)}"
        self.seen += n
        return data, self.decoder.feed(data)


def samples_of(frames):
    return np.concatenate([f.samples() for f in frames if f.type == FrameType.SAMPLES])


def test_frames_on_the_pty_carry_the_source_samples(make_mcu, open_port):
    mcu = make_mcu(seed=4)
    reader = Reader(open_port(mcu.port), mcu)
    for _ in range(10):
        mcu.emit(10)  # 100 samples: three frames of 32, four carried over
    _, frames = reader.take()
    assert [f.type for f in frames] == [FrameType.HELLO] + [FrameType.SAMPLES] * 3
    assert [f.seq for f in frames] == [0, 1, 2, 3]
    assert frames[0].hello().firmware == FIRMWARE and frames[0].hello().sample_rate_hz == 1000
    np.testing.assert_allclose(samples_of(frames), VibrationSource(4).read(96), atol=TOL)
    mcu.emit(28)
    _, more = reader.take()
    assert [f.seq for f in more] == [4]
    np.testing.assert_allclose(more[0].samples(), VibrationSource(4).read(128)[96:], atol=TOL)
    assert reader.decoder.crc_errors == reader.decoder.garbage_bytes == 0


def test_hello_repeats_every_two_seconds_of_samples(make_mcu, open_port):
    mcu = make_mcu(seed=1)
    reader = Reader(open_port(mcu.port), mcu)
    frames = []
    for _ in range(17):
        mcu.emit(256)  # read as we go: the pty buffers only a few KB
        frames += reader.take()[1]
    hellos = [i for i, f in enumerate(frames) if f.type == FrameType.HELLO]
    # The first frame, then before SAMPLES frame #63 (samples from 2016, the first >= 2000) and #125 (4000);
    # each index counts the HELLOs and SAMPLES frames before it.
    assert hellos == [0, 1 + 63, 2 + 125]
    assert mcu.injected["hello_frames"] == 3 and mcu.injected["sample_frames"] == 136
    assert [f.seq for f in frames] == list(range(139))


def test_pty_is_raw_every_byte_value_passes_untouched(make_mcu, open_port):
    mcu = make_mcu(seed=2)
    reader = Reader(open_port(mcu.port), mcu)
    mcu.inject_garbage(3000)
    data, _ = reader.take()
    assert len(data) == 3000 == mcu.injected["garbage_bytes"]
    # CR, LF, ^C, XON/XOFF, DEL, NUL: a cooked tty would eat, echo or translate these.
    assert set(data) == set(range(256))


def test_garbage_fault_writes_exactly_arg_bytes_between_frames(make_mcu, open_port):
    mcu = make_mcu(seed=5, faults=[Fault(64, FaultKind.GARBAGE, 50)])
    reader = Reader(open_port(mcu.port), mcu)
    mcu.emit(128)
    _, frames = reader.take()
    assert mcu.injected["garbage_bytes"] == 50
    assert reader.decoder.garbage_bytes == 50 - reader.decoder.pending
    assert len(frames) == 5 and reader.decoder.seq_gaps == 0
    np.testing.assert_allclose(samples_of(frames), VibrationSource(5).read(128), atol=TOL)


def test_corrupt_fault_breaks_the_crc_of_the_next_frames(make_mcu, open_port):
    mcu = make_mcu(seed=6, faults=[Fault(64, "corrupt", 2)])
    reader = Reader(open_port(mcu.port), mcu)
    mcu.emit(256)
    _, frames = reader.take()
    assert mcu.injected["corrupted_frames"] == 2
    assert reader.decoder.crc_errors == 2
    assert (reader.decoder.seq_gaps, reader.decoder.dropped_frames) == (1, 2)
    assert len(frames) == 1 + 8 - 2


def test_drop_fault_consumes_seq_without_writing(make_mcu, open_port):
    mcu = make_mcu(seed=7, faults=[Fault(96, FaultKind.DROP, 3)])
    reader = Reader(open_port(mcu.port), mcu)
    mcu.emit(320)
    _, frames = reader.take()
    assert mcu.injected["dropped_frames"] == 3
    assert [f.seq for f in frames] == [0, 1, 2, 3, 7, 8, 9, 10]
    assert frames[4].missing == 3
    ref = VibrationSource(7).read(320)
    got = samples_of(frames)
    np.testing.assert_allclose(got[:96], ref[:96], atol=TOL)
    np.testing.assert_allclose(got[96:], ref[192:], atol=TOL)


def test_stall_fault_writes_nothing_for_arg_samples_and_loses_no_samples(make_mcu, open_port):
    mcu = make_mcu(seed=8, faults=[Fault(64, FaultKind.STALL, 100)])
    reader = Reader(open_port(mcu.port), mcu)
    mcu.emit(64)
    assert len(reader.take()[1]) == 3
    mcu.emit(100)
    assert reader.take()[1] == [] and mcu.injected["stalled_samples"] == 100
    mcu.emit(92)
    _, frames = reader.take()
    assert mcu.samples_emitted == 256 and mcu.source.position == 156
    assert [f.seq for f in frames] == [3, 4]  # 28 samples still carried
    np.testing.assert_allclose(samples_of(frames), VibrationSource(8).read(128)[64:], atol=TOL)


def test_disconnect_fault_with_link_dir_reopens_a_fresh_pty(make_mcu, open_port, tmp_path):
    mcu = make_mcu(seed=9, link_dir=str(tmp_path), faults=[Fault(64, FaultKind.DISCONNECT, 64)])
    assert mcu.port == str(tmp_path / LINK_NAME) and os.path.islink(mcu.port)
    old = open_port(mcu.port)
    reader = Reader(old, mcu)
    mcu.emit(32)
    assert len(reader.take()[1]) == 2
    mcu.emit(32)  # reaches sample 64: the fault fires before emit returns
    assert not mcu.connected and not os.path.lexists(mcu.port)  # like a pulled USB adapter
    with pytest.raises(serial.SerialException):
        old.read(1000)
    mcu.emit(64)  # reaches sample 128: a new pty appears behind the same link
    assert mcu.connected and os.path.islink(mcu.port)
    assert (mcu.injected["disconnects"], mcu.injected["reconnects"], mcu.injected["lost_frames"]) == (1, 1, 2)
    reader = Reader(open_port(mcu.port), mcu)
    mcu.emit(64)
    _, frames = reader.take()
    assert [f.seq for f in frames] == [5, 6]
    np.testing.assert_allclose(samples_of(frames), VibrationSource(9).read(192)[128:], atol=TOL)


def test_disconnect_without_link_dir_stays_down_until_reconnect(make_mcu, open_port):
    mcu = make_mcu(seed=10, faults=[Fault(0, FaultKind.DISCONNECT, 10)])
    first = mcu.port
    mcu.emit(64)
    assert not mcu.connected and mcu.injected["lost_frames"] == 3  # HELLO + 2 SAMPLES
    mcu.disconnect()  # already down: no-op
    assert mcu.injected["disconnects"] == 1
    mcu.reconnect()
    mcu.reconnect()  # already up: no-op
    assert mcu.injected["reconnects"] == 1 and os.path.exists(mcu.port)
    reader = Reader(open_port(mcu.port), mcu)
    mcu.emit(32)
    assert [f.seq for f in reader.take()[1]] == [3]
    assert isinstance(first, str) and first.startswith("/dev/")


def test_heartbeat_is_an_empty_frame_in_sequence(make_mcu, open_port):
    mcu = make_mcu(seed=0)
    reader = Reader(open_port(mcu.port), mcu)
    mcu.emit(32)
    mcu.heartbeat()
    _, frames = reader.take()
    assert [(f.type, f.seq, f.payload) for f in frames[2:]] == [(FrameType.HEARTBEAT, 2, b"")]
    assert mcu.injected["heartbeats"] == 1


def test_writes_never_block_when_nobody_reads(make_mcu, open_port):
    mcu = make_mcu(seed=11)
    port = open_port(mcu.port)  # open but not read: the pty fills up
    mcu.emit(64000)  # ~400 KB of frames; a blocking write would hang here
    inj = mcu.injected
    assert inj["overflow_bytes"] > 0 and inj["overflow_frames"] > 0
    assert inj["frames_written"] + inj["overflow_frames"] == inj["hello_frames"] + inj["sample_frames"]
    data = port.read(inj["bytes_written"])
    assert len(data) == inj["bytes_written"]
    decoder = FrameDecoder()
    frames = decoder.feed(data)
    assert len(frames) == inj["frames_written"]  # whole frames arrive intact; the cut one is incomplete
    assert decoder.crc_errors == 0


def test_live_mode_follows_the_clock(make_mcu, open_port):
    clock = SimClock()
    mcu = make_mcu(seed=12)
    reader = Reader(open_port(mcu.port), mcu)
    mcu.start(clock=clock)
    mcu.start(clock=clock)  # already running: no-op
    clock.advance(0.2)
    assert eventually(lambda: mcu.samples_emitted == 200, timeout=10.0)
    mcu.stop()
    mcu.stop()
    assert mcu.samples_emitted == 200
    _, frames = reader.take()
    np.testing.assert_allclose(samples_of(frames), VibrationSource(12).read(192), atol=TOL)


def test_close_removes_the_link_and_is_idempotent(tmp_path):
    with SimulatedMcu(seed=0, link_dir=str(tmp_path)) as mcu:
        assert os.path.islink(mcu.port)
    assert not os.path.lexists(mcu.port) and not mcu.connected
    mcu.close()
    mcu.emit(64)  # a closed MCU loses what it samples, it does not crash
    assert mcu.injected["lost_frames"] == 3


@pytest.mark.parametrize("args, message", [
    ((-1, "drop", 1), "Fault at_sample must be an int >= 0, got -1"),
    ((0, "drop", -2), "Fault arg must be an int >= 0, got -2"),
    ((0, "melt", 1), "unknown fault kind 'melt'; expected one of garbage, corrupt, drop, stall, disconnect"),
    ((1.5, "drop", 1), "Fault at_sample must be an int >= 0, got 1.5"),
])
def test_fault_validation_names_the_field(args, message):
    with pytest.raises(ValueError, match=message):
        Fault(*args)


def test_fault_kind_accepts_its_string():
    assert Fault(3, "stall", 5).kind is FaultKind.STALL


@pytest.mark.parametrize("kwargs, message", [
    ({"samples_per_frame": 0}, r"samples_per_frame must be an int in 1..170, got 0"),
    ({"samples_per_frame": 171}, r"samples_per_frame must be an int in 1..170, got 171"),
    ({"faults": [(0, "drop", 1)]}, r"faults must be Fault instances, got \(0, 'drop', 1\)"),
    ({"firmware": "caf\u00e9"}, "HELLO firmware version must be printable ASCII, got 'caf\u00e9'"),
    ({"full_scale_g": 0}, "HELLO full_scale_g must be an int in 1..255, got 0"),
])
def test_mcu_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimulatedMcu(**kwargs).close()


def test_emit_and_garbage_reject_negative_counts(make_mcu):
    mcu = make_mcu()
    with pytest.raises(ValueError, match="n_samples must be an int >= 0, got -1"):
        mcu.emit(-1)
    with pytest.raises(ValueError, match="garbage length must be an int >= 0, got -3"):
        mcu.inject_garbage(-3)
