"""The serial sensor driver, through real pyserial: ``loop://`` for hand-made streams, and the simulated MCU
on a real pseudo-terminal for the whole path (faults, stalls, a pulled adapter and its udev-style symlink)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import serial

from drivers.errors import SerialSensorError
from drivers.sensor import SensorState, SerialSensor
from drivers.serialproto import FrameDecoder, encode_frame, encode_heartbeat, encode_hello, encode_samples
from drivers.sim.clock import SimClock
from drivers.sim.mcu import LINK_NAME, Fault, FaultKind, SimulatedMcu
from drivers.sim.signal import VibrationSource

pytestmark = pytest.mark.timeout(30)

TOL = 8.0 / 32767 / 2 + 1e-6
WAIT = 10.0  # generous real-time bound for every wait; never asserted on


class LoopOpener:
    """``serial_for_url`` that remembers its ports, so the test can write into the driver's ``loop://``."""

    def __init__(self, fail_first: int = 0):
        self.ports: list = []
        self.calls = 0
        self.fail = fail_first

    def __call__(self, url, **kw):
        self.calls += 1
        if self.fail:
            self.fail -= 1
            raise serial.SerialException(f"could not open port {url}: not there yet")
        port = serial.serial_for_url(url, **kw)
        self.ports.append(port)
        return port

    def write(self, data: bytes) -> None:
        self.ports[-1].write(data)


