"""Tests of the power supply reader (drivers.power_supply) on fake trees modelled on real boards."""

from __future__ import annotations

import builtins
import errno

import pytest

from drivers.power_supply import (
    CURRENT_TIMES_VOLTAGE, NOMINAL_CELL_V, POWER_NOW, PowerState, Supply, read_power, read_supplies, read_supply,
)
from drivers.sysfs import Sysfs
from tests.drivers.sysfs_tree import SUPPLY, laptop, ups_hat, write


def _power(tmp_path, nodes):
    write(tmp_path, nodes)
    return read_power(Sysfs(str(tmp_path)))


def _supply(tmp_path, name, nodes):
    write(tmp_path, {f"{SUPPLY}/{name}/{k}": v for k, v in nodes.items()})
    return read_supply(Sysfs(str(tmp_path)), name)


# ----------------------------------------------------------------------------- boards


def test_laptop_on_ac_charging(tmp_path):
    state = read_power(Sysfs(str(laptop(tmp_path))))
    assert state.battery == Supply("BAT0", "Battery", None, "Charging", 87.0, 12.48, 1.25, 15.6,
                                   scope="System", present=True, power_basis=POWER_NOW)
    assert state.external == Supply("AC", "Mains", online=True)
    assert (state.charging, state.on_external_power, state.battery_pct) == (True, True, 87.0)


def test_laptop_unplugged(tmp_path):
    state = read_power(Sysfs(str(laptop(tmp_path, ac_online=0, status="Discharging"))))
    assert state.external.online is False
    # the ACPI battery reports a positive current while discharging: the raw sign is kept
    assert state.battery.current_a == 1.25
    assert (state.charging, state.on_external_power, state.battery_pct) == (False, False, 87.0)


def test_ups_hat_discharging(tmp_path):
    state = read_power(Sysfs(str(ups_hat(tmp_path))))
    assert state.external is None
    bat = state.battery
    assert (bat.name, bat.type, bat.online, bat.status) == ("bq27441-0", "Battery", None, "Discharging")
    assert bat.voltage_v == pytest.approx(3.85)
    assert bat.current_a == pytest.approx(-0.42)  # this gauge follows the ABI: negative while discharging
    assert bat.power_w == pytest.approx(3.85 * 0.42)  # no power_now: |V*I|
    assert (state.charging, state.on_external_power, state.battery_pct) == (False, False, 64.0)


def test_ups_hat_charging_says_external_power_is_there(tmp_path):
    state = read_power(Sysfs(str(ups_hat(tmp_path, status="Charging"))))
    assert (state.charging, state.on_external_power) == (True, True)


def test_board_without_power_supply_class(tmp_path):
    state = read_power(Sysfs(str(tmp_path)))
    assert state == PowerState(None, None)
    assert (state.charging, state.on_external_power, state.battery_pct) == (None, None, None)
    assert read_supplies(Sysfs(str(tmp_path))) == ()


def test_supplies_in_natural_order(tmp_path):
    write(tmp_path, {f"{SUPPLY}/{n}/type": "Battery" for n in ("BAT10", "BAT2", "AC")})
    assert [s.name for s in read_supplies(Sysfs(str(tmp_path)))] == ["AC", "BAT2", "BAT10"]


# ----------------------------------------------------------------------------- choosing the battery


def test_battery_with_capacity_wins(tmp_path):
    state = _power(tmp_path, {
        f"{SUPPLY}/BAT0/type": "Battery",
        f"{SUPPLY}/BAT1/type": "Battery", f"{SUPPLY}/BAT1/capacity": 40,
        f"{SUPPLY}/BAT2/type": "Battery", f"{SUPPLY}/BAT2/capacity": 90,
    })
    assert state.battery.name == "BAT1"


def test_first_battery_when_none_has_capacity(tmp_path):
    state = _power(tmp_path, {f"{SUPPLY}/BAT1/type": "Battery", f"{SUPPLY}/BAT0/type": "Battery"})
    assert state.battery.name == "BAT0" and state.battery_pct is None


