"""The libgpiod backend: the libgpiod v2 Python bindings (PyPI ``gpiod>=2``) on the GPIO character device.

Workflow: import ``gpiod`` and refuse the v1 bindings (they have no ``request_lines``; Debian's
``python3-libgpiod`` up to Bookworm is v1); find the header chip by its *label* among ``/dev/gpiochip*``
(the Pi 5's header chip was ``gpiochip4`` and is ``gpiochip0`` on newer kernels, so numbers lie); then request
each pin as its own line request with ``gpiod.request_lines(path, consumer="fieldnode", config={offset:
LineSettings(...)})``. Inputs are requested with edge detection on both edges, and edges are read with
``read_edge_events`` once the request's file descriptor is readable. A wait blocks in ``select`` on that
descriptor and on a pipe of the line's own, so :meth:`LibgpiodInputLine.wake` ends it at once (bindings whose
requests have no ``fd`` are waited on with ``wait_edge_events``, and cannot be woken).

This module is named ``libgpiod`` so it never shadows the ``gpiod`` package it imports.
"""

from __future__ import annotations

import errno
import glob
import importlib
import os
import re
import select
import threading
from collections import deque
from typing import Any

from device.clock import SYSTEM_CLOCK, Clock, SystemClock
from drivers.errors import GpioError, GpioUnavailable
from drivers.gpio import Edge, EdgeEvent, InputLine, OutputLine, PinFactory, Pull, check_pin, check_pull

CONSUMER = "fieldnode"
# Tried in this order when no label is configured: Pi 5, Pi 4, older Pis.
DEFAULT_LABELS = ("pinctrl-rp1", "pinctrl-bcm2711", "pinctrl-bcm2835")
V1_REFUSAL = "gpiod v1 bindings found; fieldnode needs libgpiod v2 (pip install 'gpiod>=2')"


def import_gpiod() -> Any:
    """Imports the libgpiod v2 bindings.

    Returns:
        The ``gpiod`` module.

    Raises:
        GpioUnavailable: It is not installed, fails to load, or is the v1 API.
    """
    try:
        gpiod = importlib.import_module("gpiod")
    except ModuleNotFoundError as exc:
        if exc.name == "gpiod":
            raise GpioUnavailable(
                "the gpiod package (libgpiod v2 bindings) is not installed: pip install 'fieldnode[gpiod]'"
            ) from exc
        raise GpioUnavailable(f"the gpiod package is broken: {exc}; reinstall it with pip install 'gpiod>=2'") from exc
    except (ImportError, OSError) as exc:
        raise GpioUnavailable(f"the gpiod package failed to load: {exc}; reinstall it with pip install 'gpiod>=2'") from exc
    if not callable(getattr(gpiod, "request_lines", None)):
        raise GpioUnavailable(V1_REFUSAL)
    return gpiod


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def find_chip(gpiod: Any, label: str = "", dev_dir: str = "/dev") -> tuple[str, str]:
    """Finds the GPIO chip whose label is wanted.

    Args:
        gpiod: The v2 bindings module.
        label: The wanted label; empty tries :data:`DEFAULT_LABELS` in order.
        dev_dir: Where the ``gpiochip*`` devices are.

    Returns:
        ``(device path, label)`` of the first chip (in natural order) with the most preferred label.

    Raises:
        GpioUnavailable: No chip has a wanted label; the message lists what was found.
    """
    labels: dict[str, str] = {}
    problems: list[str] = []
    for path in sorted(glob.glob(os.path.join(dev_dir, "gpiochip*")), key=_natural_key):
        try:
            with gpiod.Chip(path) as chip:
                labels[path] = str(chip.get_info().label)
        except OSError as exc:
            hint = " (add the service user to the gpio group)" if exc.errno in (errno.EACCES, errno.EPERM) else ""
            problems.append(f"{path}: {exc.strerror or exc}{hint}")
        except ValueError as exc:  # not a GPIO character device
            problems.append(f"{path}: {exc}")
    wanted = (label,) if label else DEFAULT_LABELS
    for want in wanted:
        for path, found in labels.items():
            if found == want:
                return path, found
    want_text = " or ".join(repr(w) for w in wanted)
    if not labels and not problems:
        raise GpioUnavailable(
            f"no GPIO chip labelled {want_text}: there is no {os.path.join(dev_dir, 'gpiochip*')} device "
            "(not a GPIO board, or the service lacks DeviceAllow=/dev/gpiochip*)"
        )
    seen = [f"{path} is {found!r}" for path, found in labels.items()] + problems
    hint = "" if label else "; set the chip label in the configuration if this board has another header chip"
    raise GpioUnavailable(f"no GPIO chip labelled {want_text} ({'; '.join(seen)}){hint}")