@pytest.fixture
def sensors():
    made = []

    def make(url, **kw):
        kw.setdefault("reconnect", (0.01, 0.05))
        s = SerialSensor(url, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


@pytest.fixture
def mcus():
    made = []

    def make(**kw):
        m = SimulatedMcu(**kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


def until(sensor, predicate):
    assert sensor.wait_until(predicate, WAIT), f"condition not reached: {sensor.health()}"


def polls(sensor, n=4):
    """Waits until the reader thread has gone round its loop at least ``n`` more times (it notifies each time)."""
    seen = []
    until(sensor, lambda h: seen.append(h) or len(seen) > n)


def frames_of(x, first_seq=0, per=32, full_scale_g=8.0):
    return b"".join(encode_samples(x[i:i + per], (first_seq + k) % 65536, full_scale_g)
                    for k, i in enumerate(range(0, len(x), per)))


def windows(sensor):
    out = []
    while (w := sensor.next_window(timeout=0)) is not None:
        out.append(w)
    return out


def starts(wins, ref):
    """Where each window starts in the reference stream; each must be a contiguous slice (never spliced)."""
    out = []
    for w in wins:
        (hits,) = np.nonzero(np.abs(ref[:len(ref) - len(w) + 1] - w[0]).max(axis=1) <= TOL)
        assert len(hits) == 1, "window's first sample not found exactly once in the reference"
        k = int(hits[0])
        np.testing.assert_allclose(w, ref[k:k + len(w)], atol=TOL)
        out.append(k)
    return out


# -- loop:// ----------------------------------------------------------------------------------------------

def test_windows_equal_the_source_samples(sensors):
    opener = LoopOpener()
    s = sensors("loop://", opener=opener)
    s.start()
    x = VibrationSource(1).read(1100)
    data = encode_hello(0, 1000, 3, 8, "fw 1") + frames_of(x, first_seq=1, per=40)
    for i in range(0, len(data), 333):  # chunking unrelated to frames
        opener.write(data[i:i + 333])
    until(s, lambda h: h.samples == 1100)
    got = windows(s)
    assert len(got) == 4
    np.testing.assert_allclose(np.concatenate(got), x[:1024], atol=TOL)
    assert got[0].dtype == np.float32 and got[0].shape == (256, 3) and not got[0].flags.writeable
    h = s.health()
    assert (h.state, h.connected, h.windows, h.seq_gaps, h.crc_errors) == (SensorState.OK, True, 4, 0, 0)
    assert h.hello.firmware == "fw 1" and h.hello.sample_rate_hz == 1000 and h.last_frame_age_s >= 0
    assert h.to_dict()["state"] == "ok" and h.to_dict()["hello"]["axes"] == 3


@pytest.mark.parametrize("hop, expected_starts", [(128, [0, 128, 256, 384]), (300, [0, 300])])
def test_hop_overlaps_or_skips(sensors, hop, expected_starts):
    opener = LoopOpener()
    s = sensors("loop://", opener=opener, hop=hop)
    s.start()
    x = VibrationSource(2).read(640)
    opener.write(frames_of(x))
    until(s, lambda h: h.samples == 640)
    assert starts(windows(s), x) == expected_starts


def test_sequence_gap_across_the_wrap_discards_the_partial_window(sensors):
    opener = LoopOpener()
    s = sensors("loop://", opener=opener)
    s.start()
    x = VibrationSource(3).read(7 * 64)
    chunks = [x[i:i + 64] for i in range(0, len(x), 64)]
    seqs = [65532, 65533, 65534, 1, 2, 3, 4]  # 65535 and 0 are lost
    opener.write(b"".join(encode_samples(c, q) for c, q in zip(chunks, seqs)))
    until(s, lambda h: h.frames == 7)
    h = s.health()
    assert (h.seq_gaps, h.dropped_frames, h.windows, h.windows_discarded) == (1, 2, 1, 1)
    (w,) = windows(s)
    np.testing.assert_allclose(w, x[192:448], atol=TOL)  # never spliced across the hole


def test_crc_error_and_garbage_resync(sensors):
    opener = LoopOpener()
    s = sensors("loop://", opener=opener)
    s.start()
    x = VibrationSource(4).read(512)
    good = [encode_samples(x[i:i + 32], k) for k, i in enumerate(range(0, 512, 32))]
    bad = bytearray(good[3])
    bad[20] ^= 0x10
    garbage = b"\x00\xaa\x13\xaa\x55\xff\xff\x42"  # holds a SYNC with an impossible LEN
    opener.write(garbage + b"".join(good[:3]) + bytes(bad) + b"".join(good[4:]))
    until(s, lambda h: h.frames == 15)
    h = s.health()
    assert (h.crc_errors, h.length_errors, h.seq_gaps, h.dropped_frames) == (1, 1, 1, 1)
    assert h.garbage_bytes == len(garbage) + len(bad)
    assert (h.windows, h.windows_discarded) == (1, 1)
    assert starts(windows(s), x) == [128]


def test_queue_overflow_drops_the_oldest_and_latest_does_not_consume(sensors):
    opener = LoopOpener()
    s = sensors("loop://", opener=opener, queue_size=2)
    s.start()
    x = VibrationSource(5).read(5 * 256)
    opener.write(frames_of(x))
    until(s, lambda h: h.windows == 5)
    assert s.health().windows_overflowed == 3
    latest = s.latest_window()
    assert s.latest_window() is latest
    np.testing.assert_allclose(latest, x[1024:], atol=TOL)
    assert starts(windows(s), x) == [768, 1024]
    assert s.next_window(timeout=0.01) is None
    assert s.latest_window() is latest
    assert s.latest_window(max_age_s=1e9) is latest


def test_latest_window_honours_max_age_on_the_clock(sensors):
    clock = SimClock()
    opener = LoopOpener()
    s = sensors("loop://", opener=opener, clock=clock, read_timeout_s=100.0)
    assert s.latest_window() is None
    s.start()
    opener.write(frames_of(VibrationSource(6).read(256)))
    until(s, lambda h: h.windows == 1)
    assert s.latest_window(max_age_s=0.5) is not None
    clock.advance(1.0)
    assert s.latest_window(max_age_s=0.5) is None and s.latest_window() is not None


def test_payload_errors_are_counted_named_and_break_the_window(sensors):
    opener = LoopOpener()
    s = sensors("loop://", opener=opener)
    s.start()
    x = VibrationSource(7).read(64)
    opener.write(encode_samples(x[:32], 0) + encode_samples(np.zeros((4, 2)), 1))
    until(s, lambda h: h.payload_errors == 1)
    assert s.health().last_error == "SAMPLES frame seq 1: 2 axes, expected 3"
    opener.write(encode_samples(x[32:], 2) + encode_frame(0x01, 3, b"\x03" + bytes(7)))
    until(s, lambda h: h.payload_errors == 2)
    assert "SAMPLES frame seq 3: 7 sample bytes is not a multiple of 2*axes = 6" in s.health().last_error
    opener.write(encode_frame(0x02, 4, b"\xe8\x03"))
    until(s, lambda h: h.payload_errors == 3)
    h = s.health()
    assert h.last_error == "HELLO frame seq 4: payload of 2 bytes, expected at least 4"
    assert (h.windows_discarded, h.samples, h.seq_gaps) == (2, 64, 0)


def test_hello_full_scale_and_axes_are_applied_and_checked(sensors):
    opener = LoopOpener()
    s = sensors("loop://", opener=opener)
    s.start()
    x = np.random.default_rng(8).uniform(-3.9, 3.9, (256, 3))
    opener.write(encode_hello(0, 1000, 3, 4, "fw") + frames_of(x, first_seq=1, full_scale_g=4.0))
    until(s, lambda h: h.windows == 1)
    np.testing.assert_allclose(s.next_window(0), x, atol=4.0 / 32767 / 2 + 1e-6)
    opener.write(encode_hello(9, 1000, 2, 4, "fw"))
    until(s, lambda h: h.hello.axes == 2)
    assert s.health().last_error == "sensor announces 2 axes, driver expects 3"


def test_unknown_types_and_heartbeats_keep_the_sequence_and_the_window(sensors):
    opener = LoopOpener()
    s = sensors("loop://", opener=opener)
    s.start()
    x = VibrationSource(9).read(256)
    data = encode_heartbeat(0)
    for k in range(8):
        data += encode_samples(x[32 * k:32 * k + 32], 2 * k + 1) + encode_frame(0x60, 2 * k + 2, b"future")
    opener.write(data)
    until(s, lambda h: h.windows == 1)
    h = s.health()
    assert (h.state, h.frames, h.unknown_types, h.seq_gaps, h.windows_discarded) == (SensorState.OK, 9, 8, 0, 0)


def test_mcu_restart_is_not_a_gap_but_never_spliced(sensors):
    opener = LoopOpener()
    s = sensors("loop://", opener=opener)
    s.start()
    x = VibrationSource(10).read(512)
    opener.write(frames_of(x[:96], first_seq=500) + encode_hello(0, 1000, 3, 8, "fw") + frames_of(x[96:352], 1))
    until(s, lambda h: h.windows == 1)
    h = s.health()
    assert (h.restarts, h.seq_gaps, h.windows_discarded) == (1, 0, 1)
    assert starts(windows(s), x) == [96]


def test_port_closed_under_the_driver_is_reopened(sensors):
    opener = LoopOpener()
    s = sensors("loop://", opener=opener)
    s.start()
    x = VibrationSource(11).read(512)
    opener.write(frames_of(x[:128]))
    until(s, lambda h: h.samples == 128)
    opener.ports[-1].close()  # the device vanishes: pyserial raises on the next read
    until(s, lambda h: h.reconnects == 1 and h.connected)
    assert len(opener.ports) == 2
    opener.write(frames_of(x[128:], first_seq=4))
    until(s, lambda h: h.samples == 512)
    h = s.health()
    assert (h.windows_discarded, h.seq_gaps, h.windows) == (1, 0, 1)  # the half window before the loss is gone
    assert "read from loop:// failed" in h.last_error
    assert starts(windows(s), x) == [128] and s.running


def test_unexpected_exception_does_not_kill_the_thread(sensors, mocker):
    real_feed = FrameDecoder.feed
    calls = []

    def flaky(self, data):
        calls.append(len(data))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_feed(self, data)

    mocker.patch.object(FrameDecoder, "feed", autospec=True, side_effect=flaky)
    opener = LoopOpener()
    s = sensors("loop://", opener=opener)
    s.start()
    opener.write(b"\x00")
    until(s, lambda h: h.reconnects == 1 and h.connected)
    assert s.health().last_error == "unexpected RuntimeError: boom" and s.running
    opener.write(frames_of(VibrationSource(12).read(256)))
    until(s, lambda h: h.windows == 1)


def test_open_failures_back_off_exponentially_with_jitter_on_the_clock(sensors):
    clock = SimClock()
    opener = LoopOpener(fail_first=4)
    s = sensors("loop://", opener=opener, clock=clock, reconnect=(0.2, 0.5), read_timeout_s=100.0)
    s.start()
    for attempt, (lo, hi) in enumerate([(0.1, 0.2), (0.2, 0.4), (0.25, 0.5), (0.25, 0.5)], start=1):
        h = s.health()
        assert (h.open_failures, h.state, h.connected) == (attempt, SensorState.DISCONNECTED, False)
        assert "could not open port loop://: not there yet" in h.last_error
        assert lo <= h.retry_in_s <= hi, f"attempt {attempt}: retry in {h.retry_in_s}, expected {lo}..{hi}"
        clock.advance(h.retry_in_s + 1e-9)
        until(s, lambda h, n=attempt: h.open_failures > n or h.connected)
    until(s, lambda h: h.connected)
    h = s.health()
    assert (h.reconnects, h.open_failures, h.retry_in_s, h.state) == (0, 4, None, SensorState.STARTING)
    # A frame resets the backoff: the next loss retries after the minimum again.
    opener.write(encode_heartbeat(0))
    until(s, lambda h: h.frames == 1)
    opener.ports[-1].close()
    until(s, lambda h: not h.connected)
    assert 0.1 <= s.health().retry_in_s <= 0.2
    clock.advance(s.health().retry_in_s + 1e-9)
    until(s, lambda h: h.reconnects == 1)


def test_unusable_url_is_refused_at_start(sensors):
    s = sensors("bogus://nowhere")
    with pytest.raises(SerialSensorError, match="sensor port 'bogus://nowhere' cannot be used: .*bogus"):
        s.start()
    assert not s.running and s.next_window(timeout=None) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"url": ""}, "url must be a non-empty string, got ''"),
    ({"window": 0}, "window must be an int >= 1, got 0"),
    ({"axes": 256}, "axes must be an int in 1..255, got 256"),
    ({"hop": 0}, "hop must be an int >= 1, got 0"),
    ({"read_timeout_s": 0}, "read_timeout_s must be a positive number, got 0"),
    ({"reconnect": (1.0, 0.5)}, r"reconnect must satisfy 0 < min <= max, got \(1.0, 0.5\)"),
    ({"reconnect": 3}, "reconnect must be a \\(min, max\\) pair of seconds, got 3"),
    ({"queue_size": 0}, "queue_size must be an int >= 1, got 0"),
    ({"full_scale_g": -8}, "full_scale_g must be a positive number, got -8"),
    ({"baudrate": "fast"}, "baudrate must be an int >= 1, got 'fast'"),
])
def test_constructor_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SerialSensor(**{"url": "loop://", **kwargs})


