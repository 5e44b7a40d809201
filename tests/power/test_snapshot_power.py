"""The snapshot's measured power and battery energy: where ``power_w`` comes from (a hwmon monitor, else a
discharging battery), the energy left and its basis, and the reader's cached monitor discovery."""

from __future__ import annotations

import logging
import shutil

import pytest

from drivers.sim.clock import SimClock
from drivers.sysfs import Sysfs
from power.snapshot import BoardReader, PowerSnapshot
from tests.drivers.sysfs_tree import SUPPLY, pi4, write

HWMON = "sys/class/hwmon"


def ina260(n: int = 0, microwatts: object = 4520000) -> dict[str, object]:
    base = f"{HWMON}/hwmon{n}"
    return {f"{base}/name": "ina260", f"{base}/power1_input": microwatts, f"{base}/curr1_input": 890,
            f"{base}/in1_input": 5080}


def ina3221() -> dict[str, object]:
    base = f"{HWMON}/hwmon0"
    nodes: dict[str, object] = {f"{base}/name": "ina3221"}
    for ch, (label, mv, ma) in enumerate((("VDD_IN", 5080, 1200), ("VDD_CPU_GPU_CV", 5072, 420),
                                          ("VDD_SOC", 5072, 310)), start=1):
        nodes.update({f"{base}/in{ch}_label": label, f"{base}/in{ch}_input": mv, f"{base}/curr{ch}_input": ma})
    return nodes


def battery(status: str = "Discharging", **nodes: object) -> dict[str, object]:
    base = f"{SUPPLY}/battery"
    return {f"{base}/{k}": v for k, v in {"type": "Battery", "status": status, "capacity": 60,
                                          "voltage_now": 3800000, **nodes}.items()}


def reader(tmp_path, *trees, **kwargs) -> BoardReader:
    pi4(tmp_path)
    for tree in trees:
        write(tmp_path, tree)
    return BoardReader(Sysfs(str(tmp_path)), clock=SimClock(), **kwargs)


def test_hwmon_monitor_measures_the_board(tmp_path):
    snap = reader(tmp_path, ina260(), battery(power_now=3000000)).read()
    assert (snap.power_w, snap.power_source) == (pytest.approx(4.52), "hwmon0:ina260")


def test_hwmon_monitor_counts_while_the_battery_charges(tmp_path):
    snap = reader(tmp_path, ina260(), battery("Charging", power_now=6000000)).read()
    assert (snap.power_w, snap.power_source, snap.charging) == (pytest.approx(4.52), "hwmon0:ina260", True)


def test_jetson_rail_vdd_in(tmp_path):
    snap = reader(tmp_path, ina3221()).read()
    assert (snap.power_w, snap.power_source) == (pytest.approx(5.08 * 1.2), "hwmon0:ina3221:VDD_IN")


def test_configured_rail(tmp_path):
    snap = reader(tmp_path, ina3221(), meter="VDD_SOC").read()
    assert (snap.power_w, snap.power_source) == (pytest.approx(5.072 * 0.31), "hwmon0:ina3221:VDD_SOC")


def test_configured_meter_missing_warns_once_and_uses_the_best_found(tmp_path, caplog):
    r = reader(tmp_path, ina260(), meter="ina226", rediscover_every=1)
    with caplog.at_level(logging.WARNING, logger="power.snapshot"):
        assert r.read().power_source == "hwmon0:ina260"
        assert r.read().power_source == "hwmon0:ina260"
    assert [rec.getMessage() for rec in caplog.records] == ["power monitor 'ina226' not found; using hwmon0:ina260"]


@pytest.mark.parametrize("nodes, source, watts", [
    ({"power_now": 3000000, "current_now": -900000}, "battery:power_now", 3.0),
    ({"current_now": -900000}, "battery:current_now*voltage_now", 3.8 * 0.9),
    ({"power_now": "abc", "current_now": -900000}, "battery:current_now*voltage_now", 3.8 * 0.9),
])
def test_discharging_battery_without_a_monitor(tmp_path, nodes, source, watts):
    snap = reader(tmp_path, battery(**nodes)).read()
    assert (snap.power_w, snap.power_source) == (pytest.approx(watts), source)


@pytest.mark.parametrize("status, ac_online, why", [
    ("Charging", None, "charge current"),
    ("Full", None, "charge current"),
    ("Discharging", 1, "charge current"),  # the supply says mains is plugged in
    ("Unknown", None, "does not say"),
])
def test_battery_that_does_not_measure_the_board_gives_no_power(tmp_path, status, ac_online, why):
    trees = [battery(status, power_now=5000000, energy_now=9000000)]
    if ac_online is not None:
        trees.append({f"{SUPPLY}/AC/type": "Mains", f"{SUPPLY}/AC/online": ac_online})
    r = reader(tmp_path, *trees)
    snap = r.read()
    assert (snap.power_w, snap.power_source) == (None, None)
    assert why in r.power_reason
    assert (snap.energy_left_wh, snap.energy_basis) == (9.0, "energy_now")  # still known while charging


