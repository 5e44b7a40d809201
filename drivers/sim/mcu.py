"""The simulated sensor MCU: real protocol frames on a real pseudo-terminal.

:class:`SimulatedMcu` owns the master side of a pty (``os.openpty``) and writes what the accelerometer MCU on
a board would send over its UART: a HELLO, then SAMPLES frames of ``samples_per_frame`` samples from a
:class:`drivers.sim.signal.VibrationSource`, a HELLO again every ~2 s of samples. The agent's serial driver
opens the slave side (:attr:`SimulatedMcu.port`) with pyserial exactly as it opens ``/dev/ttyAMA0``.

Who owns time drives the MCU: the virtual board calls :meth:`SimulatedMcu.emit` with the samples of each
simulated step; :meth:`SimulatedMcu.start` instead paces emission in a thread against a clock, for live
demos. Faults are injected on a schedule (:class:`Fault`, in samples of emission) or directly
(:meth:`SimulatedMcu.inject_garbage`, :meth:`SimulatedMcu.disconnect`, :meth:`SimulatedMcu.reconnect`),
and everything injected is counted in :attr:`SimulatedMcu.injected`, so tests compare the driver's counters
with the truth.

With ``link_dir``, :attr:`SimulatedMcu.port` is a stable symlink ``<link_dir>/ttySIM0`` (like a udev rule's
``/dev/serial/by-id`` link). A disconnect closes the pty and removes the link, as when a USB adapter is
pulled; a reconnect opens a fresh pty and points the link at it, so the driver's reopen logic runs for real.

Writes never block: the master is O_NONBLOCK. A Linux pty buffers only a few KB, and nobody may be reading
(the driver is reconnecting, or the virtual board runs hours of simulated time in seconds), yet the
simulation must not stall. What does not fit is dropped and counted (``overflow_bytes``, ``overflow_frames``);
a frame cut short this way looks to the driver exactly like a UART overrun: garbage and a resync.
"""

from __future__ import annotations

import fcntl
import os
import threading
import tty
from dataclasses import dataclass
from enum import Enum
from typing import Iterable

import numpy as np

from device.clock import SYSTEM_CLOCK, Clock
from drivers.errors import FrameError
from drivers.serialproto import encode_heartbeat, encode_hello, encode_samples, max_samples_per_frame
from drivers.sim.signal import AXES, FULL_SCALE_G, VibrationSource

LINK_NAME = "ttySIM0"
HELLO_EVERY_S = 2.0
FIRMWARE = "fieldnode-sim 1.0"
_TICK_S = 0.01  # live mode: real-time pacing of emission


class FaultKind(str, Enum):
    """What a scheduled :class:`Fault` does (``arg`` in parentheses)."""

    GARBAGE = "garbage"  # write (arg) random bytes between frames
    CORRUPT = "corrupt"  # flip one bit in each of the next (arg, at least 1) frames, so their CRC fails
    DROP = "drop"  # skip the next (arg) frames: generated, their SEQ consumed, not written
    STALL = "stall"  # write nothing and sample nothing for (arg) samples of emission, then go on
    DISCONNECT = "disconnect"  # close the pty; with link_dir, reopen a fresh one after (arg) samples