def test_stop_is_clean_and_idempotent(sensors):
    opener = LoopOpener()
    s = sensors("loop://", opener=opener)
    s.stop()  # never started: fine
    s.start()
    s.start()  # already running: no-op
    assert len(opener.ports) == 1
    result: list = []
    waiter = threading.Thread(target=lambda: result.append(s.next_window(timeout=None)))
    waiter.start()
    s.stop()
    waiter.join(WAIT)
    assert result == [None]  # a blocked consumer is released by stop()
    s.stop()
    h = s.health()
    assert not s.running and not opener.ports[0].is_open
    assert (h.state, h.connected) == (SensorState.DISCONNECTED, False)
    with SerialSensor("loop://", opener=opener) as s2:
        assert s2.running
    assert not s2.running and not opener.ports[1].is_open


class CountingCondition(threading.Condition):
    """A condition that counts how often a waiter on it woke up (to see who the reader thread disturbs)."""

    wakes = 0

    def wait(self, timeout=None):
        try:
            return super().wait(timeout)
        finally:
            self.wakes += 1


def test_a_consumer_is_woken_for_windows_not_for_reads(sensors):
    opener = LoopOpener()
    s = sensors("loop://", opener=opener)
    counting = s._ready = CountingCondition(s._cond._lock)  # the same lock; only the counting is added
    s.start()
    got: list = []
    consumer = threading.Thread(target=lambda: got.append(s.next_window(timeout=None)))
    consumer.start()
    x = VibrationSource(20).read(256)
    for k in range(7):  # 224 samples: not yet a window, 7 reads at least
        opener.write(frames_of(x[32 * k:32 * k + 32], first_seq=k))
        until(s, lambda h, n=k + 1: h.frames == n)
    assert got == [] and counting.wakes == 0
    opener.write(frames_of(x[224:], first_seq=7))
    consumer.join(WAIT)
    assert len(got) == 1 and counting.wakes == 1
    np.testing.assert_allclose(got[0], x, atol=TOL)


