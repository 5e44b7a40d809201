"""Tests of the thermal zone reader (drivers.thermal) on fake trees modelled on real boards."""

from __future__ import annotations

import builtins
import dataclasses
import errno

import pytest

from drivers.sysfs import Sysfs
from drivers.thermal import ThermalZone, TripPoint, read_zones, soc_temperature
from tests.drivers.sysfs_tree import THERMAL, orin_nano, pi4, pi5, write, zone


def _zones(tmp_path, nodes):
    write(tmp_path, nodes)
    return read_zones(Sysfs(str(tmp_path)))


# ----------------------------------------------------------------------------- boards


def test_pi4_zone_and_trip(tmp_path):
    zones = read_zones(Sysfs(str(pi4(tmp_path))))
    assert zones == (ThermalZone("thermal_zone0", "cpu-thermal", 48.686, (TripPoint(0, 110.0, "critical"),)),)
    assert soc_temperature(zones) == (48.686, "cpu-thermal")
    assert zones[0].trip_c("critical") == 110.0
    assert zones[0].trip_c("passive") is None


def test_pi5_trips_in_index_order_and_lowest_of_a_kind(tmp_path):
    (z,) = read_zones(Sysfs(str(pi5(tmp_path))))
    assert [t.index for t in z.trips] == [0, 1, 2, 3]
    assert [t.type for t in z.trips] == ["critical", "passive", "active", "active"]
    assert z.trip_c("active") == 50.0
    assert z.trip_c("PASSIVE") == 85.0
    assert soc_temperature([z]) == (55.3, "cpu-thermal")


def test_orin_nano_prefers_cpu_zone_and_drops_absent_accelerators(tmp_path):
    zones = read_zones(Sysfs(str(orin_nano(tmp_path))))
    assert [z.type for z in zones] == ["CPU-therm", "GPU-therm", "CV0-therm", "CV1-therm", "CV2-therm",
                                       "SOC0-therm", "SOC1-therm", "SOC2-therm", "tj-therm"]
    by_type = {z.type: z for z in zones}
    assert by_type["CV0-therm"].temp_c is None  # -256 C: accelerator not fitted
    assert by_type["GPU-therm"].temp_c == 46.0
    # tj-therm is hotter, but the CPU zone is the known SoC zone
    assert soc_temperature(zones) == (47.5, "CPU-therm")
    assert by_type["CPU-therm"].trips == (TripPoint(0, 99.0, "passive"), TripPoint(1, 104.5, "critical"))


def test_no_thermal_class(tmp_path):
    assert read_zones(Sysfs(str(tmp_path))) == ()
    assert soc_temperature(()) == (None, None)


def test_zones_in_natural_order_and_other_entries_ignored(tmp_path):
    zones = _zones(tmp_path, {
        **zone(10, "ten", 10000), **zone(2, "two", 2000), **zone(0, "zero", 0),
        f"{THERMAL}/cooling_device0/type": "Processor",
        f"{THERMAL}/thermal_zone_extra/temp": 5000,
    })
    assert [z.name for z in zones] == ["thermal_zone0", "thermal_zone2", "thermal_zone10"]
    assert [z.temp_c for z in zones] == [0.0, 2.0, 10.0]


# ----------------------------------------------------------------------------- malformed readings


@pytest.mark.parametrize("raw", ["", "garbage", "45.5", "0x10"])
def test_unparseable_temp_is_unknown(tmp_path, raw):
    (z,) = _zones(tmp_path, zone(0, "cpu-thermal", raw))
    assert z.temp_c is None and z.type == "cpu-thermal"
    assert soc_temperature([z]) == (None, None)


@pytest.mark.parametrize("millideg, expected", [
    (200001, None), (-100001, None), (-273150, None), (2147483647, None),
    (200000, 200.0), (-100000, -100.0), (-5500, -5.5),
])
def test_absurd_temp_is_unknown(tmp_path, millideg, expected):
    (z,) = _zones(tmp_path, zone(0, "cpu-thermal", millideg))
    assert z.temp_c == expected


def test_missing_temp_and_type(tmp_path):
    write(tmp_path, {f"{THERMAL}/thermal_zone0/type": "cpu-thermal", f"{THERMAL}/thermal_zone1/temp": 40000})
    zones = read_zones(Sysfs(str(tmp_path)))
    assert zones[0] == ThermalZone("thermal_zone0", "cpu-thermal", None, ())
    assert zones[1] == ThermalZone("thermal_zone1", None, 40.0, ())
    # the untyped zone is the only one with a reading: its directory name says where it came from
    assert soc_temperature(zones) == (40.0, "thermal_zone1")


