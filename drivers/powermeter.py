"""What the board draws, measured: hwmon power monitors and the battery's own gauge.

Workflow: :func:`find_meter` walks ``sys/class/hwmon/hwmon*`` under a :class:`~drivers.sysfs.Sysfs` root and
returns the power monitor to read as a frozen :class:`HwmonMeter` (discovery reads a few nodes per hwmon
directory, so callers keep the result and look again only now and then). :func:`read_meter` reads it into a
:class:`PowerReading`. :func:`battery_reading` turns the battery of a :class:`~drivers.power_supply.PowerState`
into one, and :func:`choose_reading` picks the reading the governor should learn from:

1. the hwmon monitor: it sits in the board's supply path and measures what the board takes in;
2. the battery's ``power_now``;
3. the battery's ``current_now`` × ``voltage_now``;
4. nothing (``None``, with the reason), and the governor falls back on its board-profile model.

A battery reading counts only while the battery is known to discharge: while it charges, or while external
power is present, its gauge measures the charge current (or nothing), not the board.

Monitors (units as the kernel's hwmon ABI gives them): the INA219/INA226/INA230/INA231 (``ina2xx`` driver)
and the INA260 (``ina2xx`` or ``ina238``, depending on the kernel) show ``power1_input`` (µW), ``curr1_input``
(mA) and the bus voltage ``in1_input`` (mV; ``in0`` is the shunt voltage). The INA3221 (Jetson rails, driver
``ina3221``) has three channels with ``in<N>_input`` (mV), ``curr<N>_input`` (mA) and ``in<N>_label``; the
channel labelled ``VDD_IN`` is the board's input, and without one the channels are summed. Readings that are
missing, unparseable, negative, or outside :data:`MIN_PLAUSIBLE_W`..:data:`MAX_PLAUSIBLE_W` are unknown
(``None``): a monitor reading 0 W is not in the supply path of a board that is running this code. Nothing
here raises for absent or garbage nodes.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from drivers.power_supply import PowerState
from drivers.sysfs import Sysfs

log = logging.getLogger(__name__)

HWMON_DIR = "sys/class/hwmon"

# hwmon ``name`` values of the power monitors we know how to read.
KNOWN_METERS = ("ina219", "ina226", "ina230", "ina231", "ina260", "ina238", "ina2xx", "ina3221")
MULTI_CHANNEL_METERS = ("ina3221",)
INA3221_CHANNELS = (1, 2, 3)  # in4..in6 are its shunt voltages, curr4 a sum of selected channels
BOARD_INPUT_LABEL = "VDD_IN"  # the Jetson Orin Nano/NX channel that measures the whole module's input

# Outside this range a reading comes from a meter outside the board's supply path (a board running Linux
# draws a few hundred milliwatts at the very least), a misconfigured shunt or a garbled register.
MIN_PLAUSIBLE_W = 0.05
MAX_PLAUSIBLE_W = 1000.0

_HWMON_RE = re.compile(r"hwmon\d+")


@dataclass(frozen=True)
class PowerReading:
    """A measured power draw.

    Attributes:
        watts: The power in watts (within :data:`MIN_PLAUSIBLE_W`..:data:`MAX_PLAUSIBLE_W`).
        source: Where it came from: ``hwmon0:ina260``, ``hwmon1:ina3221:VDD_IN``, ``hwmon1:ina3221:sum``,
            ``battery:power_now`` or ``battery:current_now*voltage_now``.
    """

    watts: float
    source: str


@dataclass(frozen=True)
class HwmonMeter:
    """A power monitor found under ``sys/class/hwmon``.

    Attributes:
        hwmon: The directory name (``hwmon0``).
        chip: Its ``name`` node (``ina260``...).
        channels: For a multi-channel monitor, the channels to read (summed when more than one); empty for a
            single-channel one.
        label: The label of the one channel read, when the monitor has several and one was picked by label.
    """

    hwmon: str
    chip: str
    channels: tuple[int, ...] = ()
    label: str | None = None

    @property
    def rel(self) -> str:
        """The monitor's directory, relative to the sysfs root."""
        return f"{HWMON_DIR}/{self.hwmon}"

    @property
    def source(self) -> str:
        """The :attr:`PowerReading.source` of its readings."""
        if self.chip not in MULTI_CHANNEL_METERS:
            return f"{self.hwmon}:{self.chip}"
        return f"{self.hwmon}:{self.chip}:{self.label or 'sum'}"

    def matches(self, name: str) -> bool:
        """Whether ``name`` is this monitor's chip, its hwmon directory or (case-insensitively) the label of
        the channel read."""
        return name in (self.chip, self.hwmon) or (self.label or "").lower() == name.lower()

    def present(self, fs: Sysfs) -> bool:
        """Whether the monitor is still there under the same name (drivers unbind; hwmon numbers move)."""
        return fs.read_optional(f"{self.rel}/name") == self.chip


