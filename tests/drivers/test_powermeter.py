"""Tests of the power draw readers (drivers.powermeter) on fake hwmon and power_supply trees."""

from __future__ import annotations

import builtins
import errno

import pytest

from drivers.power_supply import PowerState, Supply, read_power
from drivers.powermeter import (
    HwmonMeter, PowerReading, battery_reading, choose_reading, discover_meters, find_meter, read_meter,
)
from drivers.sysfs import Sysfs
from tests.drivers.sysfs_tree import SUPPLY, laptop, ups_hat, write

HWMON = "sys/class/hwmon"


def hwmon(n: int, name: str | None, **nodes: object) -> dict[str, object]:
    """A hwmon directory ``hwmon<n>`` with a ``name`` node (none when ``name`` is None) and ``nodes``."""
    base = f"{HWMON}/hwmon{n}"
    tree: dict[str, object] = {f"{base}/{k}": v for k, v in nodes.items()}
    if name is not None:
        tree[f"{base}/name"] = name
    return tree


def ina260(n: int = 0, microwatts: object = 4520000) -> dict[str, object]:
    """An INA260 (shunt built in): power, current and bus voltage, as the ina2xx driver shows them."""
    return hwmon(n, "ina260", power1_input=microwatts, curr1_input=890, in1_input=5080, in0_input=0)


def ina3221(n: int = 0, labels: tuple = ("VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"),
            rails: tuple = ((5080, 1200), (5072, 420), (5072, 310))) -> dict[str, object]:
    """An INA3221 as on a Jetson Orin Nano: three channels of bus mV and mA, labelled."""
    nodes: dict[str, object] = {}
    for ch, (mv, ma) in enumerate(rails, start=1):
        nodes[f"in{ch}_input"] = mv
        nodes[f"curr{ch}_input"] = ma
        nodes[f"in{ch + 3}_input"] = 12  # shunt voltage: never read as a rail
        nodes[f"in{ch}_enable"] = 1
    for ch, label in enumerate(labels, start=1):
        if label is not None:
            nodes[f"in{ch}_label"] = label
    return hwmon(n, "ina3221", curr4_input=1930, **nodes)


def _fs(tmp_path, *trees) -> Sysfs:
    nodes: dict[str, object] = {}
    for tree in trees:
        nodes.update(tree)
    write(tmp_path, nodes)
    return Sysfs(str(tmp_path))


def _read(tmp_path, *trees, prefer=None) -> PowerReading | None:
    fs = _fs(tmp_path, *trees)
    meter = find_meter(fs, prefer)
    return None if meter is None else read_meter(fs, meter)


# ----------------------------------------------------------------------------- single-channel monitors


def test_ina260_power_input(tmp_path):
    fs = _fs(tmp_path, ina260())
    meter = find_meter(fs)
    assert meter == HwmonMeter("hwmon0", "ina260")
    assert read_meter(fs, meter) == PowerReading(pytest.approx(4.52), "hwmon0:ina260")


@pytest.mark.parametrize("chip", ["ina219", "ina226", "ina230", "ina231", "ina238", "ina2xx"])
def test_known_chips_with_power_input(tmp_path, chip):
    assert _read(tmp_path, hwmon(3, chip, power1_input=2700000)) == PowerReading(2.7, f"hwmon3:{chip}")


def test_ina219_without_power_input_uses_current_times_bus_voltage(tmp_path):
    reading = _read(tmp_path, hwmon(1, "ina219", curr1_input=900, in1_input=5080, in0_input=9))
    assert reading == PowerReading(pytest.approx(0.9 * 5.08), "hwmon1:ina219")


def test_reversed_shunt_gives_the_magnitude(tmp_path):
    reading = _read(tmp_path, hwmon(0, "ina219", curr1_input=-900, in1_input=5000))
    assert reading.watts == pytest.approx(4.5)


