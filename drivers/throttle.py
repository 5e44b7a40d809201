"""Board-specific power and throttle state: Raspberry Pi ``get_throttled`` flags and Jetson nvpmodel modes.

Raspberry Pi: the firmware keeps a bit field of power and thermal trouble (:class:`ThrottleBit`; bits
0-3 are "now", bits 16-19 the same conditions "has occurred since boot"). :func:`read_throttled` reads it
from the firmware driver's sysfs node (hex text such as ``50005``) and, only when the sysfs root is the
real ``/``, falls back to ``vcgencmd get_throttled`` (which prints ``throttled=0x50005``). A pointed-at
fake tree never runs the board's tools. :class:`ThrottleFlags` decodes the bits and describes them for
technicians.

Jetson: :func:`read_nvpmodel` runs ``nvpmodel -q`` when it is on ``PATH`` and returns the current power
mode (name and id; ids differ between releases, so the name is what to show).

Both readers return ``None`` for "unknown" (not a Pi, tool missing, failing, too slow or printing
something unexpected) and never raise; the ``parse_*`` functions raise :class:`~drivers.errors.SysfsError`
naming the text they could not parse.
"""

from __future__ import annotations

import enum
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable

from drivers.errors import SysfsError
from drivers.sysfs import Sysfs

log = logging.getLogger(__name__)

# The firmware driver's node: the Pi 4 path first, then wherever the soc bus sits on other models.
FIRMWARE_NODES = (
    "sys/devices/platform/soc/soc:firmware/get_throttled",
    "sys/devices/platform/*/*:firmware/get_throttled",
)
COMMAND_TIMEOUT_S = 2.0
OCCURRED_SHIFT = 16

Run = Callable[..., "subprocess.CompletedProcess"]


class ThrottleBit(enum.IntEnum):
    """The "now" bits of ``get_throttled``; ``bit + OCCURRED_SHIFT`` is the "has occurred" bit."""

    UNDER_VOLTAGE = 0
    FREQ_CAPPED = 1
    THROTTLED = 2
    SOFT_TEMP_LIMIT = 3

    @property
    def label(self) -> str:
        """The technician's words for the condition."""
        return _LABELS[self]


_LABELS = {
    ThrottleBit.UNDER_VOLTAGE: "under-voltage",
    ThrottleBit.FREQ_CAPPED: "frequency capped",
    ThrottleBit.THROTTLED: "throttled",
    ThrottleBit.SOFT_TEMP_LIMIT: "soft temperature limit",
}

_HEX_RE = re.compile(r"(?:0[xX])?([0-9a-fA-F]+)")
_VCGENCMD_RE = re.compile(r"throttled=(?:0[xX])?([0-9a-fA-F]+)")


@dataclass(frozen=True)
class ThrottleFlags:
    """The decoded ``get_throttled`` bit field. Unknown bits stay in ``raw`` and are otherwise ignored.

    Attributes:
        raw: The bit field as read.

    Raises:
        ValueError: ``raw`` is not a non-negative integer.
    """

    raw: int

    def __post_init__(self) -> None:
        if isinstance(self.raw, bool) or not isinstance(self.raw, int) or self.raw < 0:
            raise ValueError(f"get_throttled value must be a non-negative integer, got {self.raw!r}")

    def now(self, bit: ThrottleBit) -> bool:
        """Whether the condition holds now."""
        return bool(self.raw >> bit & 1)

    def occurred(self, bit: ThrottleBit) -> bool:
        """Whether the condition has occurred since boot."""
        return bool(self.raw >> (bit + OCCURRED_SHIFT) & 1)

    @property
    def under_voltage(self) -> bool:
        return self.now(ThrottleBit.UNDER_VOLTAGE)

    @property
    def freq_capped(self) -> bool:
        return self.now(ThrottleBit.FREQ_CAPPED)

    @property
    def throttled(self) -> bool:
        return self.now(ThrottleBit.THROTTLED)

    @property
    def soft_temp_limit(self) -> bool:
        return self.now(ThrottleBit.SOFT_TEMP_LIMIT)

    @property
    def under_voltage_occurred(self) -> bool:
        return self.occurred(ThrottleBit.UNDER_VOLTAGE)

    @property
    def freq_capped_occurred(self) -> bool:
        return self.occurred(ThrottleBit.FREQ_CAPPED)

    @property
    def throttled_occurred(self) -> bool:
        return self.occurred(ThrottleBit.THROTTLED)

    @property
    def soft_temp_limit_occurred(self) -> bool:
        return self.occurred(ThrottleBit.SOFT_TEMP_LIMIT)

    @property
    def active(self) -> tuple[str, ...]:
        """Labels of the conditions that hold now, in bit order."""
        return tuple(bit.label for bit in ThrottleBit if self.now(bit))

    @property
    def occurred_only(self) -> tuple[str, ...]:
        """Labels of the conditions that occurred since boot but do not hold now."""
        return tuple(bit.label for bit in ThrottleBit if self.occurred(bit) and not self.now(bit))

    def describe(self) -> str:
        """One line for technicians, e.g. ``"under-voltage now; soft temperature limit occurred"``.

        Returns:
            The conditions holding now, then those that only occurred since boot, or
            ``"no throttling"`` when neither.
        """
        parts = [f"{label} now" for label in self.active]
        parts += [f"{label} occurred" for label in self.occurred_only]
        return "; ".join(parts) if parts else "no throttling"


