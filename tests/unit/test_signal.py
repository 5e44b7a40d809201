"""Tests of the simulated vibration generator (numpy only)."""

import math
import re

import numpy as np
import pytest

from drivers.sim import signal as sim
from drivers.sim.signal import LABELS, Segment, VibrationSource, make_dataset, schedule

FS = sim.SAMPLE_RATE_HZ
SHAFT_HZ = 25.0  # a fixed speed, so the tests know where the shaft harmonics are


def _stream(state, severity=1.0, seed=11, seconds=4):
    src = VibrationSource(seed, shaft_hz_range=(SHAFT_HZ, SHAFT_HZ))
    src.state = state
    src.severity = severity
    return src.read(int(seconds * FS)).astype(np.float64)


def _power(x):
    """Power spectrum per axis of the mean-removed signal, and its frequency bins."""
    ac = x - x.mean(axis=0)
    return np.abs(np.fft.rfft(ac, axis=0)) ** 2, np.fft.rfftfreq(len(x), 1.0 / FS)


def _band(x, low, high):
    power, freqs = _power(x)
    return power[(freqs >= low) & (freqs <= high)].sum(axis=0)  # per axis


# ----------------------------------------------------------------------------- determinism, shapes


def test_constants():
    assert (FS, sim.WINDOW, sim.AXES) == (1000, 256, 3)
    assert LABELS == ("normal", "imbalance", "bearing_fault", "loose_mount")


def test_make_dataset_shapes_dtypes_and_balance():
    x, y = make_dataset(10, seed=3)
    assert x.shape == (40, 256, 3) and x.dtype == np.float32
    assert y.shape == (40,) and y.dtype == np.int64
    assert np.bincount(y, minlength=4).tolist() == [10, 10, 10, 10]
    assert np.all(np.isfinite(x))
    assert not np.array_equal(y, np.sort(y))  # shuffled, not grouped by class
    x2, _ = make_dataset(2, seed=3, window=100)
    assert x2.shape == (8, 100, 3)


def test_make_dataset_is_deterministic_for_a_seed():
    x1, y1 = make_dataset(5, seed=42)
    x2, y2 = make_dataset(5, seed=42)
    x3, _ = make_dataset(5, seed=43)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(x1, x3)


def test_gravity_on_z_and_small_tilt():
    x, _ = make_dataset(20, seed=5)
    means = x.mean(axis=1)
    assert np.all((means[:, 2] > 0.9) & (means[:, 2] < 1.1))
    assert np.all(np.abs(means[:, :2]) < 0.2)


def test_output_stays_within_sensor_full_scale():
    x, _ = make_dataset(50, seed=9, severity_range=(1.0, 1.0))
    assert np.abs(x).max() <= sim.FULL_SCALE_G


def test_stream_is_deterministic_and_shaped():
    a, b, c = VibrationSource(7), VibrationSource(7), VibrationSource(8)
    ra, rb, rc = a.read(1000), b.read(1000), c.read(1000)
    assert ra.shape == (1000, 3) and ra.dtype == np.float32
    assert np.array_equal(ra, rb)
    assert not np.array_equal(ra, rc)
    assert a.read(0).shape == (0, 3)
    assert a.position == 1000


# ----------------------------------------------------------------------------- continuity


@pytest.mark.parametrize("chunks", [[128, 128], [1, 255], [100, 300, 124], [256, 256], [7] * 80, [1000]])
def test_reads_are_seamless_whatever_the_chunking(chunks):
    whole = VibrationSource(21).read(sum(chunks))
    src = VibrationSource(21)
    parts = np.concatenate([src.read(n) for n in chunks])
    assert np.array_equal(parts, whole)


def test_no_phase_jump_between_reads():
    # A pure, strong 1x on x: consecutive samples differ by at most the slope of the sine, also across
    # the boundary between two reads.
    src = VibrationSource(3, shaft_hz_range=(SHAFT_HZ, SHAFT_HZ))
    src.state, src.severity = "imbalance", 1.0
    first, second = src.read(128), src.read(128)
    x = np.concatenate([first, second])[:, 0]
    steps = np.abs(np.diff(x))
    assert np.ptp(x) > 0.5  # the sine is large compared with the noise
    assert steps[127] <= np.delete(steps, 127).max()  # the seam is no bigger than any other step