def test_peripheral_battery_and_empty_slot_are_ignored(tmp_path):
    state = _power(tmp_path, {
        f"{SUPPLY}/BAT0/type": "Battery", f"{SUPPLY}/BAT0/present": 0, f"{SUPPLY}/BAT0/capacity": 0,
        f"{SUPPLY}/BAT1/type": "Battery", f"{SUPPLY}/BAT1/scope": "System",
        f"{SUPPLY}/hidpp_battery_0/type": "Battery", f"{SUPPLY}/hidpp_battery_0/scope": "Device",
        f"{SUPPLY}/hidpp_battery_0/capacity": 55,
    })
    assert state.battery.name == "BAT1"


def test_only_a_peripheral_battery_means_no_battery(tmp_path):
    state = _power(tmp_path, {
        f"{SUPPLY}/hidpp_battery_0/type": "Battery", f"{SUPPLY}/hidpp_battery_0/scope": "Device",
        f"{SUPPLY}/hidpp_battery_0/capacity": 55, f"{SUPPLY}/hidpp_battery_0/status": "Discharging",
    })
    assert state.battery is None and state.battery_pct is None and state.charging is None


# ----------------------------------------------------------------------------- choosing the external supply


def _ext(name, type_, online):
    nodes = {f"{SUPPLY}/{name}/type": type_}
    if online is not None:
        nodes[f"{SUPPLY}/{name}/online"] = online
    return nodes


@pytest.mark.parametrize("supplies, expected", [
    ([("AC", "Mains", 0), ("ucsi-source-psy-1", "USB", 1)], "ucsi-source-psy-1"),  # online beats type
    ([("AC", "Mains", 1), ("usb", "USB", 1)], "AC"),  # both online: Mains first
    ([("AC", "Mains", 0), ("usb", "USB", 0)], "AC"),  # both offline: Mains first
    ([("usb", "USB", 0), ("pd", "USB_PD", 0)], "usb"),  # USB before USB_PD
    ([("pd", "USB_PD", 0), ("usb", "USB", None)], "usb"),  # unknown beats known offline
    ([("AC", "Mains", None), ("usb", "USB", 1)], "usb"),
    ([("usb0", "USB", 1), ("usb1", "USB", 1)], "usb0"),  # natural order breaks ties
    ([("wpc", "Wireless", 1), ("AC", "Mains", 0)], "wpc"),
])
def test_external_supply_choice(tmp_path, supplies, expected):
    nodes = {}
    for name, type_, online in supplies:
        nodes.update(_ext(name, type_, online))
    assert _power(tmp_path, nodes).external.name == expected


def test_unknown_types_are_not_external(tmp_path):
    state = _power(tmp_path, {**_ext("gadget", "Flux", 1), f"{SUPPLY}/notype/online": 1})
    assert state == PowerState(None, None)


def test_usb_pd_online_programmable_counts_as_online(tmp_path):
    state = _power(tmp_path, _ext("tcpm-source-psy", "USB", 2))
    assert state.external.online is True and state.on_external_power is True and state.charging is True


# ----------------------------------------------------------------------------- malformed readings


@pytest.mark.parametrize("node, raw, field", [
    ("capacity", "abc", "capacity_pct"),
    ("capacity", 150, "capacity_pct"),
    ("capacity", -1, "capacity_pct"),
    ("capacity", "", "capacity_pct"),
    ("voltage_now", "3.7V", "voltage_v"),
    ("voltage_now", -3700000, "voltage_v"),
    ("current_now", "lots", "current_a"),
    ("online", "yes", "online"),
    ("online", -1, "online"),
    ("status", "", "status"),
    ("type", "", "type"),
])
def test_garbage_is_unknown(tmp_path, node, raw, field):
    s = _supply(tmp_path, "BAT0", {"type": "Battery", "status": "Charging", "capacity": 50, "online": 1,
                                  "voltage_now": 4000000, "current_now": 500000, node: raw})
    assert getattr(s, field) is None
    others = {"type": "Battery", "status": "Charging", "capacity_pct": 50.0, "online": True,
              "voltage_v": 4.0, "current_a": 0.5}
    others.pop(field)
    assert {k: getattr(s, k) for k in others} == others


