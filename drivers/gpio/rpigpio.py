"""The RPi.GPIO backend: the classic ``RPi.GPIO`` module, or the rpi-lgpio shim that provides it.

Workflow: import ``RPi.GPIO`` (on a non-Pi its import raises ``RuntimeError``), switch it to BCM numbering,
then ``GPIO.setup`` each pin. Inputs get ``add_event_detect(pin, GPIO.BOTH, callback=...)``; the callback
runs on RPi.GPIO's own thread, reads the level to tell the edge kind and queues it. Where edge detection
cannot be added (kernels without the sysfs GPIO interface make the original RPi.GPIO fail with "Failed to
add edge detection") the line falls back to comparing levels on every ``poll``/``wait``. Closing a line
calls ``GPIO.cleanup(pin)`` for that pin only, so other users of RPi.GPIO in the process are left alone.

RPi.GPIO 0.7.1 cannot drive a Raspberry Pi 5 ("Cannot determine SOC peripheral base address" at the first
``setup``); that error is turned into :class:`~drivers.errors.GpioUnavailable` naming the gpiod extra.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections import deque
from typing import Any

from device.clock import SYSTEM_CLOCK, Clock
from drivers.errors import GpioError, GpioUnavailable
from drivers.gpio import Edge, EdgeEvent, InputLine, OutputLine, PinFactory, Pull, check_pin, check_pull

POLL_INTERVAL_S = 0.005  # level sampling period when edge detection is unavailable
MAX_PENDING = 1024


def import_rpigpio() -> Any:
    """Imports ``RPi.GPIO``.

    Returns:
        The module.

    Raises:
        GpioUnavailable: It is not installed or refuses to load on this machine.
    """
    try:
        return importlib.import_module("RPi.GPIO")
    except ModuleNotFoundError as exc:
        if exc.name in ("RPi", "RPi.GPIO"):
            raise GpioUnavailable(
                "RPi.GPIO is not installed: pip install 'fieldnode[rpigpio]' (or the rpi-lgpio shim on a Pi 5)"
            ) from exc
        raise GpioUnavailable(f"RPi.GPIO is broken: {exc}") from exc
    except RuntimeError as exc:  # "This module can only be run on a Raspberry Pi!"
        raise GpioUnavailable(f"RPi.GPIO refused to load: {exc}") from exc
    except (ImportError, OSError) as exc:
        raise GpioUnavailable(f"RPi.GPIO failed to load: {exc}") from exc


def _setup_error(exc: BaseException, pin: int, action: str) -> GpioError:
    text = str(exc)
    if "peripheral base address" in text:
        return GpioUnavailable(
            f"RPi.GPIO cannot {action} pin {pin}: {text} (RPi.GPIO does not support the Raspberry Pi 5; "
            "pip install 'fieldnode[gpiod]', or replace RPi.GPIO with rpi-lgpio)"
        )
    if "/dev/mem" in text or "/dev/gpiomem" in text or isinstance(exc, PermissionError):
        return GpioError(f"RPi.GPIO cannot {action} pin {pin}: {text} (add the service user to the gpio group)")
    return GpioError(f"RPi.GPIO cannot {action} pin {pin}: {text}")


class RPiGpioOutputLine(OutputLine):
    """An output set up with ``GPIO.setup(pin, GPIO.OUT)``."""

    def __init__(self, factory: RPiGpioFactory, pin: int, initial: bool):
        super().__init__(pin)
        self._factory = factory
        self._value = initial

    def _get(self) -> bool:
        return self._value

    def _set(self, value: bool) -> None:
        gpio = self._factory.gpio
        try:
            gpio.output(self.pin, gpio.HIGH if value else gpio.LOW)
        except (RuntimeError, ValueError, OSError) as exc:
            raise _setup_error(exc, self.pin, "drive") from exc
        self._value = value

    def _release(self) -> None:
        self._factory._cleanup(self)


class RPiGpioInputLine(InputLine):
    """An input set up with ``GPIO.setup(pin, GPIO.IN)``, edges by callback or by level polling.

    Attributes:
        edge_mode: ``interrupt`` (RPi.GPIO's edge detection) or ``polling`` (level comparison).
    """

    can_wake = True  # interrupt mode: the condition is notified; polling mode: seen at the next sample

    def __init__(self, factory: RPiGpioFactory, pin: int):
        super().__init__(pin)
        self._factory = factory
        self._cond = threading.Condition()
        self._woken = False
        self._events: deque[EdgeEvent] = deque(maxlen=MAX_PENDING)
        self._last = self._read()
        self.edge_mode = "polling"

    def _read(self) -> bool:
        try:
            return bool(self._factory.gpio.input(self.pin))
        except (RuntimeError, ValueError, OSError) as exc:
            raise _setup_error(exc, self.pin, "read") from exc

    def _on_edge(self, channel: int) -> None:
        # Runs on RPi.GPIO's thread; an exception here would only be printed there, so none may escape.
        try:
            level = self._read()
        except GpioError:
            return
        now = self._factory.clock.monotonic()
        with self._cond:
            if level == self._last:
                # The level went and came back before we read it: both edges happened.
                self._events.append(EdgeEvent(Edge.FALLING if level else Edge.RISING, now))
            self._events.append(EdgeEvent(Edge.RISING if level else Edge.FALLING, now))
            self._last = level
            self._cond.notify_all()

    def _sample(self) -> None:
        # Polling mode: an edge is a level different from the last one seen.
        level = self._read()
        with self._cond:
            if level != self._last:
                self._events.append(EdgeEvent(Edge.RISING if level else Edge.FALLING, self._factory.clock.monotonic()))
                self._last = level

    def _get(self) -> bool:
        return self._read()

    def _wake(self) -> None:
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def _take(self) -> EdgeEvent | None:
        # With self._cond held: the next edge, or None (and the wake-up used up) when woken or timed out.
        if self._events:
            return self._events.popleft()
        self._woken = False
        return None

    def _wait(self, timeout: float) -> EdgeEvent | None:
        if self.edge_mode == "interrupt":
            with self._cond:
                # The callback thread notifies; this is RPi.GPIO's real-time world, not a simulated one.
                self._cond.wait_for(lambda: bool(self._events) or self._woken, timeout)
                return self._take()
        clock = self._factory.clock
        deadline = clock.monotonic() + timeout
        while True:
            self._sample()
            with self._cond:
                if self._events or self._woken:
                    return self._take()
            remaining = deadline - clock.monotonic()
            if remaining <= 0:
                return None
            clock.sleep(min(remaining, self._factory.poll_interval))

    def _poll(self) -> list[EdgeEvent]:
        if self.edge_mode == "polling":
            self._sample()
        with self._cond:
            events = list(self._events)
            self._events.clear()
        return events

    def _release(self) -> None:
        self._factory._cleanup(self)


class RPiGpioFactory(PinFactory):
    """Lines through ``RPi.GPIO`` in BCM numbering.

    Args:
        clock: Stamps edges and paces level polling.
        poll_interval: Level sampling period for inputs without edge detection.

    Raises:
        GpioUnavailable: ``RPi.GPIO`` is missing or refuses this machine.
        GpioError: Another part of the process already chose BOARD numbering.
    """

    name = "rpigpio"

    def __init__(self, clock: Clock = SYSTEM_CLOCK, *, poll_interval: float = POLL_INTERVAL_S):
        super().__init__()
        self.gpio = import_rpigpio()
        self.clock = clock
        self.poll_interval = float(poll_interval)
        # rpi-lgpio installs the same module name; it imports lgpio, which the original never does.
        self.library = "rpi-lgpio" if "lgpio" in sys.modules else "RPi.GPIO"
        self.version = str(getattr(self.gpio, "VERSION", "unknown"))
        try:
            self.gpio.setwarnings(False)  # its "channel already in use" warnings go to stderr, not to us
            self.gpio.setmode(self.gpio.BCM)
        except ValueError as exc:  # "A different mode has already been set!"
            raise GpioError(f"RPi.GPIO is already in another numbering mode in this process: {exc}") from exc
        except RuntimeError as exc:
            raise GpioUnavailable(f"RPi.GPIO refused BCM mode: {exc}") from exc

    def output(self, pin: int, initial: bool = False) -> RPiGpioOutputLine:
        pin = check_pin(pin)
        gpio = self.gpio
        with self._lock:
            self._check_free(pin)
            try:
                gpio.setup(pin, gpio.OUT, initial=gpio.HIGH if initial else gpio.LOW)
            except (RuntimeError, ValueError, OSError) as exc:
                raise _setup_error(exc, pin, "set up an output on") from exc
            line = RPiGpioOutputLine(self, pin, bool(initial))
            self._lines[pin] = line
        return line

    def input(self, pin: int, pull: Pull = Pull.NONE) -> RPiGpioInputLine:
        pin = check_pin(pin)
        pull = check_pull(pull)
        gpio = self.gpio
        pud = {Pull.NONE: gpio.PUD_OFF, Pull.UP: gpio.PUD_UP, Pull.DOWN: gpio.PUD_DOWN}[pull]
        with self._lock:
            self._check_free(pin)
            try:
                gpio.setup(pin, gpio.IN, pull_up_down=pud)
            except (RuntimeError, ValueError, OSError) as exc:
                raise _setup_error(exc, pin, "set up an input on") from exc
            try:
                line = RPiGpioInputLine(self, pin)
            except GpioError:
                self._safe_cleanup(pin)
                raise
            try:
                gpio.add_event_detect(pin, gpio.BOTH, callback=line._on_edge)
                line.edge_mode = "interrupt"
            except RuntimeError:  # "Failed to add edge detection": keep the line, sample its level instead
                line.edge_mode = "polling"
            self._lines[pin] = line
        return line

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        rpi_info = getattr(self.gpio, "RPI_INFO", None)
        chip = rpi_info.get("PROCESSOR") if isinstance(rpi_info, dict) else None
        info.update(chip=chip, version=f"{self.library} {self.version}")
        return info

    def _check_free(self, pin: int) -> None:
        if pin in self._lines:
            raise GpioError(f"pin {pin} is already in use by this agent")

    def _safe_cleanup(self, pin: int) -> None:
        try:
            self.gpio.cleanup(pin)
        except Exception:  # the pin is being given up anyway; a failing cleanup leaves it as RPi.GPIO had it
            pass

    def _cleanup(self, line: RPiGpioOutputLine | RPiGpioInputLine) -> None:
        with self._lock:
            if self._lines.get(line.pin) is line:
                del self._lines[line.pin]
        if isinstance(line, RPiGpioInputLine) and line.edge_mode == "interrupt":
            try:
                self.gpio.remove_event_detect(line.pin)
            except Exception:  # cleanup() below removes it as well
                pass
        self._safe_cleanup(line.pin)


__all__ = ["RPiGpioFactory", "import_rpigpio"]


def open_factory(chip_label: str = "", clock: Clock = SYSTEM_CLOCK) -> RPiGpioFactory:
    """The seam's entry point (:data:`drivers.gpio.BACKENDS`); RPi.GPIO always drives the header chip."""
    return RPiGpioFactory(clock=clock)