def test_schedule_switches_at_the_exact_sample_whatever_the_chunking():
    manual = VibrationSource(5)
    a = manual.read(300)
    manual.state, manual.severity = "bearing_fault", 0.8
    b = manual.read(200)
    scheduled = VibrationSource(5)
    scheduled.follow([Segment(0, "normal", 0.0), Segment(300, "bearing_fault", 0.8)])
    c = np.concatenate([scheduled.read(7) for _ in range(71)] + [scheduled.read(3)])
    assert np.array_equal(np.concatenate([a, b]), c)


def test_state_reports_the_next_sample():
    src = VibrationSource(1)
    src.follow([Segment(0, "normal", 0.0), Segment(500, "imbalance", 0.7)])
    src.read(499)
    assert src.state == "normal"
    src.read(1)
    assert (src.state, src.severity) == ("imbalance", 0.7)


def test_schedule_helper_is_deterministic_and_well_formed():
    s1 = schedule(4, 600.0)
    assert s1 == schedule(4, 600.0)
    assert s1 != schedule(5, 600.0)
    assert s1[0] == Segment(0, "normal", 0.0)
    starts = [seg.start for seg in s1]
    assert starts == sorted(starts) and starts[-1] < 600 * FS
    assert all(a.state != b.state for a, b in zip(s1, s1[1:]))
    assert all(seg.state in LABELS and 0.0 <= seg.severity <= 1.0 for seg in s1)
    assert all(seg.severity == 0.0 for seg in s1 if seg.state == "normal")
    assert all(0.3 <= seg.severity <= 1.0 for seg in s1 if seg.state != "normal")


def test_shaft_speed_wanders_within_range():
    src = VibrationSource(2)
    speeds = []
    for _ in range(120):
        src.read(500)
        speeds.append(src.shaft_hz)
    speeds = np.array(speeds)
    assert np.all((speeds >= 15.0) & (speeds <= 45.0))
    assert speeds.max() - speeds.min() > 1.0


# ----------------------------------------------------------------------------- physics


def test_imbalance_has_much_more_energy_at_the_shaft_frequency():
    normal = _band(_stream("normal"), SHAFT_HZ - 1, SHAFT_HZ + 1)
    imbalance = _band(_stream("imbalance"), SHAFT_HZ - 1, SHAFT_HZ + 1)
    assert imbalance[0] > 20 * normal[0]
    assert imbalance[1] > 20 * normal[1]
    assert imbalance[2] < 0.2 * min(imbalance[0], imbalance[1])  # radial, not axial


def test_imbalance_x_and_y_are_90_degrees_apart():
    x = _stream("imbalance")
    spectrum = np.fft.rfft(x - x.mean(axis=0), axis=0)
    k = int(round(SHAFT_HZ * len(x) / FS))
    phase = np.angle(spectrum[k, 1] / spectrum[k, 0], deg=True)
    assert abs(abs(phase) - 90.0) < 20.0


def test_bearing_fault_adds_high_frequency_energy():
    normal = _band(_stream("normal"), 150, 500).sum()
    bearing = _band(_stream("bearing_fault"), 150, 500).sum()
    assert bearing > 10 * normal
    power, freqs = _power(_stream("bearing_fault"))
    resonance = freqs[np.argmax(power.sum(axis=1) * (freqs > 100))]
    assert 150 < resonance < 400  # the ringing structural resonance (200-350 Hz)


def test_bearing_fault_envelope_repeats_at_the_defect_frequency():
    x = _stream("bearing_fault", seconds=8)[:, 0]
    spectrum = np.fft.rfft(x - x.mean())
    freqs = np.fft.rfftfreq(len(x), 1.0 / FS)
    spectrum[freqs < 150] = 0
    envelope = np.abs(np.fft.irfft(spectrum, n=len(x)))
    power = np.abs(np.fft.rfft(envelope - envelope.mean())) ** 2
    band = (freqs > 2.5 * SHAFT_HZ) & (freqs < 4.5 * SHAFT_HZ)
    peak = freqs[band][np.argmax(power[band])]
    assert 3.2 * SHAFT_HZ - 2 <= peak <= 3.8 * SHAFT_HZ + 2