def _wrap(exc: BaseException, pin: int, path: str, action: str) -> GpioError:
    if isinstance(exc, OSError):
        if exc.errno == errno.EBUSY:
            return GpioError(f"pin {pin} on {path} is in use by another program (gpioinfo shows who)")
        if exc.errno in (errno.EACCES, errno.EPERM):
            return GpioError(f"cannot {action} pin {pin}: permission denied on {path} (add the user to the gpio group)")
        return GpioError(f"cannot {action} pin {pin} on {path}: {exc.strerror or exc}")
    return GpioError(f"cannot {action} pin {pin} on {path}: {exc}")


class LibgpiodOutputLine(OutputLine):
    """An output held by one ``gpiod`` line request."""

    def __init__(self, factory: LibgpiodFactory, pin: int, request: Any, initial: bool):
        super().__init__(pin)
        self._factory = factory
        self._request = request
        self._value = initial
        self._lock = threading.Lock()

    def _get(self) -> bool:
        return self._value

    def _set(self, value: bool) -> None:
        level = self._factory._line.Value.ACTIVE if value else self._factory._line.Value.INACTIVE
        with self._lock:
            try:
                self._request.set_value(self.pin, level)
            except (OSError, ValueError) as exc:
                raise _wrap(exc, self.pin, self._factory.path, "drive") from exc
            self._value = value

    def _release(self) -> None:
        _release_request(self)


class LibgpiodInputLine(InputLine):
    """An input with edge detection on both edges, held by one ``gpiod`` line request."""

    def __init__(self, factory: LibgpiodFactory, pin: int, request: Any):
        super().__init__(pin)
        self._factory = factory
        self._request = request
        self._pending: deque[EdgeEvent] = deque()
        self._lock = threading.Lock()
        self._wake_r = self._wake_w = -1
        if isinstance(getattr(request, "fd", None), int):
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self.can_wake = True

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except OSError:  # the pipe is full (a wake-up is pending anyway) or the line was just released
            pass

    def _ready(self, timeout: float) -> bool:
        # Whether edges wait to be read, after blocking up to timeout for them (or for a wake-up).
        if not self.can_wake:
            return bool(self._request.wait_edge_events(timeout))
        fd = self._request.fd
        # A look without waiting (poll) leaves a pending wake-up for the wait it is meant for.
        ready, _, _ = select.select([fd, self._wake_r] if timeout else [fd], [], [], timeout)
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        return fd in ready

    def _get(self) -> bool:
        try:
            return self._request.get_value(self.pin) == self._factory._line.Value.ACTIVE
        except (OSError, ValueError) as exc:
            raise _wrap(exc, self.pin, self._factory.path, "read") from exc

    def _convert(self, raw: Any) -> EdgeEvent:
        rising = raw.event_type == self._factory._gpiod.EdgeEvent.Type.RISING_EDGE
        if isinstance(self._factory.clock, SystemClock):
            # The kernel stamps edges on CLOCK_MONOTONIC, the same scale as the system clock's monotonic,
            # and far closer to the real edge than the moment we read it.
            stamp = raw.timestamp_ns / 1e9
        else:
            stamp = self._factory.clock.monotonic()
        return EdgeEvent(Edge.RISING if rising else Edge.FALLING, stamp)

    def _read(self, timeout: float) -> None:
        # Called with self._lock held: moves what the kernel has into the pending queue.
        try:
            while self._ready(timeout):
                self._pending.extend(self._convert(raw) for raw in self._request.read_edge_events())
                timeout = 0.0
        except (OSError, ValueError) as exc:
            raise _wrap(exc, self.pin, self._factory.path, "read edges of") from exc

    def _wait(self, timeout: float) -> EdgeEvent | None:
        with self._lock:
            if not self._pending:
                self._read(timeout)
            return self._pending.popleft() if self._pending else None

    def _poll(self) -> list[EdgeEvent]:
        with self._lock:
            self._read(0.0)
            events = list(self._pending)
            self._pending.clear()
        return events

    def _release(self) -> None:
        _release_request(self)
        if self.can_wake:
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)