@dataclass(frozen=True)
class Fault:
    """A fault that fires once emission reaches sample ``at_sample`` (stalled samples count too).

    Raises:
        ValueError: ``at_sample`` or ``arg`` is not a non-negative int, or ``kind`` is unknown.
    """

    at_sample: int
    kind: FaultKind
    arg: int = 0

    def __post_init__(self) -> None:
        for name in ("at_sample", "arg"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Fault {name} must be an int >= 0, got {value!r}")
        try:
            object.__setattr__(self, "kind", FaultKind(self.kind))
        except ValueError:
            kinds = ", ".join(k.value for k in FaultKind)
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {kinds}") from None


class SimulatedMcu:
    """A sensor MCU streaming framed samples into a pseudo-terminal.

    Args:
        source: The physics; ``None`` makes ``VibrationSource(seed)``.
        seed: Seed of the default source and of the injected garbage and bit flips.
        samples_per_frame: Samples per SAMPLES frame (1..170 for 3 axes).
        link_dir: Directory for the stable ``ttySIM0`` symlink; ``None`` exposes the pty path itself.
        faults: Scheduled faults (any order).
        full_scale_g: Full scale announced and used for quantization (an int, as HELLO carries it).
        firmware: Firmware version announced in HELLO.

    Raises:
        ValueError: An argument is out of range.
        OSError: No pseudo-terminal could be opened.
    """

    def __init__(
        self, source: VibrationSource | None = None, *, seed: int = 0, samples_per_frame: int = 32,
        link_dir: str | None = None, faults: Iterable[Fault] = (), full_scale_g: int = int(FULL_SCALE_G),
        firmware: str = FIRMWARE,
    ) -> None:
        top = max_samples_per_frame(AXES)
        if isinstance(samples_per_frame, bool) or not isinstance(samples_per_frame, int) \
                or not 1 <= samples_per_frame <= top:
            raise ValueError(f"samples_per_frame must be an int in 1..{top}, got {samples_per_frame!r}")
        self.source = source if source is not None else VibrationSource(seed)
        self.samples_per_frame = samples_per_frame
        self.full_scale_g = full_scale_g
        self.firmware = firmware
        try:  # HELLO must be encodable, or the MCU would fail on its first frame
            encode_hello(0, int(self.source.sample_rate_hz), AXES, full_scale_g, firmware)
        except FrameError as exc:
            raise ValueError(str(exc)) from exc
        self.link_dir = link_dir
        faults = list(faults)
        for f in faults:
            if not isinstance(f, Fault):
                raise ValueError(f"faults must be Fault instances, got {f!r}")
        self._faults = sorted(faults, key=lambda f: f.at_sample)  # stable: same-sample faults keep their order
        self._rng = np.random.default_rng([seed, 0x6D6375])  # separate from the physics' streams
        self._lock = threading.RLock()  # emit() runs in the live thread while tests inject faults
        self._seq = 0
        self._time = 0  # samples of emission so far: the fault schedule's time base
        self._framed = 0  # samples put into SAMPLES frames so far
        self._carry = np.empty((0, AXES), dtype=np.float32)
        self._hello_every = max(1, int(round(HELLO_EVERY_S * self.source.sample_rate_hz)))
        self._next_hello = 0
        self._corrupt = self._drop = self._stall = 0
        self._reconnect_at: int | None = None
        self._master: int | None = None
        self._slave: int | None = None
        self._slave_path = ""
        self._live: threading.Thread | None = None
        self._live_stop = threading.Event()
        self.injected: dict[str, int] = dict.fromkeys(
            ("hello_frames", "sample_frames", "heartbeats", "frames_written", "bytes_written", "garbage_bytes",
             "corrupted_frames", "dropped_frames", "stalled_samples", "disconnects", "reconnects", "lost_frames",
             "overflow_bytes", "overflow_frames"), 0)
        self._open_pty()

    def __enter__(self) -> SimulatedMcu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> str:
        """What the driver opens: the ``ttySIM0`` symlink with ``link_dir``, else the current pty slave."""
        return os.path.join(self.link_dir, LINK_NAME) if self.link_dir else self._slave_path

    @property
    def connected(self) -> bool:
        """The pty is open (not disconnected)."""
        return self._master is not None

    @property
    def seq(self) -> int:
        """The SEQ of the next frame."""
        return self._seq

    @property
    def samples_emitted(self) -> int:
        """Samples of emission so far (the fault schedule's clock; stalled samples included)."""
        return self._time

    # -- emission --------------------------------------------------------------------------------------

    def emit(self, n_samples: int) -> None:
        """Produces ``n_samples`` samples' worth of output, firing scheduled faults on the way.

        Samples are framed ``samples_per_frame`` at a time; the remainder waits for the next call. Faults
        fire when emission reaches their sample, including those due exactly at the end of this call.

        Args:
            n_samples: Samples of emission (>= 0).

        Raises:
            ValueError: ``n_samples`` is negative or not an int.
        """
        if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 0:
            raise ValueError(f"n_samples must be an int >= 0, got {n_samples!r}")
        with self._lock:
            left = int(n_samples)
            while True:
                self._fire_due()
                if left == 0:
                    break
                step = min(left, 1 << 16)  # bounds memory when a simulation emits hours at once
                for at in [f.at_sample for f in self._faults[:1]] + [self._reconnect_at]:
                    if at is not None and at > self._time:
                        step = min(step, at - self._time)
                if self._stall:
                    step = min(step, self._stall)
                    self._stall -= step
                    self.injected["stalled_samples"] += step
                else:
                    self._generate(step)
                self._time += step
                left -= step

    def heartbeat(self) -> None:
        """Writes a HEARTBEAT frame (what the MCU sends when it has nothing else to say)."""
        with self._lock:
            self.injected["heartbeats"] += 1
            self._send(encode_heartbeat(self._take_seq()))

    def _generate(self, n: int) -> None:
        self._carry = np.concatenate([self._carry, self.source.read(n)])
        spf, rate = self.samples_per_frame, int(self.source.sample_rate_hz)
        while len(self._carry) >= spf:
            chunk, self._carry = self._carry[:spf], self._carry[spf:]
            if self._framed >= self._next_hello:
                self.injected["hello_frames"] += 1
                self._send(encode_hello(self._take_seq(), rate, AXES, self.full_scale_g, self.firmware))
                self._next_hello += self._hello_every
            self.injected["sample_frames"] += 1
            self._send(encode_samples(chunk, self._take_seq(), self.full_scale_g))
            self._framed += spf

    def _take_seq(self) -> int:
        seq, self._seq = self._seq, (self._seq + 1) % 65536
        return seq

    def _send(self, frame: bytes) -> None:
        if self._master is None:
            self.injected["lost_frames"] += 1  # the MCU keeps sampling while the cable is out
            return
        if self._drop:
            self._drop -= 1
            self.injected["dropped_frames"] += 1
            return
        if self._corrupt:
            self._corrupt -= 1
            self.injected["corrupted_frames"] += 1
            buf = bytearray(frame)
            # Flip inside TYPE..PAYLOAD (never SYNC or LEN): the frame stays framed and its CRC must fail.
            buf[int(self._rng.integers(5, len(buf) - 2))] ^= 1 << int(self._rng.integers(8))
            frame = bytes(buf)
        if self._write(frame) == len(frame):
            self.injected["frames_written"] += 1

    def _write(self, data: bytes) -> int:
        """Writes without blocking; counts and drops what the pty cannot take. Returns bytes written."""
        try:
            written = os.write(self._master, data)
        except BlockingIOError:
            written = 0
        self.injected["bytes_written"] += written
        if written < len(data):
            self.injected["overflow_bytes"] += len(data) - written
            self.injected["overflow_frames"] += 1
        return written

    # -- faults ----------------------------------------------------------------------------------------

    def _fire_due(self) -> None:
        if self._reconnect_at is not None and self._reconnect_at <= self._time:
            self._reconnect_at = None
            self.reconnect()
        while self._faults and self._faults[0].at_sample <= self._time:
            fault = self._faults.pop(0)
            if fault.kind is FaultKind.GARBAGE:
                self.inject_garbage(fault.arg)
            elif fault.kind is FaultKind.CORRUPT:
                self._corrupt += max(1, fault.arg)
            elif fault.kind is FaultKind.DROP:
                self._drop += fault.arg
            elif fault.kind is FaultKind.STALL:
                self._stall += fault.arg
            elif fault.kind is FaultKind.DISCONNECT:
                self.disconnect()
                if self.link_dir:
                    self._reconnect_at = self._time + fault.arg

    def inject_garbage(self, n: int) -> None:
        """Writes ``n`` random bytes now (between frames). Only bytes actually written are counted.

        Raises:
            ValueError: ``n`` is negative or not an int.
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"garbage length must be an int >= 0, got {n!r}")
        with self._lock:
            data = self._rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            if self._master is not None and data:
                self.injected["garbage_bytes"] += self._write(data)

    def disconnect(self) -> None:
        """Closes the pty (and removes the symlink), as when the adapter is pulled. No-op if already so."""
        with self._lock:
            if self._master is None:
                return
            self._close_pty()
            self.injected["disconnects"] += 1

    def reconnect(self) -> None:
        """Opens a fresh pty (and re-points the symlink). No-op if connected.

        Raises:
            OSError: No pseudo-terminal could be opened.
        """
        with self._lock:
            if self._master is not None:
                return
            self._open_pty()
            self.injected["reconnects"] += 1

    # -- the pty ---------------------------------------------------------------------------------------

    def _open_pty(self) -> None:
        master, slave = os.openpty()
        try:
            tty.setraw(slave)  # no echo, no line editing, no CR/LF mapping: bytes pass untouched
            fcntl.fcntl(master, fcntl.F_SETFL, fcntl.fcntl(master, fcntl.F_GETFL) | os.O_NONBLOCK)
            path = os.ttyname(slave)
            if self.link_dir:
                # Replace atomically, as udev does, so the driver never sees a half-made link.
                tmp = os.path.join(self.link_dir, f".{LINK_NAME}.{os.getpid()}.tmp")
                if os.path.lexists(tmp):
                    os.unlink(tmp)
                os.symlink(path, tmp)
                os.replace(tmp, os.path.join(self.link_dir, LINK_NAME))
        except BaseException:
            os.close(master)
            os.close(slave)
            raise
        # The MCU keeps its own slave fd open: the pty then survives the driver closing and reopening it.
        self._master, self._slave, self._slave_path = master, slave, path

    def _close_pty(self) -> None:
        if self.link_dir:
            try:
                os.unlink(os.path.join(self.link_dir, LINK_NAME))
            except FileNotFoundError:
                pass
        for fd in (self._master, self._slave):
            if fd is not None:
                os.close(fd)
        self._master = self._slave = None

    # -- live mode -------------------------------------------------------------------------------------

    def start(self, clock: Clock = SYSTEM_CLOCK) -> None:
        """Emits in a thread at the source's sample rate as measured by ``clock`` (no-op if running).

        Args:
            clock: Decides how many samples are due; with a simulated clock, emission follows simulated time.
        """
        if self._live is not None and self._live.is_alive():
            return
        self._live_stop.clear()
        self._live = threading.Thread(target=self._pace, args=(clock,), name="sim-mcu", daemon=True)
        self._live.start()

    def _pace(self, clock: Clock) -> None:
        t0, done, rate = clock.monotonic(), 0, self.source.sample_rate_hz
        while not self._live_stop.is_set():
            due = int((clock.monotonic() - t0) * rate) - done
            if due > 0:
                self.emit(due)
                done += due
            self._live_stop.wait(_TICK_S)  # the real-time pace of checking; the clock decides the amount

    def stop(self) -> None:
        """Stops live emission (idempotent)."""
        self._live_stop.set()
        live, self._live = self._live, None
        if live is not None and live is not threading.current_thread():
            live.join()

    def close(self) -> None:
        """Stops live emission and closes the pty (removing the symlink). Idempotent."""
        self.stop()
        with self._lock:
            if self._master is not None:
                self._close_pty()