def test_loose_mount_has_subharmonic_and_harmonics_mostly_on_one_axis():
    normal, loose = _stream("normal"), _stream("loose_mount")
    for order in (0.5, 2.0, 3.0):
        f = order * SHAFT_HZ
        assert _band(loose, f - 1, f + 1).max() > 10 * _band(normal, f - 1, f + 1).max()
    energy = _band(loose, 1, 500)
    dominant = np.argmax(energy)
    assert energy[dominant] > 3 * np.delete(energy, dominant).max()


@pytest.mark.parametrize("seed", [0, 11])
def test_loose_mount_rattles_on_its_axis(seed):
    loose, normal = _stream("loose_mount", seed=seed), _stream("normal", seed=seed)
    axis = np.argmax(_band(loose, 1, 500))
    assert _band(loose, 150, 500)[axis] > 4 * _band(normal, 150, 500)[axis]  # broadband impacts


def test_severity_scales_the_signature_and_zero_is_normal():
    mild = _band(_stream("imbalance", 0.3), SHAFT_HZ - 1, SHAFT_HZ + 1)[0]
    strong = _band(_stream("imbalance", 1.0), SHAFT_HZ - 1, SHAFT_HZ + 1)[0]
    assert strong > 5 * mild
    for state in LABELS[1:]:
        assert np.array_equal(_stream(state, 0.0), _stream("normal"))


def test_dataset_classes_carry_their_signature():
    x, y = make_dataset(100, seed=8, severity_range=(0.5, 1.0))
    ac = x - x.mean(axis=1, keepdims=True)
    power = np.abs(np.fft.rfft(ac, axis=1)) ** 2
    freqs = np.fft.rfftfreq(x.shape[1], 1.0 / FS)
    hf = power[:, freqs > 150].sum(axis=(1, 2))
    lf = power[:, (freqs >= 10) & (freqs <= 50), :2].sum(axis=(1, 2))
    assert np.median(hf[y == 2]) > 5 * np.median(hf[y == 0])
    assert np.median(lf[y == 1]) > 10 * np.median(lf[y == 0])
    assert np.median(power[y == 3].sum(axis=(1, 2))) > 3 * np.median(power[y == 0].sum(axis=(1, 2)))


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", ["broken", "Normal", "", None, 3])
def test_invalid_state_raises_naming_it(bad):
    src = VibrationSource(1)
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        src.state = bad
    assert src.state == "normal"


@pytest.mark.parametrize("bad", [1.5, -0.1, math.nan, math.inf, "high", True, None])
def test_invalid_severity_raises_naming_it(bad):
    src = VibrationSource(1)
    with pytest.raises(ValueError, match="severity") as info:
        src.severity = bad
    assert repr(bad) in str(info.value)
    assert src.severity == 0.5


def test_valid_severities_are_accepted():
    src = VibrationSource(1)
    for value in (0, 1, 0.25, np.float32(0.5), np.int64(1)):
        src.severity = value
        assert src.severity == float(value)


def test_invalid_schedule_raises_and_keeps_the_current_one():
    src = VibrationSource(1)
    src.follow([Segment(0, "normal", 0.0), Segment(100, "imbalance", 0.5)])
    with pytest.raises(ValueError, match="'wobble'"):
        src.follow([Segment(0, "wobble", 0.5)])
    with pytest.raises(ValueError, match="2.0"):
        src.follow([Segment(0, "imbalance", 2.0)])
    with pytest.raises(ValueError, match="start"):
        src.follow([Segment(10, "normal", 0.0), Segment(5, "imbalance", 0.5)])
    src.read(100)
    assert src.state == "imbalance"
    with pytest.raises(ValueError, match="'bogus'"):
        schedule(1, 60.0, states=["normal", "bogus"])


@pytest.mark.parametrize(
    "call",
    [
        lambda: VibrationSource(1).read(-1),
        lambda: VibrationSource(1).read(2.5),
        lambda: VibrationSource(-1),
        lambda: VibrationSource(1, sample_rate_hz=50),
        lambda: VibrationSource(1, shaft_hz_range=(30, 20)),
        lambda: make_dataset(0, seed=1),
        lambda: make_dataset(2, seed=1, window=0),
        lambda: make_dataset(2, seed=1, severity_range=(0.5, 1.5)),
        lambda: schedule(1, -5.0),
    ],
)
def test_other_invalid_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call()