@pytest.mark.parametrize("on_pty", [False, True])
def test_stop_cuts_a_long_read_short(sensors, mcus, on_pty):
    # A read may now last up to read_timeout_s; stop() cancels it rather than waiting (a hang fails the test).
    opener = LoopOpener()
    if on_pty:
        mcu = mcus(seed=21)
        s = sensors(mcu.port, read_timeout_s=600.0)
    else:
        s = sensors("loop://", opener=opener, read_timeout_s=600.0)
    s.start()
    until(s, lambda h: h.connected)
    if on_pty:
        mcu.emit(256)
        until(s, lambda h: h.windows == 1)
    s.stop()
    assert not s.running and s.health().state == SensorState.DISCONNECTED


def test_a_port_without_cancel_read_is_read_in_short_slices(sensors):
    # socket:// cannot cancel a read; the driver keeps its reads short so that stop() still returns.
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    s = sensors(f"socket://127.0.0.1:{server.getsockname()[1]}", read_timeout_s=600.0)
    s.start()
    peer, _ = server.accept()
    try:
        peer.sendall(encode_heartbeat(0))
        until(s, lambda h: h.frames == 1)
        s.stop()
        assert not s.running
    finally:
        peer.close()
        server.close()


# -- the simulated MCU on a real pty ----------------------------------------------------------------------

