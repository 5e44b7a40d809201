"""Power supplies from ``/sys/class/power_supply``: is the board on a battery, and how full is it?

Workflow: :func:`read_supplies` reads every ``sys/class/power_supply/*`` directory into a frozen
:class:`Supply`; :func:`read_power` picks the one battery and the one external supply that matter and
returns them as a :class:`PowerState`, whose properties answer the governor's questions (charging? on
external power? battery percentage?). :meth:`Supply.remaining_energy` says how many watt-hours a battery has
left and what that figure rests on.

Units are converted from the kernel's µV, µA, µW, µAh and µWh. Boards expose very different subsets (a laptop has
``BAT0`` and ``AC``; a UPS HAT's fuel gauge is a lone ``Battery``; a bare Pi has nothing), so a missing
node means "unknown" (``None``), and so does a value that cannot be parsed or is impossible. Reading
never raises.

Sign of the current: the kernel ABI says ``current_now`` is negative while a battery discharges and
positive while it charges, but many drivers (the ACPI battery on laptops, several fuel gauges) report
the magnitude only. :attr:`Supply.current_a` keeps the raw sign of the driver; use the battery ``status``
for the direction. Power is a magnitude.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from drivers.sysfs import Sysfs

log = logging.getLogger(__name__)

POWER_SUPPLY_DIR = "sys/class/power_supply"

BATTERY_TYPE = "Battery"
# External supply types, most to least preferred: mains, then the USB flavours, then the rest.
EXTERNAL_TYPES = (
    "Mains",
    "USB", "USB_PD", "USB_C", "USB_PD_DRP", "USB_DCP", "USB_CDP", "USB_ACA", "USB_HVDCP", "USB_HVDCP_3",
    "USB_TYPE_C", "USB_FLOAT", "Wireless", "BrickID",
)

CHARGING_STATUSES = ("Charging", "Full")
DISCHARGING_STATUS = "Discharging"

# What :attr:`Supply.power_w` was computed from.
POWER_NOW = "power_now"
CURRENT_TIMES_VOLTAGE = "current_now*voltage_now"

# A single lithium cell's nominal voltage: turns a charge (Ah) into an energy (Wh) when the gauge gives no
# voltage. Packs of several cells in series make this an underestimate, hence "estimate" in the basis.
NOMINAL_CELL_V = 3.7


@dataclass(frozen=True)
class Supply:
    """A snapshot of one power supply.

    Attributes:
        name: The directory name (``BAT0``, ``AC``, ``bq27441-0``...).
        type: The ``type`` node (``Battery``, ``Mains``, ``USB``...), or ``None``.
        online: Whether an external supply delivers power (``online`` != 0), or ``None``.
        status: The ``status`` text (``Charging``, ``Discharging``, ``Not charging``, ``Full``,
            ``Unknown``), or ``None``.
        capacity_pct: State of charge, 0-100, or ``None``.
        voltage_v: ``voltage_now`` in volts, or ``None``.
        current_a: ``current_now`` in amperes with the driver's raw sign (see the module docstring), or
            ``None``.
        power_w: ``power_now`` in watts (magnitude), else ``|voltage_v * current_a|``, or ``None``.
        scope: The ``scope`` node (``System`` or ``Device``), or ``None``; ``Device`` marks the battery
            of a peripheral (a wireless mouse), not of the board.
        present: The ``present`` node (``False`` for an empty battery slot), or ``None``.
        power_basis: What ``power_w`` came from: :data:`POWER_NOW` or :data:`CURRENT_TIMES_VOLTAGE`, or
            ``None`` when ``power_w`` is unknown.
        charge_now_ah: ``charge_now`` in ampere-hours, or ``None``.
        charge_full_ah: ``charge_full`` (the capacity the battery holds now, after ageing) in ampere-hours,
            or ``None``.
        charge_full_design_ah: ``charge_full_design`` in ampere-hours, or ``None``.
        energy_now_wh: ``energy_now`` in watt-hours, or ``None``.
        energy_full_wh: ``energy_full`` in watt-hours, or ``None``.
    """

    name: str
    type: str | None
    online: bool | None = None
    status: str | None = None
    capacity_pct: float | None = None
    voltage_v: float | None = None
    current_a: float | None = None
    power_w: float | None = None
    scope: str | None = None
    present: bool | None = None
    power_basis: str | None = None
    charge_now_ah: float | None = None
    charge_full_ah: float | None = None
    charge_full_design_ah: float | None = None
    energy_now_wh: float | None = None
    energy_full_wh: float | None = None

    def remaining_energy(self) -> tuple[float | None, str | None]:
        """The energy left in this battery, in watt-hours, and what the figure rests on.

        In order of trust: ``energy_now`` (the gauge's own figure); ``charge_now`` × ``voltage_now``;
        ``capacity`` × ``energy_full``; ``capacity`` × ``charge_full`` (else ``charge_full_design``) ×
        :data:`NOMINAL_CELL_V`, which is an estimate (the basis starts with ``estimate:``).

        Returns:
            ``(wh, basis)``, or ``(None, None)`` when nothing the supply exposes gives the energy.
        """
        if self.energy_now_wh is not None:
            return self.energy_now_wh, "energy_now"
        if self.charge_now_ah is not None and self.voltage_v:  # a 0 V reading is no voltage
            return self.charge_now_ah * self.voltage_v, "charge_now*voltage_now"
        if self.capacity_pct is None:
            return None, None
        share = self.capacity_pct / 100.0
        if self.energy_full_wh is not None:
            return share * self.energy_full_wh, "capacity*energy_full"
        for full, node in ((self.charge_full_ah, "charge_full"), (self.charge_full_design_ah, "charge_full_design")):
            if full is not None:
                return share * full * NOMINAL_CELL_V, f"estimate:capacity*{node}*{NOMINAL_CELL_V:g}V"
        return None, None


@dataclass(frozen=True)
class PowerState:
    """The battery and the external supply that describe the board's power.

    Attributes:
        battery: The board's battery, or ``None`` when it has none (or none is visible).
        external: The external supply, or ``None`` when none is visible.
    """

    battery: Supply | None = None
    external: Supply | None = None

    @property
    def charging(self) -> bool | None:
        """``True`` when the battery says Charging/Full; ``False`` when it says Discharging (an external supply
        may be online and still give less than the board draws: a solar panel at dusk); otherwise the external
        supply's ``online`` (``Not charging`` on mains is a charge threshold, not a drain); ``None`` when nothing
        tells."""
        status = self.battery.status if self.battery else None
        online = self.external.online if self.external else None
        if status in CHARGING_STATUSES:
            return True
        if status == DISCHARGING_STATUS:
            return False
        if online is not None:
            return online
        if status == "Not charging":
            return False
        return None

    @property
    def on_external_power(self) -> bool | None:
        """Whether external power is present: the external supply's ``online``, else what the battery
        status implies (Charging/Full: yes, Discharging: no), else ``None``."""
        if self.external is not None and self.external.online is not None:
            return self.external.online
        status = self.battery.status if self.battery else None
        if status in CHARGING_STATUSES:
            return True
        if status == DISCHARGING_STATUS:
            return False
        return None  # "Not charging" happens both on AC (charge inhibited) and off it

    @property
    def battery_pct(self) -> float | None:
        """The battery's state of charge in percent, or ``None``."""
        return self.battery.capacity_pct if self.battery else None


def _read_flag(fs: Sysfs, rel: str) -> bool | None:
    value = fs.read_optional_int(rel)
    # online is 0 offline, 1 online fixed, 2 online programmable (USB PD); negative is nonsense
    return None if value is None or value < 0 else value != 0


def _read_amount(fs: Sysfs, rel: str, positive: bool = False) -> float | None:
    """A µAh or µWh node in Ah or Wh; ``None`` when absent, garbage, negative, or zero where it must be
    positive (a full charge of 0 is a gauge that has not learnt its battery yet)."""
    value = fs.read_optional_int(rel)
    if value is None:
        return None
    if value < 0 or (positive and value == 0):
        log.debug("%s is %d, impossible; treated as unknown", rel, value)
        return None
    return value / 1e6


def read_supply(fs: Sysfs, name: str) -> Supply:
    """Reads one supply directory.

    Args:
        fs: The sysfs root.
        name: The directory name under ``sys/class/power_supply``.

    Returns:
        The supply, with ``None`` for every missing or unparseable reading.
    """
    base = f"{POWER_SUPPLY_DIR}/{name}"
    capacity = fs.read_optional_int(f"{base}/capacity")
    if capacity is not None and not 0 <= capacity <= 100:
        log.debug("%s/capacity is %d, outside 0..100; treated as unknown", base, capacity)
        capacity = None
    microvolts = fs.read_optional_int(f"{base}/voltage_now")
    if microvolts is not None and microvolts < 0:
        log.debug("%s/voltage_now is %d, negative; treated as unknown", base, microvolts)
        microvolts = None
    microamps = fs.read_optional_int(f"{base}/current_now")
    microwatts = fs.read_optional_int(f"{base}/power_now")
    voltage = microvolts / 1e6 if microvolts is not None else None
    current = microamps / 1e6 if microamps is not None else None
    power_basis: str | None = None
    if microwatts is not None:
        power, power_basis = abs(microwatts) / 1e6, POWER_NOW
    elif voltage is not None and current is not None:
        power, power_basis = abs(voltage * current), CURRENT_TIMES_VOLTAGE
    else:
        power = None
    return Supply(
        name=name,
        type=fs.read_optional(f"{base}/type"),
        online=_read_flag(fs, f"{base}/online"),
        status=fs.read_optional(f"{base}/status"),
        capacity_pct=float(capacity) if capacity is not None else None,
        voltage_v=voltage,
        current_a=current,
        power_w=power,
        scope=fs.read_optional(f"{base}/scope"),
        present=_read_flag(fs, f"{base}/present"),
        power_basis=power_basis,
        charge_now_ah=_read_amount(fs, f"{base}/charge_now"),
        charge_full_ah=_read_amount(fs, f"{base}/charge_full", positive=True),
        charge_full_design_ah=_read_amount(fs, f"{base}/charge_full_design", positive=True),
        energy_now_wh=_read_amount(fs, f"{base}/energy_now"),
        energy_full_wh=_read_amount(fs, f"{base}/energy_full", positive=True),
    )


def read_supplies(fs: Sysfs) -> tuple[Supply, ...]:
    """Reads every supply under ``sys/class/power_supply``, in natural order.

    Args:
        fs: The sysfs root.

    Returns:
        All supplies (empty when the board has no power_supply class).
    """
    return tuple(read_supply(fs, os.path.basename(rel)) for rel in fs.glob(f"{POWER_SUPPLY_DIR}/*"))


def _pick_battery(supplies: tuple[Supply, ...]) -> Supply | None:
    batteries = [
        s for s in supplies
        if s.type == BATTERY_TYPE
        and s.scope != "Device"  # a peripheral's battery says nothing about the board
        and s.present is not False  # an empty battery slot
    ]
    with_capacity = [s for s in batteries if s.capacity_pct is not None]
    if with_capacity:
        return with_capacity[0]
    return batteries[0] if batteries else None


def _pick_external(supplies: tuple[Supply, ...]) -> Supply | None:
    # An online supply beats an offline one of a better type (a laptop on USB-C with its AC jack empty);
    # unknown sits between, because it may be delivering.
    online_rank = {True: 0, None: 1, False: 2}
    candidates = [
        (online_rank[s.online], EXTERNAL_TYPES.index(s.type), order, s)
        for order, s in enumerate(supplies)
        if s.type in EXTERNAL_TYPES
    ]
    return min(candidates, key=lambda c: c[:3])[3] if candidates else None


def read_power(fs: Sysfs) -> PowerState:
    """Reads the board's power state.

    The battery is the supply of type ``Battery`` (ignoring peripherals' batteries and empty slots); of
    several, the first in natural order that reports a capacity. The external supply is of type
    ``Mains``, then the USB types (:data:`EXTERNAL_TYPES`), preferring one that is online.

    Args:
        fs: The sysfs root.

    Returns:
        The :class:`PowerState`; its members are ``None`` when the board shows no such supply.
    """
    supplies = read_supplies(fs)
    return PowerState(battery=_pick_battery(supplies), external=_pick_external(supplies))
