"""Writes fake sysfs nodes into a directory, modelled on real boards, for the sysfs reader tests."""

from __future__ import annotations

import pathlib
from typing import Mapping

THERMAL = "sys/class/thermal"
SUPPLY = "sys/class/power_supply"
CPUFREQ = "sys/devices/system/cpu/cpufreq"


def write(root: pathlib.Path, nodes: Mapping[str, object]) -> pathlib.Path:
    """Writes ``{relative path: value}`` as files holding ``value`` plus a newline, like sysfs shows them."""
    for rel, value in nodes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")
    return root


def zone(n: int, type_: str, millideg: object, trips: tuple = ()) -> dict[str, object]:
    """A thermal zone; ``trips`` are ``(millideg, type)`` pairs."""
    base = f"{THERMAL}/thermal_zone{n}"
    nodes: dict[str, object] = {f"{base}/type": type_, f"{base}/temp": millideg}
    for i, (temp, kind) in enumerate(trips):
        nodes[f"{base}/trip_point_{i}_temp"] = temp
        nodes[f"{base}/trip_point_{i}_type"] = kind
        nodes[f"{base}/trip_point_{i}_hyst"] = 2000
    return nodes


def policy(n: int, cpus: str, min_khz: int, max_khz: int, table: tuple[int, ...] | None = None,
           cur: int | None = None, governor: str = "ondemand") -> dict[str, object]:
    """A cpufreq policy, capped at its maximum as after boot."""
    base = f"{CPUFREQ}/policy{n}"
    nodes: dict[str, object] = {
        f"{base}/affected_cpus": cpus,
        f"{base}/related_cpus": cpus,
        f"{base}/cpuinfo_min_freq": min_khz,
        f"{base}/cpuinfo_max_freq": max_khz,
        f"{base}/scaling_min_freq": min_khz,
        f"{base}/scaling_max_freq": max_khz,
        f"{base}/scaling_cur_freq": cur if cur is not None else max_khz,
        f"{base}/scaling_governor": governor,
    }
    if table is not None:
        # the kernel prints the table with a trailing space
        nodes[f"{base}/scaling_available_frequencies"] = " ".join(map(str, table)) + " "
    return nodes


def pi4(root: pathlib.Path) -> pathlib.Path:
    """A Raspberry Pi 4: one SoC zone with a critical trip, one policy for cpus 0-3 at 600-1500 MHz."""
    return write(root, {
        **zone(0, "cpu-thermal", 48686, trips=((110000, "critical"),)),
        **policy(0, "0 1 2 3", 600000, 1500000, table=tuple(range(600000, 1500001, 100000)),
                 cur=600000),
        "sys/devices/platform/soc/soc:firmware/get_throttled": "0",
    })


def pi5(root: pathlib.Path) -> pathlib.Path:
    """A Raspberry Pi 5: 1500-2400 MHz, SoC zone with passive trips and a fan's active trips."""
    return write(root, {
        **zone(0, "cpu-thermal", 55300, trips=((110000, "critical"), (85000, "passive"),
                                             (50000, "active"), (60000, "active"))),
        **policy(0, "0 1 2 3", 1500000, 2400000, table=tuple(range(1500000, 2400001, 100000))),
    })


def orin_nano(root: pathlib.Path) -> pathlib.Path:
    """A Jetson Orin Nano on JetPack 5: nine zones (CV zones of absent accelerators read -256 C), two
    policies with the hardware range only."""
    nodes: dict[str, object] = {}
    zones = [("CPU-therm", 47500), ("GPU-therm", 46000), ("CV0-therm", -256000), ("CV1-therm", -256000),
             ("CV2-therm", -256000), ("SOC0-therm", 45900), ("SOC1-therm", 45300), ("SOC2-therm", 44800),
             ("tj-therm", 47900)]
    for n, (kind, temp) in enumerate(zones):
        nodes.update(zone(n, kind, temp, trips=((99000, "passive"), (104500, "critical"))))
    nodes.update(policy(0, "0 1 2 3", 115200, 1510400, governor="schedutil"))
    nodes.update(policy(4, "4 5", 115200, 1510400, governor="schedutil"))
    return write(root, nodes)


def laptop(root: pathlib.Path, ac_online: int = 1, status: str = "Charging") -> pathlib.Path:
    """A laptop: ``AC`` (Mains) and ``BAT0`` (ACPI battery: positive current whatever the direction)."""
    return write(root, {
        f"{SUPPLY}/AC/type": "Mains",
        f"{SUPPLY}/AC/online": ac_online,
        f"{SUPPLY}/BAT0/type": "Battery",
        f"{SUPPLY}/BAT0/status": status,
        f"{SUPPLY}/BAT0/present": 1,
        f"{SUPPLY}/BAT0/capacity": 87,
        f"{SUPPLY}/BAT0/voltage_now": 12480000,
        f"{SUPPLY}/BAT0/current_now": 1250000,
        f"{SUPPLY}/BAT0/power_now": 15600000,
        f"{SUPPLY}/BAT0/scope": "System",
    })


def ups_hat(root: pathlib.Path, status: str = "Discharging") -> pathlib.Path:
    """A UPS HAT's fuel gauge (bq27441): a lone battery, negative current while discharging, no power_now."""
    return write(root, {
        f"{SUPPLY}/bq27441-0/type": "Battery",
        f"{SUPPLY}/bq27441-0/status": status,
        f"{SUPPLY}/bq27441-0/capacity": 64,
        f"{SUPPLY}/bq27441-0/voltage_now": 3850000,
        f"{SUPPLY}/bq27441-0/current_now": -420000,
    })