@pytest.mark.parametrize("power", ["abc", "", -4520000, 0, 2**40])
def test_garbage_power_input_falls_back_to_current_times_voltage(tmp_path, power):
    reading = _read(tmp_path, hwmon(0, "ina226", power1_input=power, curr1_input=800, in1_input=5000))
    assert reading == PowerReading(pytest.approx(4.0), "hwmon0:ina226")


@pytest.mark.parametrize("nodes", [
    {"power1_input": "abc"},
    {"power1_input": ""},
    {"power1_input": -4520000},
    {"power1_input": 0},  # not in the supply path of a board that runs us
    {"power1_input": 49999},  # nor is 50 mW
    {"power1_input": 2147483647000},  # 2 MW: a garbled register
    {"curr1_input": 900},  # no bus voltage
    {"curr1_input": 900, "in1_input": -5000},
    {"curr1_input": "x", "in1_input": 5000},
    {"curr1_input": 0, "in1_input": 5000},
    {"in1_input": 5000},
])
def test_unusable_readings_are_unknown(tmp_path, nodes):
    assert _read(tmp_path, hwmon(0, "ina219", **nodes)) is None


def test_io_error_on_the_power_node_is_unknown(tmp_path, mocker):
    fs = _fs(tmp_path, hwmon(0, "ina226", power1_input=3000000))
    meter = find_meter(fs)
    real_open = builtins.open

    def flaky(path, *args, **kwargs):
        if str(path).endswith("hwmon0/power1_input"):
            raise OSError(errno.EIO, "Input/output error")  # the I2C bus glitched
        return real_open(path, *args, **kwargs)

    mocker.patch("builtins.open", side_effect=flaky)
    assert read_meter(fs, meter) is None


# ----------------------------------------------------------------------------- the INA3221


def test_ina3221_reads_the_vdd_in_channel(tmp_path):
    fs = _fs(tmp_path, ina3221())
    meter = find_meter(fs)
    assert meter == HwmonMeter("hwmon0", "ina3221", (1,), "VDD_IN")
    assert read_meter(fs, meter) == PowerReading(pytest.approx(5.08 * 1.2), "hwmon0:ina3221:VDD_IN")


def test_ina3221_without_labels_sums_its_channels(tmp_path):
    reading = _read(tmp_path, ina3221(labels=()))
    assert reading == PowerReading(pytest.approx(5.08 * 1.2 + 5.072 * 0.42 + 5.072 * 0.31), "hwmon0:ina3221:sum")


def test_ina3221_configured_label_wins_over_vdd_in(tmp_path):
    reading = _read(tmp_path, ina3221(), prefer="vdd_soc")
    assert reading == PowerReading(pytest.approx(5.072 * 0.31), "hwmon0:ina3221:VDD_SOC")


def test_ina3221_disabled_and_unconnected_channels_stay_out_of_the_sum(tmp_path):
    tree = ina3221(labels=("", "VDD_CPU", None))
    tree[f"{HWMON}/hwmon0/in2_enable"] = 0
    tree[f"{HWMON}/hwmon0/curr3_input"] = ""  # no shunt on channel 3
    fs = _fs(tmp_path, tree)
    meter = find_meter(fs)
    assert meter.channels == (1,) and meter.label is None
    assert read_meter(fs, meter) == PowerReading(pytest.approx(5.08 * 1.2), "hwmon0:ina3221:sum")


def test_ina3221_unreadable_vdd_in_is_unknown_not_a_sum(tmp_path):
    fs = _fs(tmp_path, ina3221())
    meter = find_meter(fs)
    write(tmp_path, {f"{HWMON}/hwmon0/curr1_input": "garbage"})
    assert read_meter(fs, meter) is None


def test_ina3221_channel_failing_after_discovery_voids_the_sum(tmp_path):
    fs = _fs(tmp_path, ina3221(labels=()))
    meter = find_meter(fs)
    write(tmp_path, {f"{HWMON}/hwmon0/in2_input": ""})
    assert read_meter(fs, meter) is None  # a partial sum would understate the draw


