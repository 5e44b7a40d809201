"""Errors of the hardware drivers: one family under :class:`device.errors.FieldnodeError`.

Exceptions from what the drivers wrap (OSError from sysfs and /dev, ``serial.SerialException``, the GPIO
libraries' own errors) are translated into these where they enter our code, with ``raise ... from``.
A reading that is simply absent on this board is not an error: readers return ``None`` for "unknown".
"""

from __future__ import annotations

from device.errors import FieldnodeError


class DriverError(FieldnodeError):
    """Base of every driver error."""

    code = "driver_error"


class SysfsError(DriverError):
    """A sysfs (or /proc, /dev) node could not be read or written, or holds something unparseable."""

    code = "sysfs_error"

    def __init__(self, message: str, path: str = ""):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class SysfsPermissionError(SysfsError):
    """A write was refused for lack of permission; the message names the remedy."""

    code = "sysfs_permission"


class GpioError(DriverError):
    """A GPIO line could not be requested, read or driven."""

    code = "gpio_error"


class GpioUnavailable(GpioError):
    """No usable GPIO backend (library missing, no chip, wrong board); the message names the extras."""

    code = "gpio_unavailable"


class SerialSensorError(DriverError):
    """The serial sensor port failed (open, read, disappeared)."""

    code = "serial_error"


class FrameError(SerialSensorError):
    """A serial frame is malformed: bad length, unknown type, CRC mismatch or bad payload."""

    code = "frame_invalid"