def test_garbage_everywhere_is_unknown_and_never_raises(tmp_path):
    garbage = {**ina260(microwatts="abc"), f"{HWMON}/hwmon0/curr1_input": "", f"{HWMON}/hwmon0/in1_input": "-",
               **battery(power_now=-1, current_now="abc", voltage_now="", capacity="x", charge_now="?",
                         charge_full=0, energy_now="")}
    snap = reader(tmp_path, garbage).read()
    assert (snap.power_w, snap.power_source, snap.energy_left_wh, snap.energy_basis) == (None, None, None, None)


def test_negative_battery_power_is_a_magnitude(tmp_path):
    snap = reader(tmp_path, battery(power_now=-3500000)).read()
    assert (snap.power_w, snap.power_source) == (3.5, "battery:power_now")


def test_bare_board(tmp_path):
    r = reader(tmp_path)
    snap = r.read()
    assert (snap.power_w, snap.power_source, snap.energy_left_wh, snap.energy_basis) == (None, None, None, None)
    assert r.power_reason == "no power monitor reading; no battery" and r.meter is None


@pytest.mark.parametrize("nodes, wh, basis", [
    ({"energy_now": 9120000, "charge_now": 2000000}, 9.12, "energy_now"),
    ({"charge_now": 2000000}, 7.6, "charge_now*voltage_now"),
    ({"energy_full": 20000000}, 12.0, "capacity*energy_full"),
    ({"charge_full": 3000000}, 0.6 * 3.0 * 3.7, "estimate:capacity*charge_full*3.7V"),
    ({"charge_full_design": 3500000}, 0.6 * 3.5 * 3.7, "estimate:capacity*charge_full_design*3.7V"),
    ({}, None, None),
])
def test_energy_left_and_its_basis(tmp_path, nodes, wh, basis):
    snap = reader(tmp_path, battery(**nodes)).read()
    assert snap.energy_left_wh == (None if wh is None else pytest.approx(wh))
    assert snap.energy_basis == basis


def test_to_dict_keeps_the_old_keys_and_adds_the_new(tmp_path):
    d = reader(tmp_path, ina260(microwatts=4523456), battery(energy_now=9123456)).read().to_dict()
    assert list(d) == ["temp_c", "temp_slope_c_per_min", "battery_pct", "charging", "on_external_power", "power_w",
                       "throttle", "temp_source", "power_good", "power_source", "energy_left_wh", "energy_basis",
                       "limit_c"]
    assert (d["power_w"], d["power_source"]) == (4.523, "hwmon0:ina260")
    assert (d["energy_left_wh"], d["energy_basis"]) == (9.123, "energy_now")
    empty = PowerSnapshot(t=0.0).to_dict()
    assert (empty["power_source"], empty["energy_left_wh"], empty["energy_basis"]) == (None, None, None)


# ----------------------------------------------------------------------------- cached discovery


def test_a_monitor_that_appears_is_found_at_the_next_rediscovery(tmp_path):
    r = reader(tmp_path, battery(power_now=3000000), rediscover_every=3)
    assert r.read().power_source == "battery:power_now"
    write(tmp_path, ina260())
    assert [r.read().power_source for _ in range(3)] == ["battery:power_now", "battery:power_now", "hwmon0:ina260"]
    assert r.meter.source == "hwmon0:ina260"


def test_a_better_monitor_waits_for_rediscovery_too(tmp_path):
    r = reader(tmp_path, ina260(5), rediscover_every=2)
    assert r.read().power_source == "hwmon5:ina260"
    write(tmp_path, ina3221())
    assert [r.read().power_source for _ in range(2)] == ["hwmon5:ina260", "hwmon0:ina3221:VDD_IN"]


def test_a_monitor_that_disappears_is_replaced_at_once(tmp_path):
    r = reader(tmp_path, ina260(0), battery(power_now=3000000), rediscover_every=1000)
    assert r.read().power_source == "hwmon0:ina260"
    shutil.rmtree(tmp_path / HWMON / "hwmon0")
    write(tmp_path, ina260(1, microwatts=5000000))  # the driver rebound under a new number
    snap = r.read()
    assert (snap.power_w, snap.power_source) == (5.0, "hwmon1:ina260")


def test_a_monitor_gone_for_good_falls_back_to_the_battery(tmp_path):
    r = reader(tmp_path, ina260(0), battery(power_now=3000000), rediscover_every=1000)
    assert r.read().power_source == "hwmon0:ina260"
    shutil.rmtree(tmp_path / HWMON)
    assert r.read().power_source == "battery:power_now" and r.meter is None


def test_a_bad_reading_keeps_the_monitor_and_skips_one_step(tmp_path):
    r = reader(tmp_path, ina260(0, microwatts=0), battery(power_now=3000000), rediscover_every=1000)
    write(tmp_path, {f"{HWMON}/hwmon0/curr1_input": 0})
    assert r.read().power_source == "battery:power_now"  # 0 W is not the board's draw
    assert r.meter.source == "hwmon0:ina260"
    write(tmp_path, ina260(0, microwatts=4000000))
    assert r.read().power_source == "hwmon0:ina260"
