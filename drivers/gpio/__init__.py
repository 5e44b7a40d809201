"""The GPIO seam: one abstract pin factory, three backends, chosen by name or by trying them in order.

Workflow: the agent calls :func:`make_factory` once with the configured backend name (the ``FIELDNODE_GPIO``
environment variable overrides it) and asks the returned :class:`PinFactory` for lines by BCM number, which
is the line offset on the header chip: ``factory.output(17)`` for the status LED, ``factory.input(27,
Pull.UP)`` for a wake button. The lines are plain objects (``line.value``, ``line.wait_edge(1.0)``,
``line.poll()``), so the LED, trigger and power-good drivers work the same on every backend.

Backends, one module each (modelled on gpiozero's ``pins`` package):

* ``libgpiod`` (:mod:`drivers.gpio.libgpiod`): the libgpiod v2 Python bindings, PyPI ``gpiod>=2``. Finds the
  header chip by its label, so it works on the Pi 5 whose chip number changed between kernels.
* ``rpigpio`` (:mod:`drivers.gpio.rpigpio`): the ``RPi.GPIO`` module, either the original (Pi 4 and older)
  or the rpi-lgpio shim that provides the same module on top of lgpio.
* ``sim`` (:mod:`drivers.sim.gpio`): the simulated board; records output changes and lets tests or the
  virtual board drive inputs. It is only used when asked for by name.

``auto`` tries libgpiod, then rpigpio. Moving on from a backend is never silent: it emits a
:class:`GpioFallback` warning with the reason and keeps the reason in ``factory.fallbacks`` for status and
diag. When nothing works, :class:`~drivers.errors.GpioUnavailable` names every reason and the extras to
install.
"""

from __future__ import annotations

import abc
import threading
import enum
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

from device.clock import SYSTEM_CLOCK, Clock
from drivers.errors import GpioError, GpioUnavailable

log = logging.getLogger(__name__)

ENV_BACKEND = "FIELDNODE_GPIO"
# Backends by name: the module that implements each. The seam imports a backend only when it is asked for
# (so importing the seam never imports a GPIO library) and never names a backend's classes, so no backend,
# the simulated one included, is part of an import cycle with it. Each module provides
# ``open_factory(chip_label, clock) -> PinFactory``.
BACKENDS = {"libgpiod": "drivers.gpio.libgpiod", "rpigpio": "drivers.gpio.rpigpio", "sim": "drivers.sim.gpio"}
BACKEND_CHOICES = ("auto", *BACKENDS)
AUTO_ORDER = ("libgpiod", "rpigpio")
EXTRAS_HINT = "pip install 'fieldnode[gpiod]' (Pi 5 and newer kernels) or 'fieldnode[rpigpio]'"
MAX_PIN = 1023  # far above any header chip; only catches nonsense such as a BOARD number times 100


class Pull(enum.Enum):
    """The internal bias resistor of an input."""

    NONE = "none"
    UP = "up"
    DOWN = "down"


class Edge(enum.Enum):
    """The direction of a level change on an input."""

    RISING = "rising"
    FALLING = "falling"


@dataclass(frozen=True)
class EdgeEvent:
    """One level change seen on an input.

    Attributes:
        edge: Rising or falling.
        timestamp: When it happened, in seconds on the factory clock's ``monotonic`` scale.
    """

    edge: Edge
    timestamp: float


class GpioFallback(UserWarning):
    """``auto`` moved on from a GPIO backend; the message carries the reason."""


def check_pin(pin: Any) -> int:
    """Validates a BCM pin number.

    Args:
        pin: The value given by the caller.

    Returns:
        The pin as an int.

    Raises:
        GpioError: ``pin`` is not an integer in 0..1023.
    """
    if isinstance(pin, bool) or not isinstance(pin, int):
        raise GpioError(f"pin must be a BCM number (int), got {pin!r}")
    if not 0 <= pin <= MAX_PIN:
        raise GpioError(f"pin must be a BCM number between 0 and {MAX_PIN}, got {pin}")
    return pin


def check_pull(pull: Any) -> Pull:
    """Validates a pull setting.

    Raises:
        GpioError: ``pull`` is not a :class:`Pull` member.
    """
    if not isinstance(pull, Pull):
        raise GpioError(f"pull must be Pull.NONE, Pull.UP or Pull.DOWN, got {pull!r}")
    return pull