def test_io_error_on_one_zone_leaves_the_others(tmp_path, mocker):
    write(tmp_path, {**zone(0, "cpu-thermal", 51000), **zone(1, "gpu-thermal", 45000)})
    real_open = builtins.open

    def flaky(path, *args, **kwargs):
        if str(path).endswith("thermal_zone0/temp"):
            raise OSError(errno.EIO, "Input/output error")
        return real_open(path, *args, **kwargs)

    mocker.patch("builtins.open", side_effect=flaky)
    zones = read_zones(Sysfs(str(tmp_path)))
    assert [z.temp_c for z in zones] == [None, 45.0]
    assert soc_temperature(zones) == (45.0, "gpu-thermal")


def test_bad_trip_points_are_dropped_and_missing_type_is_unknown(tmp_path):
    base = f"{THERMAL}/thermal_zone0"
    (z,) = _zones(tmp_path, {
        **zone(0, "cpu-thermal", 50000),
        f"{base}/trip_point_0_temp": 95000,  # no _type node
        f"{base}/trip_point_1_temp": "n/a",
        f"{base}/trip_point_1_type": "passive",
        f"{base}/trip_point_2_temp": -274000,  # how some drivers show a disabled trip
        f"{base}/trip_point_2_type": "active",
        f"{base}/trip_point_3_temp": 105000,
        f"{base}/trip_point_3_type": "critical",
        f"{base}/trip_point_3_hyst": 0,
    })
    assert z.trips == (TripPoint(0, 95.0, "unknown"), TripPoint(3, 105.0, "critical"))


def test_snapshots_are_frozen():
    z = ThermalZone("thermal_zone0", "cpu-thermal", 40.0, ())
    with pytest.raises(dataclasses.FrozenInstanceError):
        z.temp_c = 41.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        TripPoint(0, 1.0, "hot").temp_c = 2.0  # type: ignore[misc]


# ----------------------------------------------------------------------------- choosing the SoC zone


def _z(type_, temp, name="thermal_zone0"):
    return ThermalZone(name, type_, temp, ())


@pytest.mark.parametrize("soc_type", ["cpu-thermal", "CPU-therm", "soc_thermal", "x86_pkg_temp", "soc-thermal"])
def test_each_known_soc_type_beats_hotter_unknown_zones(soc_type):
    zones = [_z("acpitz", 70.0), _z(soc_type, 50.0), _z("iwlwifi_1", 60.0)]
    assert soc_temperature(zones) == (50.0, soc_type)


def test_known_types_in_order_of_preference():
    zones = [_z("soc-thermal", 70.0), _z("x86_pkg_temp", 65.0), _z("CPU-therm", 60.0), _z("cpu-thermal", 55.0)]
    assert soc_temperature(zones) == (55.0, "cpu-thermal")
    assert soc_temperature(zones[:3]) == (60.0, "CPU-therm")
    assert soc_temperature(zones[:2]) == (65.0, "x86_pkg_temp")


def test_known_type_matches_case_insensitively():
    assert soc_temperature([_z("acpitz", 70.0), _z("CPU-Thermal", 50.0)]) == (50.0, "CPU-Thermal")


def test_known_zone_without_reading_falls_through():
    zones = [_z("cpu-thermal", None), _z("x86_pkg_temp", 61.0), _z("acpitz", 80.0)]
    assert soc_temperature(zones) == (61.0, "x86_pkg_temp")


def test_first_zone_of_a_known_type_wins():
    zones = [_z("cpu-thermal", 50.0, "thermal_zone0"), _z("cpu-thermal", 58.0, "thermal_zone1")]
    assert soc_temperature(zones) == (50.0, "cpu-thermal")


def test_hottest_zone_when_no_known_type():
    zones = [_z("acpitz", 41.0), _z("iwlwifi_1", 52.5), _z("pch_cannonlake", 49.0), _z("battery", None)]
    assert soc_temperature(zones) == (52.5, "iwlwifi_1")


def test_pmic_die_fixed_reading_is_not_taken_for_the_soc():
    # a Jetson Nano's PMIC-Die zone reads 100 C whatever happens
    zones = [_z("AO-therm", 38.5), _z("PMIC-Die", 100.0), _z("thermal-fan-est", 39.0)]
    assert soc_temperature(zones) == (39.0, "thermal-fan-est")
    assert soc_temperature([_z("PMIC-Die", 100.0)]) == (None, None)


def test_nothing_known():
    assert soc_temperature([_z("cpu-thermal", None), _z(None, None)]) == (None, None)