def test_every_node_missing(tmp_path):
    (tmp_path / SUPPLY / "mystery").mkdir(parents=True)
    assert read_supply(Sysfs(str(tmp_path)), "mystery") == Supply("mystery", None)


def test_power_now_is_preferred_and_is_a_magnitude(tmp_path):
    s = _supply(tmp_path, "BAT0", {"voltage_now": 12000000, "current_now": -1000000, "power_now": -11500000})
    assert s.power_w == pytest.approx(11.5) and s.power_basis == POWER_NOW
    assert s.current_a == pytest.approx(-1.0)


def test_garbage_power_now_falls_back_to_v_times_i(tmp_path):
    s = _supply(tmp_path, "BAT0", {"voltage_now": 5000000, "current_now": 2000000, "power_now": "?"})
    assert s.power_w == pytest.approx(10.0) and s.power_basis == CURRENT_TIMES_VOLTAGE


def test_power_unknown_without_current(tmp_path):
    s = _supply(tmp_path, "BAT0", {"voltage_now": 5000000, "current_now": "x"})
    assert (s.voltage_v, s.current_a, s.power_w, s.power_basis) == (5.0, None, None, None)


# ----------------------------------------------------------------------------- charge, energy, energy left


def test_charge_and_energy_nodes_in_ah_and_wh(tmp_path):
    s = _supply(tmp_path, "BAT0", {"charge_now": 2100000, "charge_full": 4800000, "charge_full_design": 5000000,
                                   "energy_now": 7770000, "energy_full": 17760000})
    assert (s.charge_now_ah, s.charge_full_ah, s.charge_full_design_ah) == (2.1, 4.8, 5.0)
    assert (s.energy_now_wh, s.energy_full_wh) == (7.77, 17.76)


@pytest.mark.parametrize("node, raw, field", [
    ("charge_now", "abc", "charge_now_ah"),
    ("charge_now", -1, "charge_now_ah"),
    ("charge_now", "", "charge_now_ah"),
    ("charge_full", 0, "charge_full_ah"),  # a gauge that has not learnt its battery yet
    ("charge_full", "x", "charge_full_ah"),
    ("charge_full_design", -5000000, "charge_full_design_ah"),
    ("energy_now", "1.5Wh", "energy_now_wh"),
    ("energy_now", -7000000, "energy_now_wh"),
    ("energy_full", 0, "energy_full_wh"),
])
def test_garbage_charge_and_energy_are_unknown(tmp_path, node, raw, field):
    nodes = {"charge_now": 2000000, "charge_full": 4000000, "charge_full_design": 5000000,
             "energy_now": 7000000, "energy_full": 15000000, node: raw}
    s = _supply(tmp_path, "BAT0", nodes)
    assert getattr(s, field) is None
    expected = {"charge_now_ah": 2.0, "charge_full_ah": 4.0, "charge_full_design_ah": 5.0, "energy_now_wh": 7.0,
                "energy_full_wh": 15.0}
    expected.pop(field)
    assert {k: getattr(s, k) for k in expected} == expected


def test_empty_battery_charge_is_zero_not_unknown(tmp_path):
    s = _supply(tmp_path, "BAT0", {"charge_now": 0, "energy_now": 0})
    assert (s.charge_now_ah, s.energy_now_wh) == (0.0, 0.0)
    assert s.remaining_energy() == (0.0, "energy_now")