def _release_request(line) -> None:
    """Gives a line's request back to the kernel and forgets the line (both line kinds)."""
    line._factory._forget(line)
    try:
        line._request.release()
    except Exception:  # a request the kernel already dropped: nothing left to give back
        pass


class LibgpiodFactory(PinFactory):
    """Lines on the header chip through libgpiod v2.

    Args:
        chip_label: The header chip's label; empty tries ``pinctrl-rp1``, ``pinctrl-bcm2711``,
            ``pinctrl-bcm2835``.
        clock: Stamps edges (the kernel's own timestamps are used with the system clock).
        dev_dir: Where to look for ``gpiochip*`` devices.

    Raises:
        GpioUnavailable: The bindings are missing or v1, or no chip has the label.
    """

    name = "libgpiod"

    def __init__(self, chip_label: str = "", clock: Clock = SYSTEM_CLOCK, *, dev_dir: str = "/dev"):
        super().__init__()
        self._gpiod = import_gpiod()
        self._line = importlib.import_module("gpiod.line")
        self.clock = clock
        self.path, self.label = find_chip(self._gpiod, chip_label, dev_dir)
        self.version = str(getattr(self._gpiod, "__version__", "unknown"))

    def _request(self, pin: int, settings: Any, action: str) -> Any:
        try:
            return self._gpiod.request_lines(self.path, consumer=CONSUMER, config={pin: settings})
        except ValueError as exc:  # the bindings' "line offset out of range"
            raise GpioError(f"pin {pin} does not exist on {self.path} ({self.label}): {exc}") from exc
        except OSError as exc:
            raise _wrap(exc, pin, self.path, action) from exc

    def output(self, pin: int, initial: bool = False) -> LibgpiodOutputLine:
        pin = check_pin(pin)
        line = self._line
        settings = self._gpiod.LineSettings(
            direction=line.Direction.OUTPUT,
            output_value=line.Value.ACTIVE if initial else line.Value.INACTIVE,
        )
        with self._lock:
            request = self._request(pin, settings, "request an output on")
            out = LibgpiodOutputLine(self, pin, request, bool(initial))
            self._lines[pin] = out
        return out

    def input(self, pin: int, pull: Pull = Pull.NONE) -> LibgpiodInputLine:
        pin = check_pin(pin)
        pull = check_pull(pull)
        line = self._line
        bias = {Pull.NONE: line.Bias.DISABLED, Pull.UP: line.Bias.PULL_UP, Pull.DOWN: line.Bias.PULL_DOWN}[pull]
        settings = self._gpiod.LineSettings(
            direction=line.Direction.INPUT, edge_detection=line.Edge.BOTH, bias=bias
        )
        with self._lock:
            request = self._request(pin, settings, "request an input on")
            inp = LibgpiodInputLine(self, pin, request)
            self._lines[pin] = inp
        return inp

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(chip=self.label, path=self.path, version=self.version)
        return info

    def _forget(self, line: LibgpiodOutputLine | LibgpiodInputLine) -> None:
        with self._lock:
            if self._lines.get(line.pin) is line:
                del self._lines[line.pin]


__all__ = ["CONSUMER", "DEFAULT_LABELS", "LibgpiodFactory", "find_chip", "import_gpiod"]


def open_factory(chip_label: str = "", clock: Clock = SYSTEM_CLOCK) -> LibgpiodFactory:
    """The seam's entry point (:data:`drivers.gpio.BACKENDS`)."""
    return LibgpiodFactory(chip_label, clock=clock)