def synced(mcu):
    """The driver has seen every frame the MCU wrote intact (corrupted ones fail their CRC)."""
    return lambda h: h.frames + h.crc_errors == mcu.injected["frames_written"]


def test_a_steady_stream_is_read_a_few_times_a_window_not_once_a_frame(sensors, mcus):
    """With the MCU's sample rate known (HELLO), the reader lets a window's frames gather between reads: far fewer
    turns than frames, nothing lost on the pty, every window a contiguous slice of the source."""
    turns = [0]  # reads of the port

    def opener(url, **kw):
        port = serial.serial_for_url(url, **kw)
        read = port.read

        def counted(size=1):
            turns[0] += 1  # a turn of the reader is one or two reads
            return read(size)

        port.read = counted
        return port

    mcu = mcus(seed=5)  # 1 kHz, 32 samples a frame
    s = sensors(mcu.port, opener=opener, window=256)
    s.start()
    until(s, lambda h: h.connected)
    mcu.start()
    until(s, lambda h: h.windows >= 8)
    mcu.stop()
    h = s.health()
    assert mcu.injected["overflow_bytes"] == 0 and h.seq_gaps == 0 and h.crc_errors == 0
    assert turns[0] * 3 <= h.frames, f"{turns[0]} reads for {h.frames} frames"
    ref = VibrationSource(5).read(h.samples + 256)
    got = starts(windows(s), ref)
    assert got == [got[0] + 256 * k for k in range(len(got))]


def test_windows_from_the_mcu_pty_equal_the_source(sensors, mcus):
    mcu = mcus(seed=13, samples_per_frame=50)
    s = sensors(mcu.port)
    s.start()
    until(s, lambda h: h.connected)
    for _ in range(5):
        mcu.emit(256)
        until(s, synced(mcu))
    ref = VibrationSource(13).read(1280)
    assert starts(windows(s), ref) == [0, 256, 512, 768]  # 1250 samples framed so far
    h = s.health()
    assert (h.samples, h.garbage_bytes, h.crc_errors, h.seq_gaps) == (1250, 0, 0, 0)
    assert h.hello.axes == 3 and h.hello.full_scale_g == 8


def test_drops_and_corruption_are_counted_exactly(sensors, mcus):
    faults = [Fault(300, FaultKind.DROP, 2), Fault(700, FaultKind.CORRUPT, 1)]
    mcu = mcus(seed=14, faults=faults)
    s = sensors(mcu.port)
    s.start()
    until(s, lambda h: h.connected)
    for _ in range(10):
        mcu.emit(128)
        until(s, synced(mcu))
    h = s.health()
    inj = mcu.injected
    assert (inj["dropped_frames"], inj["corrupted_frames"]) == (2, 1)
    assert h.crc_errors == inj["corrupted_frames"]
    assert (h.seq_gaps, h.dropped_frames) == (2, inj["dropped_frames"] + inj["corrupted_frames"])
    assert h.windows_discarded == 2
    # Lost: samples 288..351 (dropped) and 672..703 (corrupted); windows restart after each hole.
    assert starts(windows(s), VibrationSource(14).read(1280)) == [0, 352, 704, 960]


