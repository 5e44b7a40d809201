"""The serial sensor driver: frames in, fixed windows of samples out, and an honest health report.

Workflow: :meth:`SerialSensor.start` opens the port (``serial.serial_for_url``, so ``/dev/ttyAMA0``, a pty
path, a udev symlink or ``loop://`` all work) and starts one reader thread. The thread reads whatever the
UART holds, feeds a :class:`drivers.serialproto.FrameDecoder` (which resyncs after garbage and counts CRC
errors and sequence gaps) and appends the samples of SAMPLES frames to the current window. A complete
window (``window x axes`` float32, in g) goes into a bounded queue that :meth:`SerialSensor.next_window`
consumes; :meth:`SerialSensor.latest_window` peeks at the newest one.

Windows never splice data across a hole: a sequence gap, a bad SAMPLES payload, an MCU restart or a
reconnect discards the partial window (``windows_discarded``). A port that fails (SerialException/OSError on
read, or an open that fails) is closed and reopened with exponential backoff and jitter; the backoff resets
once a frame arrives, so a flapping port does not reconnect in a tight loop. Nothing escapes the thread:
every error ends up in :meth:`SerialSensor.health` (``last_error``).

Waking: the thread sleeps in the port's read until bytes arrive, the staleness deadline comes (``read_timeout_s``
after the last frame) or :meth:`SerialSensor.stop` cancels the read (pyserial's ``cancel_read``); while
disconnected it sleeps until the next reopen is due. Once the MCU's HELLO has said its sample rate and a read has
emptied the port, the thread lets the stream gather until the current window can be complete, at most
:data:`BATCH_S` and never past half the port's buffer at the rate the bytes arrive (:meth:`SerialSensor._pause`):
a window costs a few reads, not one per frame (the MCU sends a frame every 32 ms at 1 kHz). A consumer blocked in :meth:`SerialSensor.next_window` is
woken only when a window is complete or the sensor stops, not after every read.

Time: intervals (staleness, backoff, frame age) are measured on the injected clock, so with a simulated
clock they follow simulated time. A simulated clock says nothing when it moves, so under any clock but the
system's (and on a port without ``cancel_read``) the thread instead looks at least every :data:`POLL_S`.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
from collections import deque
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Callable, Sequence

import numpy as np
import serial

from device.clock import SYSTEM_CLOCK, Clock, SystemClock, backoff_delay
from drivers.errors import FrameError, SerialSensorError
from drivers.serialproto import Frame, FrameDecoder, FrameType, Hello, gain

log = logging.getLogger(__name__)

POLL_S = 0.05  # longest real-time wait of the reader thread when it cannot sleep until its deadline
BATCH_S = 0.25  # longest pause between two reads of a steady stream (see SerialSensor._pause)
_PORT_BUFFER = 4096  # bytes a tty holds for its reader (the line discipline's buffer): pauses fill half of it
DEFAULT_QUEUE = 8
_MAX_READ = 65536


class SensorState(str, Enum):
    """What the sensor link looks like right now."""

    STARTING = "starting"  # port (re)opened or not started yet, no frame since
    OK = "ok"  # a frame arrived within read_timeout_s
    STALE = "stale"  # port open, but no frame for read_timeout_s
    DISCONNECTED = "disconnected"  # port closed (failed, not found, or stopped); reopening with backoff


@dataclass(frozen=True)
class SensorHealth:
    """A snapshot of the sensor link. Counters are cumulative since construction.

    Attributes:
        state: See :class:`SensorState`.
        connected: The port is open.
        frames: Valid frames of known types received.
        crc_errors, length_errors, garbage_bytes, unknown_types: Decoder counters (see
            :class:`drivers.serialproto.FrameDecoder`).
        payload_errors: Valid frames whose payload was malformed or did not match the configured axes.
        seq_gaps: Times the sequence jumped; dropped_frames: frames missing in those jumps.
        restarts: MCU restarts seen (HELLO with SEQ 0 out of sequence).
        timeouts: Silent periods of at least read_timeout_s (one per period).
        reconnects: Successful reopens after the port was lost.
        open_failures: Failed open attempts.
        samples: Samples received in valid SAMPLES frames.
        windows: Complete windows assembled; windows_discarded: partial windows thrown away at a hole;
            windows_overflowed: complete windows dropped because the queue was full.
        last_error: The most recent problem, or ``None``.
        last_frame_age_s: Seconds since the last valid frame, ``None`` before the first.
        retry_in_s: While disconnected, seconds until the next open attempt; otherwise ``None``.
        hello: What the MCU last announced, ``None`` before its first HELLO.
    """

    state: SensorState
    connected: bool
    frames: int
    crc_errors: int
    length_errors: int
    garbage_bytes: int
    unknown_types: int
    payload_errors: int
    seq_gaps: int
    dropped_frames: int
    restarts: int
    timeouts: int
    reconnects: int
    open_failures: int
    samples: int
    windows: int
    windows_discarded: int
    windows_overflowed: int
    last_error: str | None
    last_frame_age_s: float | None
    retry_in_s: float | None
    hello: Hello | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict for status output (the state as its string, hello as a dict or None)."""
        out = asdict(self)
        out["state"] = self.state.value
        return out


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _count(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
        bound = f"in {low}..{high}" if high else f">= {low}"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")
    return value


class SerialSensor:
    """Reads framed samples from a serial port in a thread and assembles fixed windows.

    Args:
        url: Port path or pyserial URL (``/dev/ttyAMA0``, ``/dev/serial/by-id/...``, ``loop://``).
        baudrate: Line speed.
        window: Samples per window.
        axes: Axes per sample; SAMPLES frames with another count are rejected.
        hop: Samples between the starts of consecutive windows; ``None`` means ``window`` (no overlap),
            less overlaps, more skips samples between windows.
        read_timeout_s: Silence after which the sensor is stale (and one timeout is counted).
        reconnect: ``(min, max)`` backoff in seconds between reopen attempts (doubling, with jitter).
        queue_size: Complete windows kept for :meth:`next_window`; the oldest is dropped when full.
        full_scale_g: Full scale assumed until the MCU's HELLO announces its own.
        clock: Time source for staleness, backoff and ages.
        opener: ``serial_for_url``-compatible factory (a seam for tests).
        rng: Randomness of the backoff jitter (seed it for reproducible tests).

    Raises:
        ValueError: An argument is out of range.
    """

    def __init__(
        self, url: str, *, baudrate: int = 921600, window: int = 256, axes: int = 3, hop: int | None = None,
        read_timeout_s: float = 1.0, reconnect: Sequence[float] = (0.2, 5.0), queue_size: int = DEFAULT_QUEUE,
        full_scale_g: float = 8.0, clock: Clock = SYSTEM_CLOCK, opener: Callable[..., Any] = serial.serial_for_url,
        rng: random.Random | None = None,
    ) -> None:
        if not isinstance(url, str) or not url:
            raise ValueError(f"url must be a non-empty string, got {url!r}")
        self.url = url
        self.baudrate = _count("baudrate", baudrate, 1)
        self.window = _count("window", window, 1)
        self.axes = _count("axes", axes, 1, 255)
        self.hop = self.window if hop is None else _count("hop", hop, 1)
        self.read_timeout_s = _positive("read_timeout_s", read_timeout_s)
        try:
            lo, hi = (float(v) for v in reconnect)
        except (TypeError, ValueError):
            raise ValueError(f"reconnect must be a (min, max) pair of seconds, got {reconnect!r}") from None
        if not 0 < lo <= hi < math.inf:
            raise ValueError(f"reconnect must satisfy 0 < min <= max, got {reconnect!r}")
        self.reconnect = (lo, hi)
        self.queue_size = _count("queue_size", queue_size, 1)
        self._default_scale = _positive("full_scale_g", full_scale_g)
        self._clock = clock
        self._opener = opener
        self._rng = rng or random.Random()
        # Real-time waits can run to the clock's deadlines only on the system clock; a simulated one is polled.
        self._realtime = isinstance(clock, SystemClock)
        self._poll = min(POLL_S, self.read_timeout_s)

        lock = threading.RLock()  # guards everything below
        self._cond = threading.Condition(lock)  # every turn of the reader: wait_until's predicates
        self._ready = threading.Condition(lock)  # a complete window, or stop: next_window
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False
        self._port: Any = None
        self._aimed = False  # the port's read timeout follows the staleness deadline (see _aim_timeout)
        self._ever_connected = False
        self._attempt = 0  # consecutive reopens without a frame: the backoff exponent
        self._next_attempt = -math.inf
        self._decoder = FrameDecoder()
        self._scale = self._default_scale
        self._gain = gain(self._scale)  # g per count, float32, as Frame.samples computes it
        self._hello: Hello | None = None
        self._state = SensorState.STARTING
        self._last_rx: float | None = None  # last valid frame, or the open, for staleness
        self._last_frame: float | None = None
        self._last_read = -math.inf  # when the last read returned (the stream's byte rate for _pause)
        self._silent = False  # a timeout was already counted for this silent period
        self._buf = np.zeros((self.window, self.axes), dtype=np.float32)
        self._fill = 0
        self._skip = 0  # samples still to skip before the next window starts (hop > window)
        self._queue: deque[np.ndarray] = deque()
        self._latest: np.ndarray | None = None
        self._latest_at = 0.0
        self._n = dict.fromkeys(
            ("payload_errors", "timeouts", "reconnects", "open_failures", "samples", "windows",
             "windows_discarded", "windows_overflowed"), 0)
        self._last_error: str | None = None

    def __repr__(self) -> str:
        return f"SerialSensor({self.url!r}, state={self._state.value})"

    def __enter__(self) -> SerialSensor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Opens the port and starts the reader thread (no-op when already running).

        A port that cannot be opened yet (device absent, permission, I/O error) is not an error here: the
        thread keeps retrying with backoff and health says why.

        Raises:
            SerialSensorError: The URL or settings can never work (pyserial rejects them with ValueError,
                e.g. an unknown URL scheme or an invalid baud rate).
        """
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        with self._cond:
            self._running = True
        try:
            self._open()
        except ValueError as exc:
            with self._cond:
                self._running = False
            raise SerialSensorError(f"sensor port {self.url!r} cannot be used: {exc}") from exc
        self._thread = threading.Thread(target=self._run, name=f"sensor-{self.url}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the reader thread, waits for it and closes the port. Idempotent.

        Complete windows stay available; a partial window is discarded, since a later :meth:`start` reads a
        stream that does not continue it.
        """
        self._stop.set()
        self._cancel_read()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._close_port()
        with self._cond:
            self._running = False
            self._state = SensorState.DISCONNECTED
            self._decoder.reset()
            self._discard_partial()
            self._cond.notify_all()
            self._ready.notify_all()

    @property
    def running(self) -> bool:
        """The reader thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    # -- consumers -------------------------------------------------------------------------------------

    def next_window(self, timeout: float | None = None) -> np.ndarray | None:
        """Takes the oldest complete window from the queue.

        Args:
            timeout: Real seconds to wait for one; ``None`` waits until one arrives or the sensor stops.

        Returns:
            A read-only float32 array ``[window, axes]`` in g, or ``None`` on timeout or when stopped.
        """
        with self._ready:
            self._ready.wait_for(lambda: self._queue or not self._running, timeout)
            return self._queue.popleft() if self._queue else None

    def latest_window(self, max_age_s: float | None = None) -> np.ndarray | None:
        """The newest complete window, without consuming it.

        Args:
            max_age_s: Return ``None`` if that window was completed longer ago than this (clock seconds).

        Returns:
            A read-only float32 array ``[window, axes]``, or ``None`` if there is none (fresh enough).
        """
        with self._cond:
            if self._latest is None:
                return None
            if max_age_s is not None and self._clock.monotonic() - self._latest_at > max_age_s:
                return None
            return self._latest

    def health(self) -> SensorHealth:
        """A consistent snapshot of the link's state and counters."""
        with self._cond:
            return self._snapshot()

    def wait_until(self, predicate: Callable[[SensorHealth], bool], timeout: float | None = None) -> bool:
        """Waits until ``predicate(health)`` holds (re-checked at every turn of the reader thread: each read, at
        least every ``read_timeout_s`` while connected, and at every reopen attempt).

        Args:
            predicate: A function of a :class:`SensorHealth`.
            timeout: Real seconds to wait at most; ``None`` waits forever.

        Returns:
            Whether the predicate held before the timeout.
        """
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._snapshot()), timeout)

    def _snapshot(self) -> SensorHealth:
        d, n = self._decoder, self._n
        now = self._clock.monotonic()
        age = None if self._last_frame is None else max(0.0, now - self._last_frame)
        retry = max(0.0, self._next_attempt - now) if self._port is None and self._running else None
        return SensorHealth(
            state=self._state, connected=self._port is not None, frames=d.frames, crc_errors=d.crc_errors,
            length_errors=d.length_errors, garbage_bytes=d.garbage_bytes, unknown_types=d.unknown_types,
            payload_errors=n["payload_errors"], seq_gaps=d.seq_gaps, dropped_frames=d.dropped_frames,
            restarts=d.restarts, timeouts=n["timeouts"], reconnects=n["reconnects"],
            open_failures=n["open_failures"], samples=n["samples"], windows=n["windows"],
            windows_discarded=n["windows_discarded"], windows_overflowed=n["windows_overflowed"],
            last_error=self._last_error, last_frame_age_s=age, retry_in_s=retry, hello=self._hello)

    # -- the reader thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    if self._port is None:
                        self._reopen_when_due()
                    else:
                        pause = self._pause(self._read_once())
                        if pause > 0:
                            self._stop.wait(pause)  # stop() wakes it
                except Exception as exc:  # the thread must outlive anything; the error goes to health
                    log.exception("sensor %s: unexpected error", self.url)
                    self._lose_port(f"unexpected {type(exc).__name__}: {exc}")
        finally:
            self._close_port()

    def _open(self) -> bool:
        """One open attempt; False (and a retry scheduled) when the port is not there."""
        try:
            port = self._opener(self.url, baudrate=self.baudrate,
                                timeout=self.read_timeout_s if self._realtime else self._poll)
            # Reads may last until the staleness deadline only if stop() can cut them short.
            aimed = self._realtime and callable(getattr(port, "cancel_read", None))
            if self._realtime and not aimed:
                port.timeout = self._poll
        except (serial.SerialException, OSError) as exc:
            with self._cond:
                self._n["open_failures"] += 1
                # pyserial's own message names the port twice already: the errno says it once
                why = os.strerror(exc.errno) if isinstance(getattr(exc, "errno", None), int) else str(exc)
                self._last_error = f"cannot open {self.url}: {why}"
                self._state = SensorState.DISCONNECTED
                self._schedule_retry()
                self._cond.notify_all()
            return False
        now = self._clock.monotonic()
        with self._cond:
            self._port, self._aimed = port, aimed
            if self._ever_connected:
                self._n["reconnects"] += 1
                log.info("sensor %s: reconnected", self.url)
            self._ever_connected = True
            self._state = SensorState.STARTING
            self._last_rx, self._silent = now, False
            self._cond.notify_all()
        return True

    def _reopen_when_due(self) -> None:
        wait = self._next_attempt - self._clock.monotonic()
        if wait > 0:
            # The clock decides when. On the system clock the thread sleeps until then (stop() wakes it); a
            # simulated clock is looked at every poll.
            self._stop.wait(wait if self._realtime else min(self._poll, wait))
            with self._cond:
                self._cond.notify_all()  # time-based predicates of wait_until (retry_in_s) move on
            return
        self._open()

    def _schedule_retry(self) -> None:
        lo, hi = self.reconnect
        self._next_attempt = self._clock.monotonic() + backoff_delay(self._attempt, lo, hi, self._rng)
        self._attempt += 1

    def _read_once(self) -> int:
        """One read: blocks for the first byte, then takes what came with it. Returns the bytes read."""
        port = self._port
        try:
            waiting = port.in_waiting  # after a pause the bytes are there: one read takes them
            if waiting:
                data = port.read(min(waiting, _MAX_READ))
            else:
                self._aim_timeout(port)
                data = port.read(1)
                waiting = port.in_waiting if data else 0
                if waiting:
                    data += port.read(min(waiting, _MAX_READ))
        except (serial.SerialException, OSError) as exc:
            self._lose_port(f"read from {self.url} failed: {exc}")
            return 0
        now = self._clock.monotonic()
        with self._cond:
            if data:
                for frame in self._decoder.feed(data):
                    self._on_frame(frame, now)
            if not self._silent and now - self._last_rx >= self.read_timeout_s:
                self._silent = True
                self._n["timeouts"] += 1
                self._state = SensorState.STALE
                self._last_error = f"no frame from {self.url} for {self.read_timeout_s:g} s"
                log.info("sensor %s: stale", self.url)  # the agent warns once per fault (device.agent.watch)
            self._cond.notify_all()
        return len(data)

    def _pause(self, got: int) -> float:
        """Seconds to let the stream gather before the next read (0: read at once).

        Only on the system clock with a cancellable read (stop() must not wait), once HELLO has given the sample
        rate, and after a read that emptied the port (a burst is read through at once). The pause lasts until the
        current window can be complete at that rate, at most :data:`BATCH_S`, and no longer than half the port's
        buffer takes at the rate the bytes of the last read arrived, so nothing overflows.
        """
        now = self._clock.monotonic()
        since, self._last_read = now - self._last_read, now
        hello, port = self._hello, self._port
        if not got or not self._aimed or hello is None or hello.sample_rate_hz <= 0 or port is None:
            return 0.0
        try:
            if port.in_waiting:
                return 0.0
        except (serial.SerialException, OSError):
            return 0.0  # the next read meets the error and handles it
        with self._cond:
            needed = self._skip + self.window - self._fill
        pause = min(BATCH_S, needed / hello.sample_rate_hz)
        if 0 < since < math.inf:
            pause = min(pause, _PORT_BUFFER / 2 * since / got)
        return pause

    def _aim_timeout(self, port: Any) -> None:
        """On the system clock, makes the coming read end at the staleness deadline (read_timeout_s after the
        last frame), or a whole read_timeout_s later once stale. The port is reconfigured only when the aim
        moves by more than :data:`POLL_S`, so a steady stream never touches it; staleness is noticed at most
        that late."""
        if not self._aimed:
            return  # polled: a simulated clock, or a port whose read cannot be cancelled
        aim = self.read_timeout_s
        if not self._silent:
            aim = min(aim, max(0.0, self._last_rx + self.read_timeout_s - self._clock.monotonic()))
        if abs(aim - port.timeout) > POLL_S:
            port.timeout = aim

    def _cancel_read(self) -> None:
        """Cuts a blocking read short (pyserial's cancel_read), so stop() need not wait for its timeout."""
        with self._cond:
            port = self._port
        cancel = getattr(port, "cancel_read", None)
        if callable(cancel):
            try:
                cancel()
            except Exception:  # a port closing under us: the read ends anyway
                log.debug("sensor %s: cancel_read failed", self.url, exc_info=True)

    def _lose_port(self, reason: str) -> None:
        self._close_port()
        with self._cond:
            self._last_error = reason
            self._state = SensorState.DISCONNECTED
            # Whatever was buffered or half-assembled cannot be continued on the next connection.
            self._decoder.reset()
            self._discard_partial()
            self._schedule_retry()
            self._cond.notify_all()
            self._ready.notify_all()
        log.info("sensor %s: %s", self.url, reason)  # the agent warns once per fault

    def _close_port(self) -> None:
        with self._cond:
            port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except Exception:  # closing a vanished device may fail; it is closed either way
                log.debug("sensor %s: close failed", self.url, exc_info=True)

    # -- frames and windows (called with the lock held) ------------------------------------------------

    def _on_frame(self, frame: Frame, now: float) -> None:
        self._last_rx = self._last_frame = now
        self._silent = False
        self._state = SensorState.OK
        self._attempt = 0
        if frame.missing != 0:  # a gap (int) or unknown continuity (None): never splice across it
            self._discard_partial()
        if frame.type == FrameType.SAMPLES:
            try:
                x = frame.counts()  # converted to g straight into the window (_assemble): no temporaries
                if x.shape[1] != self.axes:
                    raise FrameError(f"SAMPLES frame seq {frame.seq}: {x.shape[1]} axes, expected {self.axes}")
            except FrameError as exc:
                self._n["payload_errors"] += 1
                self._last_error = str(exc)
                self._discard_partial()
                return
            self._n["samples"] += len(x)
            self._assemble(x, now)
        elif frame.type == FrameType.HELLO:
            try:
                hello = frame.hello()
            except FrameError as exc:
                self._n["payload_errors"] += 1
                self._last_error = str(exc)
                return
            if hello != self._hello:
                log.info("sensor %s: %s", self.url, hello)
            self._hello, self._scale = hello, float(hello.full_scale_g)
            self._gain = gain(self._scale)
            if hello.axes != self.axes:
                self._last_error = f"sensor announces {hello.axes} axes, driver expects {self.axes}"

    def _assemble(self, x: np.ndarray, now: float) -> None:
        # x holds int16 counts; each lands in the window in g, computed exactly as Frame.samples does.
        i, n = 0, len(x)
        while i < n:
            if self._skip:
                k = min(self._skip, n - i)
                self._skip -= k
                i += k
                continue
            k = min(self.window - self._fill, n - i)
            np.multiply(x[i:i + k], self._gain, out=self._buf[self._fill:self._fill + k])
            self._fill += k
            i += k
            if self._fill == self.window:
                self._push(self._buf.copy(), now)
                if self.hop >= self.window:
                    self._fill, self._skip = 0, self.hop - self.window
                else:
                    keep = self.window - self.hop
                    self._buf[:keep] = self._buf[self.hop:]  # numpy copes with the overlap
                    self._fill = keep

    def _push(self, win: np.ndarray, now: float) -> None:
        win.flags.writeable = False  # shared by the queue and latest_window: nobody may change it
        if len(self._queue) >= self.queue_size:
            self._queue.popleft()
            self._n["windows_overflowed"] += 1
        self._queue.append(win)
        self._latest, self._latest_at = win, now
        self._n["windows"] += 1
        self._ready.notify_all()

    def _discard_partial(self) -> None:
        if self._fill:
            self._n["windows_discarded"] += 1
        self._fill = self._skip = 0