def _labels(fs: Sysfs, rel: str) -> dict[int, str]:
    """The enabled INA3221 channels and their labels (``""`` when unlabelled)."""
    found = {}
    for ch in INA3221_CHANNELS:
        if fs.read_optional_int(f"{rel}/in{ch}_enable") == 0:
            continue  # a disabled channel reads stale or nothing
        if fs.read_optional_int(f"{rel}/in{ch}_input") is None or fs.read_optional_int(f"{rel}/curr{ch}_input") is None:
            continue  # no shunt fitted, or nothing connected (ENODATA): it would void every sum
        found[ch] = fs.read_optional(f"{rel}/in{ch}_label") or ""
    return found


def _meter(fs: Sysfs, hwmon: str, chip: str, prefer: str | None) -> HwmonMeter:
    if chip not in MULTI_CHANNEL_METERS:
        return HwmonMeter(hwmon, chip)
    labels = _labels(fs, f"{HWMON_DIR}/{hwmon}")
    wanted = [w for w in (prefer, BOARD_INPUT_LABEL) if w]
    for want in wanted:
        for ch, label in labels.items():
            if label and label.lower() == want.lower():
                return HwmonMeter(hwmon, chip, (ch,), label)
    return HwmonMeter(hwmon, chip, tuple(labels))


def discover_meters(fs: Sysfs, prefer: str | None = None) -> tuple[HwmonMeter, ...]:
    """Every power monitor under ``sys/class/hwmon``, best first.

    A monitor matching ``prefer`` comes first (it may be a chip this module does not know, as long as it
    shows the hwmon power or current nodes); then monitors with a channel labelled ``VDD_IN``; then the
    rest in natural order of their directories.

    Args:
        fs: The sysfs root.
        prefer: A configured choice: a chip name (``ina226``), a hwmon directory (``hwmon2``) or a channel
            label (``VDD_IN``, matched case-insensitively); ``None`` for none.

    Returns:
        The monitors (empty when the board shows none). Never raises.
    """
    ranked = []
    for order, rel in enumerate(fs.glob(f"{HWMON_DIR}/hwmon*")):
        hwmon = os.path.basename(rel)
        if not _HWMON_RE.fullmatch(hwmon):
            continue
        chip = fs.read_optional(f"{rel}/name")
        if chip is None:
            continue
        chosen = prefer is not None and prefer in (chip, hwmon)
        if chip not in KNOWN_METERS and not (chosen and _has_power_nodes(fs, rel)):
            continue
        meter = _meter(fs, hwmon, chip, prefer)
        rank = 0 if prefer is not None and meter.matches(prefer) else 1 if meter.matches(BOARD_INPUT_LABEL) else 2
        ranked.append((rank, order, meter))
    return tuple(m for _, _, m in sorted(ranked, key=lambda r: r[:2]))


def _has_power_nodes(fs: Sysfs, rel: str) -> bool:
    return fs.exists(f"{rel}/power1_input") or (fs.exists(f"{rel}/curr1_input") and fs.exists(f"{rel}/in1_input"))


def find_meter(fs: Sysfs, prefer: str | None = None) -> HwmonMeter | None:
    """The power monitor to read: the first of :func:`discover_meters`, or ``None`` when there is none.

    Args:
        fs: The sysfs root.
        prefer: A configured chip name, hwmon directory or channel label (see :func:`discover_meters`).

    Returns:
        The monitor, or ``None``. Never raises.
    """
    meters = discover_meters(fs, prefer)
    return meters[0] if meters else None