def test_garbage_is_resynced_and_loses_no_samples(sensors, mcus):
    faults = [Fault(100, FaultKind.GARBAGE, 300), Fault(500, FaultKind.GARBAGE, 77)]
    mcu = mcus(seed=15, faults=faults)
    s = sensors(mcu.port)
    s.start()
    until(s, lambda h: h.connected)
    for _ in range(8):
        mcu.emit(128)
        until(s, synced(mcu))
    h = s.health()
    assert h.garbage_bytes == mcu.injected["garbage_bytes"] == 377
    assert (h.windows_discarded, h.seq_gaps) == (0, 0)
    assert starts(windows(s), VibrationSource(15).read(1024)) == [0, 256, 512, 768]


def test_stall_counts_one_timeout_marks_stale_and_recovers(sensors, mcus):
    clock = SimClock()  # the test is the virtual board: it owns time for both sides
    mcu = mcus(seed=16, faults=[Fault(256, FaultKind.STALL, 320)])
    s = sensors(mcu.port, clock=clock, read_timeout_s=0.1)
    s.start()
    until(s, lambda h: h.connected)

    def step():  # 32 ms of board time: less than the read timeout, so only the stall is silent
        mcu.emit(32)
        clock.advance(0.032)

    for _ in range(8):
        step()
        until(s, synced(mcu))
    assert s.health().state == SensorState.OK
    for _ in range(5):  # 160 ms of silence
        step()
    until(s, lambda h: h.timeouts == 1 and h.state == SensorState.STALE)
    for _ in range(5):  # the rest of the stall
        step()
    polls(s)
    assert s.health().timeouts == 1  # one per silent period, however often the thread looks
    for _ in range(8):
        step()
        until(s, synced(mcu))
    h = s.health()
    assert (h.state, h.timeouts, h.windows_discarded) == (SensorState.OK, 1, 0)
    assert "no frame from" in h.last_error
    # A stall loses no samples (the MCU froze), so the windows stay contiguous.
    assert starts(windows(s), VibrationSource(16).read(768)) == [0, 256]
    clock.advance(0.2)
    until(s, lambda h: h.timeouts == 2)


def test_silence_on_the_real_clock_goes_stale_and_a_heartbeat_revives(sensors, mcus):
    mcu = mcus(seed=17)
    s = sensors(mcu.port, read_timeout_s=0.1)
    s.start()
    until(s, lambda h: h.connected)
    mcu.emit(256)
    until(s, lambda h: h.windows == 1)
    until(s, lambda h: h.state == SensorState.STALE)
    stale = s.health()
    assert stale.timeouts >= 1 and stale.last_frame_age_s >= 0.1  # >= 1: a slow start may add a period
    mcu.heartbeat()
    until(s, lambda h: h.state == SensorState.OK and h.frames == stale.frames + 1)
    assert s.health().seq_gaps == 0


def test_pulled_adapter_reconnects_through_the_symlink(sensors, mcus, tmp_path):
    mcu = mcus(seed=18, link_dir=str(tmp_path), faults=[Fault(520, FaultKind.DISCONNECT, 120)])
    s = sensors(mcu.port)
    s.start()
    until(s, lambda h: h.connected)
    for _ in range(8):
        mcu.emit(64)
        until(s, synced(mcu))
    mcu.emit(64)  # sample 520: the adapter is pulled and the link disappears
    until(s, lambda h: not h.connected)
    mcu.emit(64)  # sample 640: a fresh pty appears behind the link
    assert mcu.injected["lost_frames"] == 4
    until(s, lambda h: h.reconnects == 1 and h.connected)
    for _ in range(8):
        mcu.emit(64)
        until(s, synced(mcu))
    h = s.health()
    assert (h.reconnects, h.seq_gaps, h.windows_discarded, h.windows) == (1, 0, 0, 4)
    assert mcu.port in h.last_error and s.running
    assert starts(windows(s), VibrationSource(18).read(1152)) == [0, 256, 640, 896]


def test_sensor_waits_for_a_device_that_appears_later(sensors, mcus, tmp_path):
    path = str(tmp_path / LINK_NAME)
    s = sensors(path)
    s.start()
    until(s, lambda h: h.open_failures >= 2)
    h = s.health()
    assert (h.state, h.connected) == (SensorState.DISCONNECTED, False)
    assert f"cannot open {path}" in h.last_error and s.running
    mcu = mcus(seed=19, link_dir=str(tmp_path))
    until(s, lambda h: h.connected)
    mcu.emit(256)
    until(s, lambda h: h.windows == 1)
    assert s.health().reconnects == 0  # the first connection is not a reconnect