def check_timeout(timeout: Any) -> float:
    """Validates a wait timeout in seconds.

    Raises:
        GpioError: ``timeout`` is not a finite number >= 0.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout < 0:
        raise GpioError(f"timeout must be a finite number of seconds >= 0, got {timeout!r}")
    return float(timeout)


class _Line(abc.ABC):
    """What output and input lines share: the pin number and an idempotent close."""

    def __init__(self, pin: int):
        self.pin = pin
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Releases the line (the pin goes back to the kernel); closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        self._release()

    def _check_open(self) -> None:
        if self._closed:
            raise GpioError(f"pin {self.pin}: the line is closed")

    @abc.abstractmethod
    def _release(self) -> None:
        """Backend: gives the line back. Called once."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OutputLine(_Line):
    """A pin driven by us.

    Backends must override ``_get`` (the level last driven), ``_set`` (drive a level) and ``_release``.
    """

    @property
    def value(self) -> bool:
        """The level being driven: ``True`` is high.

        Raises:
            GpioError: The line is closed, or the backend failed to drive it.
        """
        self._check_open()
        return self._get()

    @value.setter
    def value(self, value: bool) -> None:
        self._check_open()
        if not isinstance(value, (bool, int)) or value not in (0, 1):
            raise GpioError(f"pin {self.pin}: an output value must be True or False, got {value!r}")
        self._set(bool(value))

    def on(self) -> None:
        """Drives the pin high."""
        self.value = True

    def off(self) -> None:
        """Drives the pin low."""
        self.value = False

    @abc.abstractmethod
    def _get(self) -> bool:
        """Backend: the level last driven."""

    @abc.abstractmethod
    def _set(self, value: bool) -> None:
        """Backend: drives ``value``."""


class InputLine(_Line):
    """A pin read by us, with edge detection on both edges.

    Backends must override ``_get`` (the current level), ``_wait`` (block up to a timeout for the next edge
    and consume it), ``_poll`` (consume every pending edge without blocking) and ``_release``. They may
    override ``_wake`` (end a wait early, see :meth:`wake`) and then set :attr:`can_wake`.

    Attributes:
        can_wake: :meth:`wake` ends a wait early. Without it a thread blocked in :meth:`wait_event` notices
            that it should stop only at its timeout, so it must keep its waits short.
    """

    can_wake = False

    @property
    def value(self) -> bool:
        """The current level: ``True`` is high.

        Raises:
            GpioError: The line is closed or could not be read.
        """
        self._check_open()
        return self._get()

    def wait_event(self, timeout: float) -> EdgeEvent | None:
        """Waits up to ``timeout`` seconds for the next edge and consumes it.

        Args:
            timeout: Seconds to wait; 0 only looks.

        Returns:
            The edge with its timestamp, or ``None`` when none came in time.

        Raises:
            GpioError: The line is closed, the timeout is invalid or the backend failed.
        """
        self._check_open()
        return self._wait(check_timeout(timeout))

    def wait_edge(self, timeout: float) -> Edge | None:
        """Like :meth:`wait_event` but returns only the edge kind.

        Returns:
            ``Edge.RISING``/``Edge.FALLING``, or ``None`` on timeout.
        """
        event = self.wait_event(timeout)
        return None if event is None else event.edge

    def wake(self) -> None:
        """Ends a :meth:`wait_event` in progress on another thread: it returns ``None`` at once. With no wait in
        progress the next one returns at once instead, so a thread told to stop just before it waits still
        stops. Does nothing when the backend cannot (:attr:`can_wake` is false) or the line is closed."""
        if self.can_wake and not self._closed:
            self._wake()

    def _wake(self) -> None:
        """Backend (optional): makes the current or next ``_wait`` return ``None`` at once."""

    def poll(self) -> list[EdgeEvent]:
        """Consumes and returns the edges seen since the last call (oldest first), without blocking.

        Raises:
            GpioError: The line is closed or the backend failed.
        """
        self._check_open()
        return self._poll()

    @abc.abstractmethod
    def _get(self) -> bool:
        """Backend: reads the level."""

    @abc.abstractmethod
    def _wait(self, timeout: float) -> EdgeEvent | None:
        """Backend: blocks up to ``timeout`` for an edge."""

    @abc.abstractmethod
    def _poll(self) -> list[EdgeEvent]:
        """Backend: drains pending edges."""