def parse_throttled_node(text: str) -> int:
    """Parses the firmware node's hex text (``50005``; a ``0x`` prefix is accepted too).

    Args:
        text: The node's content.

    Returns:
        The bit field.

    Raises:
        SysfsError: ``text`` is not a hex number.
    """
    m = _HEX_RE.fullmatch(text.strip())
    if not m:
        raise SysfsError(f"cannot parse {text[:200]!r}: expected a hex bit field such as '50005'",
                         "get_throttled")
    return int(m.group(1), 16)


def parse_vcgencmd(text: str) -> int:
    """Parses ``vcgencmd get_throttled`` output (``throttled=0x50005``).

    Args:
        text: What the command printed.

    Returns:
        The bit field.

    Raises:
        SysfsError: ``text`` holds no ``throttled=<hex>``.
    """
    m = _VCGENCMD_RE.fullmatch(text.strip())
    if not m:
        raise SysfsError(f"cannot parse output {text[:200]!r}: expected 'throttled=0x<hex>'",
                         "vcgencmd get_throttled")
    return int(m.group(1), 16)


def _run_tool(argv: list[str], run: Run, timeout_s: float) -> str | None:
    """The tool's stdout, or ``None`` (with a debug line saying why) when it is missing or fails."""
    exe = shutil.which(argv[0])
    if exe is None:
        log.debug("%s not on PATH", argv[0])
        return None
    command = " ".join(argv)
    try:
        proc = run([exe, *argv[1:]], capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        log.debug("%s took longer than %.1f s; treated as unknown", command, timeout_s)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("%s could not run: %s", command, exc)
        return None
    out = proc.stdout.decode("utf-8", "replace") if isinstance(proc.stdout, bytes) else (proc.stdout or "")
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace") if isinstance(proc.stderr, bytes) else proc.stderr
        log.debug("%s exited with %s: %s", command, proc.returncode, (err or out).strip()[:200])
        return None
    return out


def _read_firmware_node(fs: Sysfs) -> int | None:
    for pattern in FIRMWARE_NODES:
        for rel in fs.glob(pattern):
            try:
                text = fs.read_text(rel)
                if text is not None:
                    return parse_throttled_node(text)
            except SysfsError as exc:
                log.debug("firmware throttle node unusable: %s", exc)
    return None


def read_throttled(fs: Sysfs, run: Run = subprocess.run,
                   timeout_s: float = COMMAND_TIMEOUT_S) -> ThrottleFlags | None:
    """Reads the Raspberry Pi throttle flags.

    Args:
        fs: The sysfs root; ``vcgencmd`` is only consulted when it is ``/``.
        run: The ``subprocess.run`` seam.
        timeout_s: How long ``vcgencmd`` may take.

    Returns:
        The flags, or ``None`` when neither the firmware node nor ``vcgencmd`` gives a usable value.
    """
    raw = _read_firmware_node(fs)
    if raw is None and fs.root == "/":
        out = _run_tool(["vcgencmd", "get_throttled"], run, timeout_s)
        if out is not None:
            try:
                raw = parse_vcgencmd(out)
            except SysfsError as exc:
                log.debug("%s", exc)
    return ThrottleFlags(raw) if raw is not None else None


@dataclass(frozen=True)
class PowerMode:
    """A Jetson nvpmodel power mode.

    Attributes:
        id: The mode id (differs between releases), or ``None`` when not printed.
        name: The mode name (``MAXN``, ``15W``, ``7W``...).
    """

    id: int | None
    name: str


def parse_nvpmodel(text: str) -> PowerMode:
    """Parses ``nvpmodel -q`` output: a ``NV Power Mode: <name>`` line, then the mode id on the next.

    Args:
        text: What the command printed (other lines, such as ``NV Fan Mode:quiet``, may come first).

    Returns:
        The power mode; ``id`` is ``None`` when the line after the name is not a number.

    Raises:
        SysfsError: There is no ``NV Power Mode:`` line with a name.
    """
    lines = [line.strip() for line in text.splitlines()]
    for i, line in enumerate(lines):
        if not line.startswith("NV Power Mode:"):
            continue
        name = line[len("NV Power Mode:"):].strip()
        if not name:
            raise SysfsError(f"'NV Power Mode:' line without a name in output {text[:200]!r}", "nvpmodel -q")
        following = next((rest for rest in lines[i + 1:] if rest), "")
        return PowerMode(int(following) if following.isdigit() else None, name)
    raise SysfsError(f"no 'NV Power Mode:' line in output {text[:200]!r}", "nvpmodel -q")


def read_nvpmodel(run: Run = subprocess.run, timeout_s: float = COMMAND_TIMEOUT_S) -> PowerMode | None:
    """Reads the Jetson power mode with ``nvpmodel -q``.

    Args:
        run: The ``subprocess.run`` seam.
        timeout_s: How long ``nvpmodel`` may take.

    Returns:
        The power mode, or ``None`` when ``nvpmodel`` is not on ``PATH``, fails, times out or prints
        something unexpected.
    """
    out = _run_tool(["nvpmodel", "-q"], run, timeout_s)
    if out is None:
        return None
    try:
        return parse_nvpmodel(out)
    except SysfsError as exc:
        log.debug("%s", exc)
        return None