def _plausible(watts: float | None, what: str) -> float | None:
    if watts is None:
        return None
    if not MIN_PLAUSIBLE_W <= watts <= MAX_PLAUSIBLE_W:
        log.debug("%s reads %.6g W, outside %g..%g W; treated as unknown", what, watts, MIN_PLAUSIBLE_W,
                  MAX_PLAUSIBLE_W)
        return None
    return watts


def _volts_times_amps(fs: Sysfs, rel: str, ch: int) -> float | None:
    millivolts = fs.read_optional_int(f"{rel}/in{ch}_input")
    milliamps = fs.read_optional_int(f"{rel}/curr{ch}_input")
    if millivolts is None or milliamps is None or millivolts < 0:
        return None
    # the sign of the current only says which way the shunt was wired
    return millivolts / 1e3 * abs(milliamps) / 1e3


def read_meter(fs: Sysfs, meter: HwmonMeter) -> PowerReading | None:
    """Reads a monitor once.

    A single-channel monitor gives ``power1_input``, else (absent or not believable) ``curr1_input`` ×
    ``in1_input``. A multi-channel one gives its picked channel's current × bus voltage, or the sum over its
    channels (``None`` if any of them cannot be read, since a partial sum would understate the draw).

    Args:
        fs: The sysfs root.
        meter: A monitor from :func:`find_meter`.

    Returns:
        The reading, or ``None`` when it is missing or not believable. Never raises.
    """
    rel = meter.rel
    if meter.chip in MULTI_CHANNEL_METERS:
        if not meter.channels:
            return None
        parts = [_volts_times_amps(fs, rel, ch) for ch in meter.channels]
        watts = None if None in parts else sum(p for p in parts if p is not None)
        watts = _plausible(watts, meter.source)
    else:
        microwatts = fs.read_optional_int(f"{rel}/power1_input")
        # the power register is unsigned in every driver: a negative value is garbage, caught here
        watts = _plausible(None if microwatts is None else microwatts / 1e6, f"{meter.source} power1_input")
        if watts is None:
            watts = _plausible(_volts_times_amps(fs, rel, 1), f"{meter.source} curr1_input*in1_input")
    return None if watts is None else PowerReading(watts, meter.source)


def battery_reading(state: PowerState) -> tuple[PowerReading | None, str | None]:
    """What the battery's gauge says the board draws.

    Args:
        state: The board's power state (:func:`drivers.power_supply.read_power`).

    Returns:
        ``(reading, None)``, or ``(None, reason)`` when the battery gives no usable reading: no battery, no
        power nodes, a charging battery or external power (then the gauge does not measure the board), a
        direction nobody reports, or an unbelievable value.
    """
    battery = state.battery
    if battery is None:
        return None, "no battery"
    if battery.power_w is None or battery.power_basis is None:
        return None, f"battery {battery.name} shows neither power_now nor current_now and voltage_now"
    if state.charging is True or state.on_external_power is True:
        return None, (f"battery {battery.name} is charging or on external power (status "
                      f"{battery.status or 'missing'}): its gauge measures the charge current, not the board")
    if state.on_external_power is not False:
        return None, (f"battery {battery.name} does not say whether it discharges "
                      f"(status {battery.status or 'missing'}); its current may be charge current")
    basis = battery.power_basis
    watts = _plausible(battery.power_w, f"battery {battery.name} {basis}")
    if watts is None:
        return None, f"battery {battery.name} {basis} reads outside {MIN_PLAUSIBLE_W:g}..{MAX_PLAUSIBLE_W:g} W"
    return PowerReading(watts, f"battery:{basis}"), None


def choose_reading(meter: PowerReading | None, state: PowerState) -> tuple[PowerReading | None, str | None]:
    """Picks the power reading to learn from: the hwmon monitor's, else the battery's.

    Args:
        meter: What :func:`read_meter` returned, or ``None`` (no monitor, or no reading from it).
        state: The board's power state, for the battery.

    Returns:
        ``(reading, None)``, or ``(None, reason)`` when there is nothing to learn from.
    """
    if meter is not None:
        return meter, None
    reading, why = battery_reading(state)
    if reading is not None:
        return reading, None
    return None, f"no power monitor reading; {why}"