class PinFactory(abc.ABC):
    """Hands out GPIO lines of one backend.

    A backend must override :meth:`output` and :meth:`input` (registering each line it hands out in
    ``self._lines`` under ``self._lock``), set the class attribute ``name``, and call ``super().__init__()``.
    :meth:`close` releases every registered line. It may override :meth:`describe` (call the base and add its
    own keys: chip label and path, library version). Pins are BCM numbers, which are the line offsets on the
    header chip; use :func:`check_pin` and :func:`check_pull` on the arguments.

    Attributes:
        name: The backend name (``libgpiod``, ``rpigpio``, ``sim``).
        fallbacks: Why ``auto`` did not pick the backends it tried before this one (empty otherwise).
    """

    name = "abstract"

    def __init__(self) -> None:
        self.fallbacks: list[str] = []
        self._lock = threading.RLock()
        self._lines: dict[int, Any] = {}

    @abc.abstractmethod
    def output(self, pin: int, initial: bool = False) -> OutputLine:
        """Requests ``pin`` as an output driven to ``initial``.

        Raises:
            GpioError: The pin is invalid, in use or could not be requested.
        """

    @abc.abstractmethod
    def input(self, pin: int, pull: Pull = Pull.NONE) -> InputLine:
        """Requests ``pin`` as an input with edge detection and the given bias.

        Raises:
            GpioError: The pin or pull is invalid, the pin is in use or could not be requested.
        """

    def close(self) -> None:
        """Releases every line this factory handed out."""
        with self._lock:
            lines = list(self._lines.values())
        for line in lines:
            line.close()

    def describe(self) -> dict[str, Any]:
        """What status and diag show: backend name, chip, library version and fallback reasons."""
        return {"backend": self.name, "chip": None, "path": None, "version": None, "fallbacks": list(self.fallbacks)}

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load(name: str, chip_label: str, clock: Clock) -> PinFactory:
    import importlib

    return importlib.import_module(BACKENDS[name]).open_factory(chip_label, clock)


def make_factory(
    backend: str = "auto",
    *,
    chip_label: str = "",
    clock: Clock = SYSTEM_CLOCK,
    environ: Mapping[str, str] | None = None,
) -> PinFactory:
    """Builds the pin factory for the configured backend.

    Args:
        backend: ``auto``, ``libgpiod``, ``rpigpio`` or ``sim``; ``FIELDNODE_GPIO`` overrides it.
        chip_label: The header chip's label for libgpiod (empty: try the Raspberry Pi labels).
        clock: Timestamps edges; the simulated backend also waits on it.
        environ: The environment to read ``FIELDNODE_GPIO`` from (``os.environ`` when ``None``).

    Returns:
        A ready factory; for ``auto``, ``factory.fallbacks`` lists why earlier backends were skipped.

    Raises:
        GpioUnavailable: The name is unknown, the named backend cannot run here, or (``auto``) no backend
            can; the message carries each reason and the extras to install.
    """
    env = os.environ if environ is None else environ
    override = (env.get(ENV_BACKEND) or "").strip()
    name = (override or backend or "auto").strip().lower()
    if name not in BACKEND_CHOICES:
        source = f"environment variable {ENV_BACKEND}" if override else "configuration"
        raise GpioUnavailable(
            f"unknown GPIO backend {name!r} (from the {source}); choose one of {', '.join(BACKEND_CHOICES)}"
        )
    if name != "auto":
        return _load(name, chip_label, clock)
    reasons: list[str] = []
    for i, candidate in enumerate(AUTO_ORDER):
        try:
            factory = _load(candidate, chip_label, clock)
        except GpioUnavailable as exc:
            reasons.append(f"{candidate}: {exc}")
            if i + 1 < len(AUTO_ORDER):
                log.debug("GPIO backend %s unavailable: %s", candidate, exc)
                warnings.warn(GpioFallback(f"falling back from GPIO backend {candidate}: {exc}"), stacklevel=2)
            continue
        factory.fallbacks = reasons
        return factory
    raise GpioUnavailable("no GPIO backend works here: " + "; ".join(reasons) + f". Install one: {EXTRAS_HINT}")


__all__ = [
    "AUTO_ORDER",
    "BACKENDS",
    "BACKEND_CHOICES",
    "ENV_BACKEND",
    "Edge",
    "EdgeEvent",
    "GpioFallback",
    "InputLine",
    "OutputLine",
    "PinFactory",
    "Pull",
    "check_pin",
    "check_pull",
    "check_timeout",
    "make_factory",
]