def test_ina3221_with_no_usable_channel_is_unknown(tmp_path):
    fs = _fs(tmp_path, hwmon(0, "ina3221", in1_input="", curr1_input=""))
    meter = find_meter(fs)
    assert meter == HwmonMeter("hwmon0", "ina3221") and read_meter(fs, meter) is None


# ----------------------------------------------------------------------------- discovery


def test_no_hwmon_class(tmp_path):
    assert find_meter(Sysfs(str(tmp_path))) is None and discover_meters(Sysfs(str(tmp_path))) == ()


def test_other_hwmon_chips_are_not_power_monitors(tmp_path):
    fs = _fs(tmp_path, hwmon(0, "cpu_thermal", temp1_input=48000), hwmon(1, "nvme", power1_input=3000000),
             hwmon(2, None, power1_input=1000000), hwmon(3, "", power1_input=1000000),
             {f"{HWMON}/hwmon_extra/name": "ina260"})
    assert find_meter(fs) is None


def test_natural_order_among_equals(tmp_path):
    fs = _fs(tmp_path, ina260(10), hwmon(2, "ina219", power1_input=1000000))
    assert [m.hwmon for m in discover_meters(fs)] == ["hwmon2", "hwmon10"]


def test_a_vdd_in_channel_beats_order(tmp_path):
    fs = _fs(tmp_path, ina3221(0, labels=("VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0")), ina3221(1))
    assert [m.source for m in discover_meters(fs)] == ["hwmon1:ina3221:VDD_IN", "hwmon0:ina3221:sum"]


@pytest.mark.parametrize("prefer, expected", [
    ("ina260", "hwmon10:ina260"),
    ("hwmon10", "hwmon10:ina260"),
    ("ina219", "hwmon2:ina219"),
    ("nothing-like-it", "hwmon2:ina219"),  # an unmatched choice falls back to the best found
    (None, "hwmon2:ina219"),
])
def test_configured_meter_comes_first(tmp_path, prefer, expected):
    fs = _fs(tmp_path, ina260(10), hwmon(2, "ina219", power1_input=1000000))
    assert find_meter(fs, prefer).source == expected


def test_configured_unknown_chip_is_used_when_it_shows_power_nodes(tmp_path):
    fs = _fs(tmp_path, hwmon(0, "pac1934", power1_input=3300000), hwmon(1, "tmp102", temp1_input=30000))
    assert find_meter(fs) is None
    assert read_meter(fs, find_meter(fs, "pac1934")) == PowerReading(3.3, "hwmon0:pac1934")
    assert find_meter(fs, "tmp102") is None  # named, but it measures no power


def test_present_notices_a_monitor_gone_or_renumbered(tmp_path):
    fs = _fs(tmp_path, ina260())
    meter = find_meter(fs)
    assert meter.present(fs)
    write(tmp_path, {f"{HWMON}/hwmon0/name": "ina219"})  # rebound: the number went to another chip
    assert not meter.present(fs)
    (tmp_path / HWMON / "hwmon0" / "name").unlink()
    assert not meter.present(fs)


# ----------------------------------------------------------------------------- the battery's gauge


def _state(tmp_path, nodes) -> PowerState:
    write(tmp_path, nodes)
    return read_power(Sysfs(str(tmp_path)))


def _battery(**nodes) -> dict[str, object]:
    return {f"{SUPPLY}/battery/{k}": v for k, v in {"type": "Battery", **nodes}.items()}


def test_discharging_battery_power_now(tmp_path):
    state = _state(tmp_path, _battery(status="Discharging", power_now=3900000, current_now=-1000000,
                                      voltage_now=3800000))
    assert battery_reading(state) == (PowerReading(3.9, "battery:power_now"), None)


def test_discharging_battery_current_times_voltage(tmp_path):
    state = read_power(Sysfs(str(ups_hat(tmp_path))))
    assert battery_reading(state) == (PowerReading(pytest.approx(3.85 * 0.42), "battery:current_now*voltage_now"),
                                      None)


