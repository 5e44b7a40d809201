"""Simulated vibration of a rotating machine as seen by a 3-axis accelerometer.

This module is the single source of the simulated physics: the vibration models are trained on
:func:`make_dataset`, and the virtual board streams the same signal from :class:`VibrationSource`.

The machine is a shaft turning at 15-45 Hz (slowly varying), measured by an accelerometer in g
(x and y radial, z axial; gravity adds about +1 g on z, with a small random tilt). Every state shares
a "healthy" baseline: a small 1x shaft component with random amplitude and phase per axis, a smaller
2x component and white sensor noise. Faults add their signature on top, scaled by a severity in
``[0, 1]`` (0 means no fault signature at all, so faults blend into ``normal`` at low severity):

* ``imbalance``: a strong 1x component on the radial axes, x and y 90 degrees apart (an ellipse),
  growing with the square of the shaft speed.
* ``bearing_fault``: impulses at a bearing defect frequency (about 3.5x shaft) that ring a structural
  resonance (200-350 Hz, decaying within a few ms), amplitude-modulated once per revolution and with
  slightly irregular spacing (rolling-element slip).
* ``loose_mount``: many harmonics (0.5x, 1x, 2x, 3x) mostly on one axis, truncated on one side where
  the mount lifts off and hits its stop, with broadband rattle while it does.

The output saturates at the sensor full scale (+/-8 g). Every component is an elementwise function of
the continuous shaft phase and of per-sample noise, so a stream can be read in chunks of any size with
no seam, and everything is deterministic for a seed.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple, Sequence

import numpy as np

SAMPLE_RATE_HZ = 1000
WINDOW = 256
AXES = 3
LABELS = ("normal", "imbalance", "bearing_fault", "loose_mount")
FULL_SCALE_G = 8.0
GRAVITY_AXIS = 2
SHAFT_HZ_RANGE = (15.0, 45.0)
DEFAULT_SEVERITY_RANGE = (0.1, 1.0)

_TWO_PI = 2.0 * math.pi
_BLOCK = 256  # samples the stream generates at a time (internal; reads of any size are seamless)
_SPEED_STEP_HZ = 0.4  # standard deviation of the shaft speed random walk per block
_SLIP_STEP = 0.002  # standard deviation of the bearing slip random walk per sample, in defect cycles
_REF_SHAFT_HZ = 30.0  # shaft speed at which the imbalance gain applies unscaled


class Segment(NamedTuple):
    """One step of a schedule: from sample ``start`` on, the machine is in ``state`` at ``severity``."""

    start: int  # first sample, counted from where the schedule begins
    state: str  # one of LABELS
    severity: float  # in [0, 1], ignored for "normal"


def _number(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (Real, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    if not low <= float(value) <= high:  # also rejects NaN
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _integer(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _pair(name: str, value: Sequence[float], low: float, high: float) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair, got {value!r}") from None
    if not low <= lo <= hi <= high:
        raise ValueError(f"{name} must satisfy {low} <= low <= high <= {high}, got {value!r}")
    return lo, hi


def check_state(state: object) -> str:
    """Returns ``state`` if it is one of :data:`LABELS`, else raises ValueError naming it."""
    if not isinstance(state, str) or state not in LABELS:
        raise ValueError(f"unknown state {state!r}; expected one of {', '.join(LABELS)}")
    return state


def check_severity(severity: object) -> float:
    """Returns ``severity`` as a float if it is a number in [0, 1], else raises ValueError naming it."""
    return _number("severity", severity, 0.0, 1.0)


def _hash_unit(index: np.ndarray, salt: np.ndarray) -> np.ndarray:
    """Maps integer impulse indices to reproducible pseudo-random values in [-1, 1) (splitmix64)."""
    with np.errstate(over="ignore"):
        x = index.astype(np.int64).astype(np.uint64) + salt.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(40)).astype(np.float64) / float(1 << 23) - 1.0


def _draw_params(rng: np.random.Generator, n: int, sample_rate_hz: float) -> dict[str, np.ndarray]:
    """Draws the random constants of ``n`` machines (one per dataset window, or one per stream)."""
    u = rng.uniform
    tilt = np.radians(u(0.0, 5.0, n))
    azimuth = u(0.0, _TWO_PI, n)
    gravity = np.zeros((n, AXES))
    gravity[:, 0] = np.sin(tilt) * np.cos(azimuth)
    gravity[:, 1] = np.sin(tilt) * np.sin(azimuth)
    gravity[:, GRAVITY_AXIS] = np.cos(tilt)
    loose_axis = rng.choice(AXES, size=n, p=[0.3, 0.3, 0.4])
    loose_coupling = u(0.1, 0.3, (n, AXES))
    loose_coupling[np.arange(n), loose_axis] = 1.0
    two_pi, a3 = _TWO_PI, (n, AXES)
    return {  # (the order of the draws is part of the output for a seed)
        # healthy baseline: 1x per axis, a little 2x, sensor noise
        "gravity": gravity, "amp_1x": u(0.02, 0.08, n), "gain_1x": u(0.5, 1.5, a3),
        "phase_1x": u(0.0, two_pi, a3), "amp_2x": u(0.005, 0.03, n), "phase_2x": u(0.0, two_pi, a3),
        "noise_g": u(0.01, 0.04, a3),
        # imbalance
        "imb_gain": u(0.4, 1.0, n), "imb_ellipse": u(0.6, 1.0, n), "imb_phase": u(0.0, two_pi, n),
        "imb_axial": u(0.05, 0.15, n),
        # bearing fault
        "bear_ratio": u(3.2, 3.8, n), "bear_res_hz": np.minimum(u(200.0, 350.0, n), 0.4 * sample_rate_hz),
        "bear_decay_s": u(0.002, 0.006, n), "bear_gain": u(0.6, 1.6, n), "bear_jitter": u(0.1, 0.4, n),
        "bear_am_depth": u(0.2, 0.8, n), "bear_am_phase": u(0.0, two_pi, n), "bear_axes": u(0.3, 1.0, a3),
        "bear_salt": rng.integers(0, 1 << 31, n),
        # loose mount: harmonics 0.5x, 1x, 2x, 3x
        "loose_amps": u(0.15, 0.5, (n, 4)), "loose_phases": u(0.0, two_pi, (n, 4)),
        "loose_clip": u(0.3, 0.6, n), "loose_rattle_g": u(0.1, 0.4, n), "loose_coupling": loose_coupling,
    }


def _kinematics(
    rng: np.random.Generator, hz_start: np.ndarray, hz_end: np.ndarray, theta0: np.ndarray,
    slip0: np.ndarray, n_samples: int, sample_rate_hz: float,
) -> dict[str, np.ndarray]:
    """Shaft speed (ramping from ``hz_start`` to ``hz_end``), phase, bearing slip and noise per sample.

    ``theta0`` (radians) and ``slip0`` (defect cycles) are the values just before the first sample.
    """
    n = hz_start.shape[0]
    ramp = np.arange(1, n_samples + 1, dtype=np.float64) / n_samples
    hz = hz_start[:, None] + (hz_end - hz_start)[:, None] * ramp
    theta = theta0[:, None] + np.cumsum(hz, axis=1) * (_TWO_PI / sample_rate_hz)
    slip = slip0[:, None] + np.cumsum(rng.normal(0.0, _SLIP_STEP, (n, n_samples)), axis=1)
    noise, rattle = rng.standard_normal((n, n_samples, AXES)), rng.standard_normal((n, n_samples, AXES))
    return {"hz": hz, "theta": theta, "slip": slip, "noise": noise, "rattle": rattle}


def _render(state: str, severity: np.ndarray, p: dict, kin: dict) -> np.ndarray:
    """Renders acceleration in g, shape ``[n, T, AXES]``; elementwise in time (chunking-invariant)."""
    theta, hz = kin["theta"], kin["hz"]
    th = theta[..., None]
    sev = severity[:, None]

    x = p["amp_1x"][:, None, None] * p["gain_1x"][:, None, :] * np.cos(th + p["phase_1x"][:, None, :])
    x += p["amp_2x"][:, None, None] * np.cos(2.0 * th + p["phase_2x"][:, None, :])
    x += kin["noise"] * p["noise_g"][:, None, :]
    x += p["gravity"][:, None, :]

    if state == "imbalance":
        amp = sev * p["imb_gain"][:, None] * (hz / _REF_SHAFT_HZ) ** 2
        ph = theta + p["imb_phase"][:, None]
        x[..., 0] += amp * np.cos(ph)
        x[..., 1] += amp * p["imb_ellipse"][:, None] * np.sin(ph)
        x[..., 2] += amp * p["imb_axial"][:, None] * np.cos(ph)
    elif state == "bearing_fault":
        cycles = p["bear_ratio"][:, None] * theta / _TWO_PI + kin["slip"]
        index = np.floor(cycles)
        since_s = (cycles - index) / (p["bear_ratio"][:, None] * hz)  # time since the last impulse
        decay = np.exp(-since_s / p["bear_decay_s"][:, None])
        ring = decay * np.sin(_TWO_PI * p["bear_res_hz"][:, None] * since_s)
        strength = 1.0 + p["bear_jitter"][:, None] * _hash_unit(index, p["bear_salt"][:, None])
        modulation = 1.0 + p["bear_am_depth"][:, None] * np.cos(theta + p["bear_am_phase"][:, None])
        burst = sev * p["bear_gain"][:, None] * strength * modulation * ring
        x += burst[..., None] * p["bear_axes"][:, None, :]
    elif state == "loose_mount":
        amps, phases = p["loose_amps"], p["loose_phases"]
        motion = np.zeros_like(theta)
        for k, order in enumerate((0.5, 1.0, 2.0, 3.0)):
            motion += amps[:, k, None] * np.cos(order * theta + phases[:, k, None])
        stop = p["loose_clip"][:, None] * amps.sum(axis=1)[:, None]
        lifted = motion > stop
        motion = np.where(lifted, stop + 0.1 * (motion - stop), motion)
        rattle = lifted[..., None] * p["loose_rattle_g"][:, None, None] * kin["rattle"]
        shake = sev[..., None] * (motion[..., None] + rattle)
        x += shake * p["loose_coupling"][:, None, :]
    return np.clip(x, -FULL_SCALE_G, FULL_SCALE_G)


def make_dataset(
    n_per_class: int, seed: int, window: int = WINDOW, *,
    sample_rate_hz: float = SAMPLE_RATE_HZ, severity_range: Sequence[float] = DEFAULT_SEVERITY_RANGE,
) -> tuple[np.ndarray, np.ndarray]:
    """Makes a labelled, shuffled set of independent windows for training and evaluation.

    Each window is a different random machine (amplitudes, phases, tilt, resonance...) at a random
    shaft speed in :data:`SHAFT_HZ_RANGE` (drifting by up to 3% within the window) and, for faults,
    a severity drawn uniformly from ``severity_range``.

    Args:
        n_per_class: Windows per class (the result has ``4 * n_per_class`` rows).
        seed: Seed; the same seed always gives the same data.
        window: Samples per window.
        sample_rate_hz: Sample rate.
        severity_range: ``(low, high)`` range of fault severities, within ``[0, 1]``.

    Returns:
        ``(x, y)``: x is float32 ``[N, window, 3]`` in g, y is int64 ``[N]`` indexing :data:`LABELS`.

    Raises:
        ValueError: If an argument is out of range.
    """
    n = _integer("n_per_class", n_per_class, 1)
    window = _integer("window", window, 1)
    rate = _number("sample_rate_hz", sample_rate_hz, 200.0, math.inf)
    sev_lo, sev_hi = _pair("severity_range", severity_range, 0.0, 1.0)
    rng = np.random.default_rng(seed)
    lo, hi = SHAFT_HZ_RANGE
    xs, ys = [], []
    for code, label in enumerate(LABELS):
        params = _draw_params(rng, n, rate)
        hz_start = rng.uniform(lo, hi, n)
        hz_end = np.clip(hz_start * (1.0 + rng.uniform(-0.03, 0.03, n)), lo, hi)
        theta0, slip0 = rng.uniform(0.0, _TWO_PI, n), rng.uniform(0.0, 1.0, n)
        kin = _kinematics(rng, hz_start, hz_end, theta0, slip0, window, rate)
        severity = rng.uniform(sev_lo, sev_hi, n)
        xs.append(_render(label, severity, params, kin).astype(np.float32))
        ys.append(np.full(n, code, dtype=np.int64))
    order = rng.permutation(n * len(LABELS))
    return np.concatenate(xs)[order], np.concatenate(ys)[order]


def schedule(
    seed: int, duration_s: float, *, sample_rate_hz: float = SAMPLE_RATE_HZ,
    segment_s: Sequence[float] = (10.0, 60.0), severity_range: Sequence[float] = (0.3, 1.0),
    states: Sequence[str] = LABELS,
) -> tuple[Segment, ...]:
    """Makes a deterministic scenario for :meth:`VibrationSource.follow`.

    It starts ``normal`` at sample 0, then changes to a different random state every ``segment_s``
    seconds (drawn uniformly), with a random severity (0 for ``normal``), until ``duration_s``.

    Args:
        seed: Seed; the same arguments always give the same schedule.
        duration_s: Length of the scenario in seconds.
        sample_rate_hz: Sample rate, to turn seconds into sample indices.
        segment_s: ``(low, high)`` length of a segment in seconds.
        severity_range: ``(low, high)`` fault severity, within ``[0, 1]``.
        states: States to pick from (each one of :data:`LABELS`).

    Returns:
        The segments, ordered by ``start``.

    Raises:
        ValueError: If an argument is out of range or a state is unknown.
    """
    rate = _number("sample_rate_hz", sample_rate_hz, 200.0, math.inf)
    duration_s = _number("duration_s", duration_s, 0.0, math.inf)
    seg_lo, seg_hi = _pair("segment_s", segment_s, 1.0 / rate, math.inf)
    sev_lo, sev_hi = _pair("severity_range", severity_range, 0.0, 1.0)
    choices = [check_state(s) for s in states]
    if not choices:
        raise ValueError("states must not be empty")
    rng = np.random.default_rng(seed)
    segments = [Segment(0, "normal", 0.0)]
    end = int(round(duration_s * rate))
    start = int(round(rng.uniform(seg_lo, seg_hi) * rate))
    while start < end:
        options = [s for s in choices if s != segments[-1].state] or choices
        state = options[int(rng.integers(len(options)))]
        severity = 0.0 if state == "normal" else round(float(rng.uniform(sev_lo, sev_hi)), 3)
        segments.append(Segment(start, state, severity))
        start += max(1, int(round(rng.uniform(seg_lo, seg_hi) * rate)))
    return tuple(segments)


class VibrationSource:
    """A continuous accelerometer stream from one simulated machine.

    The machine's constants (amplitudes, phases, tilt, resonance, loose axis...) are fixed by the
    seed; the shaft speed follows a slow random walk within ``shaft_hz_range``. ``state`` and
    ``severity`` may be changed at any time and apply from the next sample read, or can be driven by a
    schedule (see :meth:`follow`). The samples do not depend on how reads are split.

    Args:
        seed: Seed (a non-negative integer); identical seeds and call sequences give identical data.
        sample_rate_hz: Sample rate in Hz (at least 200).
        shaft_hz_range: ``(low, high)`` shaft speed in Hz; equal bounds give a constant speed.

    Raises:
        ValueError: If an argument is out of range.
    """

    def __init__(
        self, seed: int, sample_rate_hz: float = SAMPLE_RATE_HZ, *,
        shaft_hz_range: Sequence[float] = SHAFT_HZ_RANGE,
    ) -> None:
        seed = _integer("seed", seed, 0)
        self._rate = _number("sample_rate_hz", sample_rate_hz, 200.0, math.inf)
        self._hz_lo, self._hz_hi = _pair("shaft_hz_range", shaft_hz_range, 1.0, self._rate / 8.0)
        machine_rng = np.random.default_rng([seed, 0])
        self._params = _draw_params(machine_rng, 1, self._rate)
        self._rng = np.random.default_rng([seed, 1])
        self._hz_end = machine_rng.uniform(self._hz_lo, self._hz_hi, 1)
        self._theta_end = machine_rng.uniform(0.0, _TWO_PI, 1)
        self._slip_end = machine_rng.uniform(0.0, 1.0, 1)
        self._state = "normal"
        self._severity = 0.5
        self._position = 0
        self._block_index = -1
        self._block: dict[str, np.ndarray] = {}
        self._schedule: list[Segment] = []  # absolute starts, not yet applied

    sample_rate_hz = property(lambda self: self._rate, doc="Sample rate in Hz.")
    position = property(lambda self: self._position, doc="Number of samples read so far.")

    @property
    def state(self) -> str:
        """State of the next sample, one of :data:`LABELS` (raises ValueError on set if unknown)."""
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = check_state(value)

    @property
    def severity(self) -> float:
        """Fault severity of the next sample, in ``[0, 1]`` (raises ValueError on set if out of range)."""
        return self._severity

    @severity.setter
    def severity(self, value: float) -> None:
        self._severity = check_severity(value)

    @property
    def shaft_hz(self) -> float:
        """Shaft speed in Hz at the last sample read (the starting speed before any read)."""
        if self._position == 0:
            return float(self._hz_end[0])
        return float(self._block["hz"][0, (self._position - 1) % _BLOCK])

    def follow(self, segments: Sequence[Segment]) -> None:
        """Drives ``state`` and ``severity`` from a schedule, starting at the current position.

        Segment starts count from the current position; a segment takes effect exactly at its start
        sample, whatever the read sizes. Setting ``state``/``severity`` by hand still works and lasts
        until the next segment. An empty sequence cancels the schedule.

        Args:
            segments: Segments with non-decreasing ``start`` >= 0 (e.g. from :func:`schedule`).

        Raises:
            ValueError: If a segment is malformed; the current schedule is then left unchanged.
        """
        pending, previous = [], 0
        for seg in segments:
            try:
                start, state, severity = seg
            except (TypeError, ValueError):
                raise ValueError(f"a segment must be (start, state, severity), got {seg!r}") from None
            start = _integer("segment start", start, previous)
            pending.append(Segment(self._position + start, check_state(state), check_severity(severity)))
            previous = start
        self._schedule = pending
        self._apply_schedule()

    def read(self, n: int) -> np.ndarray:
        """Reads the next ``n`` samples.

        Args:
            n: Number of samples (>= 0).

        Returns:
            float32 array ``[n, 3]`` of acceleration in g (x, y radial, z axial).

        Raises:
            ValueError: If ``n`` is negative or not an integer.
        """
        n, done = _integer("n", n, 0), 0
        out = np.empty((n, AXES), dtype=np.float32)
        while done < n:
            self._apply_schedule()
            block, offset = divmod(self._position, _BLOCK)
            self._ensure_block(block)
            count = min(_BLOCK - offset, n - done)
            if self._schedule:
                count = min(count, self._schedule[0].start - self._position)
            kin = {key: value[:, offset : offset + count] for key, value in self._block.items()}
            severity = np.array([self._severity])
            out[done : done + count] = _render(self._state, severity, self._params, kin)[0]
            done += count
            self._position += count
        self._apply_schedule()
        return out

    def _apply_schedule(self) -> None:
        while self._schedule and self._schedule[0].start <= self._position:
            seg = self._schedule.pop(0)
            self._state, self._severity = seg.state, seg.severity

    def _ensure_block(self, index: int) -> None:
        # Blocks are only ever needed in order (the stream never seeks backwards beyond one block).
        while self._block_index < index:
            hz_start = self._hz_end
            hz_end = hz_start + self._rng.normal(0.0, _SPEED_STEP_HZ, 1)
            hz_end = np.where(hz_end > self._hz_hi, 2 * self._hz_hi - hz_end, hz_end)
            hz_end = np.where(hz_end < self._hz_lo, 2 * self._hz_lo - hz_end, hz_end)
            hz_end = np.clip(hz_end, self._hz_lo, self._hz_hi)
            self._block = _kinematics(
                self._rng, hz_start, hz_end, self._theta_end, self._slip_end, _BLOCK, self._rate)
            self._hz_end = hz_end
            self._theta_end = self._block["theta"][:, -1].copy()
            self._slip_end = self._block["slip"][:, -1].copy()
            self._block_index += 1