@pytest.mark.parametrize("nodes, wh, basis", [
    ({"energy_now": 7770000, "charge_now": 2000000, "voltage_now": 3800000, "capacity": 50}, 7.77, "energy_now"),
    ({"charge_now": 2000000, "voltage_now": 3800000, "capacity": 50, "charge_full": 4000000}, 7.6,
     "charge_now*voltage_now"),
    ({"capacity": 50, "energy_full": 15000000, "charge_full": 4000000}, 7.5, "capacity*energy_full"),
    ({"capacity": 50, "charge_full": 4000000, "charge_full_design": 5000000}, 0.5 * 4.0 * NOMINAL_CELL_V,
     "estimate:capacity*charge_full*3.7V"),
    ({"capacity": 50, "charge_full_design": 5000000}, 0.5 * 5.0 * NOMINAL_CELL_V,
     "estimate:capacity*charge_full_design*3.7V"),
    ({"capacity": 50, "charge_full": 0, "charge_full_design": 5000000}, 0.5 * 5.0 * NOMINAL_CELL_V,
     "estimate:capacity*charge_full_design*3.7V"),
    ({"charge_now": 2000000, "voltage_now": 0, "capacity": 25, "charge_full": 4000000},
     0.25 * 4.0 * NOMINAL_CELL_V, "estimate:capacity*charge_full*3.7V"),  # 0 V is no voltage
    ({"energy_now": "abc", "charge_now": 2000000, "voltage_now": 4000000}, 8.0, "charge_now*voltage_now"),
])
def test_remaining_energy_and_its_basis(tmp_path, nodes, wh, basis):
    energy, got_basis = _supply(tmp_path, "BAT0", {"type": "Battery", **nodes}).remaining_energy()
    assert energy == pytest.approx(wh) and got_basis == basis


@pytest.mark.parametrize("nodes", [
    {},
    {"capacity": 50},  # a percentage and no size
    {"charge_now": 2000000},  # a charge and no voltage
    {"charge_now": 2000000, "voltage_now": "?", "charge_full": 4000000},
    {"capacity": "abc", "charge_full": 4000000},
])
def test_remaining_energy_unknown(tmp_path, nodes):
    assert _supply(tmp_path, "BAT0", {"type": "Battery", **nodes}).remaining_energy() == (None, None)


def test_io_error_on_one_node_is_unknown(tmp_path, mocker):
    laptop(tmp_path)
    real_open = builtins.open

    def flaky(path, *args, **kwargs):
        if str(path).endswith("BAT0/capacity"):
            raise OSError(errno.EIO, "Input/output error")  # a fuel gauge on a noisy I2C bus
        return real_open(path, *args, **kwargs)

    mocker.patch("builtins.open", side_effect=flaky)
    state = read_power(Sysfs(str(tmp_path)))
    assert state.battery.name == "BAT0" and state.battery_pct is None
    assert state.battery.voltage_v == pytest.approx(12.48)


def test_absent_battery_driver_answers_enodev(tmp_path, mocker):
    laptop(tmp_path)
    real_open = builtins.open

    def absent(path, *args, **kwargs):
        if "BAT0/" in str(path) and not str(path).endswith(("/type", "/present", "/scope")):
            raise OSError(errno.ENODEV, "No such device")
        return real_open(path, *args, **kwargs)

    mocker.patch("builtins.open", side_effect=absent)
    state = read_power(Sysfs(str(tmp_path)))
    assert state.battery == Supply("BAT0", "Battery", scope="System", present=True)
    assert state.on_external_power is True


# ----------------------------------------------------------------------------- PowerState logic


def _bat(status):
    return Supply("BAT0", "Battery", status=status, capacity_pct=50.0)


def _mains(online):
    return Supply("AC", "Mains", online=online)


@pytest.mark.parametrize("battery, external, charging, on_external", [
    (_bat("Charging"), None, True, True),
    (_bat("Full"), None, True, True),
    (_bat("Discharging"), None, False, False),
    (_bat("Not charging"), None, False, None),
    (_bat("Unknown"), None, None, None),
    (_bat(None), None, None, None),
    (None, _mains(True), True, True),
    (None, _mains(False), False, False),
    (None, _mains(None), None, None),
    (_bat("Not charging"), _mains(True), True, True),
    # online but giving less than the board draws (a solar panel at dusk, a weak USB supply): the cell drains
    (_bat("Discharging"), _mains(True), False, True),
    (_bat("Full"), _mains(False), True, False),
    (_bat("Charging"), _mains(None), True, True),
    (_bat("Unknown"), _mains(False), False, False),
])
def test_power_state_answers(battery, external, charging, on_external):
    state = PowerState(battery, external)
    assert state.charging is charging
    assert state.on_external_power is on_external
    assert state.battery_pct == (50.0 if battery else None)