def test_garbage_power_now_falls_back_to_current_times_voltage(tmp_path):
    state = _state(tmp_path, _battery(status="Discharging", power_now="abc", current_now=500000,
                                      voltage_now=4000000))
    assert battery_reading(state)[0] == PowerReading(2.0, "battery:current_now*voltage_now")


@pytest.mark.parametrize("nodes, why", [
    ({"status": "Charging", "power_now": 5000000}, "charge current"),
    ({"status": "Full", "power_now": 5000000}, "charge current"),
    ({"status": "Discharging", "power_now": 0}, "outside 0.05..1000 W"),
    ({"status": "Discharging", "power_now": -1}, "outside 0.05..1000 W"),  # 1 µW: noise, not a board
    ({"status": "Discharging", "power_now": ""}, "neither"),
    ({"status": "Discharging", "power_now": "abc", "current_now": "abc", "voltage_now": 4000000}, "neither"),
    ({"status": "Unknown", "power_now": 5000000}, "does not say"),
    ({"power_now": 5000000}, "status missing"),
    ({"status": "Not charging", "power_now": 5000000}, "does not say"),
])
def test_battery_readings_that_do_not_measure_the_board(tmp_path, nodes, why):
    reading, reason = battery_reading(_state(tmp_path, _battery(**nodes)))
    assert reading is None and why in reason


def test_laptop_on_ac_is_excluded_and_off_ac_counts(tmp_path):
    reading, reason = battery_reading(read_power(Sysfs(str(laptop(tmp_path)))))
    assert reading is None and "BAT0" in reason and "Charging" in reason
    state = read_power(Sysfs(str(laptop(tmp_path / "off", ac_online=0, status="Discharging"))))
    assert battery_reading(state) == (PowerReading(15.6, "battery:power_now"), None)


def test_discharging_status_but_mains_online_is_excluded(tmp_path):
    state = _state(tmp_path, {**_battery(status="Discharging", power_now=4000000),
                              f"{SUPPLY}/AC/type": "Mains", f"{SUPPLY}/AC/online": 1})
    assert battery_reading(state)[0] is None


def test_no_battery(tmp_path):
    assert battery_reading(PowerState()) == (None, "no battery")


# ----------------------------------------------------------------------------- choosing


DISCHARGING = PowerState(Supply("battery", "Battery", status="Discharging", power_w=3.0, power_basis="power_now"))
CHARGING = PowerState(Supply("battery", "Battery", status="Charging", power_w=3.0, power_basis="power_now"))
HWMON_READING = PowerReading(4.5, "hwmon0:ina260")


@pytest.mark.parametrize("meter, state, expected", [
    (HWMON_READING, DISCHARGING, HWMON_READING),  # the monitor measures the board's input directly
    (HWMON_READING, CHARGING, HWMON_READING),
    (HWMON_READING, PowerState(), HWMON_READING),
    (None, DISCHARGING, PowerReading(3.0, "battery:power_now")),
    (None, PowerState(Supply("b", "Battery", status="Discharging", power_w=2.0, power_basis="current_now*voltage_now")),
     PowerReading(2.0, "battery:current_now*voltage_now")),
])
def test_choice_order(meter, state, expected):
    assert choose_reading(meter, state) == (expected, None)


@pytest.mark.parametrize("state, why", [
    (CHARGING, "charge current"),
    (PowerState(), "no battery"),
])
def test_nothing_to_learn_from(state, why):
    reading, reason = choose_reading(None, state)
    assert reading is None and reason.startswith("no power monitor reading; ") and why in reason


def test_a_whole_board_monitor_and_a_charging_ups(tmp_path):
    ups_hat(tmp_path, status="Charging")
    fs = _fs(tmp_path, ina260())
    meter = read_meter(fs, find_meter(fs))
    assert choose_reading(meter, read_power(fs)) == (PowerReading(4.52, "hwmon0:ina260"), None)
