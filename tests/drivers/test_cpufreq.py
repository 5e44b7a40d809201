"""Tests of the cpufreq reader and cap writer (drivers.cpufreq) on fake trees modelled on real boards."""

from __future__ import annotations

import errno
import logging
import os
import threading

import pytest

from drivers.cpufreq import PERMISSION_REMEDY, CpuFreq, CpufreqPolicy
from drivers.errors import SysfsError
from drivers.sysfs import Sysfs
from tests.drivers.sysfs_tree import CPUFREQ, orin_nano, pi4, pi5, policy, write

PI4_TABLE = tuple(range(600000, 1500001, 100000))


def _cpufreq(root, **kw):
    return CpuFreq(Sysfs(str(root)), **kw)


def _cap(root, name="policy0"):
    return int((root / CPUFREQ / name / "scaling_max_freq").read_text())


def _refuse_writes(mocker, only=""):
    """Injects EACCES at os.open for scaling_max_freq nodes (root could write despite chmod)."""
    real_open = os.open

    def fake(path, flags, *args, **kwargs):
        if str(path).endswith(f"{only}/scaling_max_freq") and flags & os.O_WRONLY:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    mocker.patch("os.open", side_effect=fake)


# ----------------------------------------------------------------------------- reading policies


def test_pi4_policy(tmp_path):
    (p,) = _cpufreq(pi4(tmp_path)).policies()
    assert p == CpufreqPolicy("policy0", (0, 1, 2, 3), PI4_TABLE, 600000, 1500000,
                              scaling_max_khz=1500000, cur_khz=600000, governor="ondemand", discrete=True)


def test_orin_nano_policies_have_the_range_only(tmp_path):
    policies = _cpufreq(orin_nano(tmp_path)).policies()
    assert [(p.name, p.cpus) for p in policies] == [("policy0", (0, 1, 2, 3)), ("policy4", (4, 5))]
    for p in policies:
        assert p.frequencies_khz == (115200, 1510400)
        assert not p.discrete and p.governor == "schedutil"


def test_no_cpufreq(tmp_path):
    cf = _cpufreq(tmp_path)
    assert cf.policies() == ()
    assert cf.set_max_khz(1000000) == {}
    assert cf.permission_problem is None


def test_policies_are_reread_each_call(tmp_path):
    pi4(tmp_path)
    cf = _cpufreq(tmp_path)
    assert cf.policies()[0].cur_khz == 600000
    write(tmp_path, {f"{CPUFREQ}/policy0/scaling_cur_freq": 1500000})
    assert cf.policies()[0].cur_khz == 1500000


def test_related_cpus_when_affected_is_missing_and_name_as_last_resort(tmp_path):
    write(tmp_path, {**policy(0, "0-3", 600000, 1500000), **policy(4, "4 5", 600000, 1800000),
                     **policy(6, "", 600000, 1800000)})
    (tmp_path / CPUFREQ / "policy4" / "affected_cpus").unlink()
    (tmp_path / CPUFREQ / "policy6" / "related_cpus").unlink()
    assert [p.cpus for p in _cpufreq(tmp_path).policies()] == [(0, 1, 2, 3), (4, 5), (6,)]


@pytest.mark.parametrize("min_khz, max_khz", [(None, 1500000), (600000, None), ("slow", 1500000),
                                              (1500000, 600000), (0, 1500000)])
def test_policy_without_usable_hardware_range_is_skipped(tmp_path, min_khz, max_khz):
    nodes = {**policy(0, "0", 600000, 1500000), **policy(1, "1", 600000, 1500000)}
    for key, value in (("cpuinfo_min_freq", min_khz), ("cpuinfo_max_freq", max_khz)):
        nodes[f"{CPUFREQ}/policy0/{key}"] = value
    write(tmp_path, nodes)
    for key, value in (("cpuinfo_min_freq", min_khz), ("cpuinfo_max_freq", max_khz)):
        if value is None:
            (tmp_path / CPUFREQ / "policy0" / key).unlink()
    assert [p.name for p in _cpufreq(tmp_path).policies()] == ["policy1"]


@pytest.mark.parametrize("table", ["600000 fast 1500000", "", "-600000"])
def test_garbled_frequency_table_means_the_range(tmp_path, table):
    write(tmp_path, {**policy(0, "0", 600000, 1500000),
                     f"{CPUFREQ}/policy0/scaling_available_frequencies": table})
    (p,) = _cpufreq(tmp_path).policies()
    assert p.frequencies_khz == (600000, 1500000) and not p.discrete


def test_unsorted_table_is_sorted(tmp_path):
    write(tmp_path, {**policy(0, "0", 600000, 1500000),
                     f"{CPUFREQ}/policy0/scaling_available_frequencies": "1500000 600000 1000000 600000"})
    assert _cpufreq(tmp_path).policies()[0].frequencies_khz == (600000, 1000000, 1500000)


def test_optional_nodes_missing_or_garbage_are_unknown(tmp_path):
    write(tmp_path, {**policy(0, "0", 600000, 1500000), f"{CPUFREQ}/policy0/scaling_cur_freq": "<unknown>"})
    for name in ("scaling_max_freq", "scaling_governor"):
        (tmp_path / CPUFREQ / "policy0" / name).unlink()
    (p,) = _cpufreq(tmp_path).policies()
    assert (p.scaling_max_khz, p.cur_khz, p.governor) == (None, None, None)


def test_single_frequency_policy(tmp_path):
    write(tmp_path, policy(0, "0", 1000000, 1000000))
    cf = _cpufreq(tmp_path)
    (p,) = cf.policies()
    assert p.frequencies_khz == (1000000,)
    assert cf.snap(p, 1) == 1000000 and cf.snap(p, 5000000) == 1000000


# ----------------------------------------------------------------------------- snapping


@pytest.mark.parametrize("khz, expected", [
    (2000000, 2000000), (1999999, 1900000), (2400000, 2400000), (10 ** 9, 2400000),
    (1500000, 1500000), (1499999, 1500000), (0, 1500000), (-5, 1500000), (1750000.9, 1700000),
])
def test_snap_pi5_table(tmp_path, khz, expected):
    cf = _cpufreq(pi5(tmp_path))
    assert cf.snap(cf.policies()[0], khz) == expected


@pytest.mark.parametrize("khz, expected", [
    (800000, 800000), (800000.7, 800000), (10, 115200), (2000000, 1510400), (1510400, 1510400),
])
def test_snap_range_only(tmp_path, khz, expected):
    cf = _cpufreq(orin_nano(tmp_path))
    assert cf.snap(cf.policies()[0], khz) == expected


# ----------------------------------------------------------------------------- capping


def test_set_max_khz_writes_the_snapped_cap(tmp_path):
    cf = _cpufreq(pi4(tmp_path))
    assert cf.set_max_khz(1234567) == {"policy0": 1200000}
    assert (tmp_path / CPUFREQ / "policy0" / "scaling_max_freq").read_text() == "1200000\n"
    assert cf.policies()[0].scaling_max_khz == 1200000
    assert cf.set_max_khz(1500000) == {"policy0": 1500000}
    assert _cap(tmp_path) == 1500000


def test_set_max_khz_skips_a_node_that_already_holds_the_value(tmp_path):
    cf = _cpufreq(pi4(tmp_path))
    node = tmp_path / CPUFREQ / "policy0" / "scaling_max_freq"
    cf.set_max_khz(900000)
    os.utime(node, ns=(1_000_000_000, 1_000_000_000))  # an old mtime: any write would change it
    assert cf.set_max_khz(950000) == {"policy0": 900000}
    assert node.stat().st_mtime_ns == 1_000_000_000
    assert _cap(tmp_path) == 900000


def test_set_max_khz_every_policy(tmp_path):
    cf = _cpufreq(orin_nano(tmp_path))
    assert cf.set_max_khz(1000000) == {"policy0": 1000000, "policy4": 1000000}
    assert (_cap(tmp_path, "policy0"), _cap(tmp_path, "policy4")) == (1000000, 1000000)


def test_set_max_fraction(tmp_path):
    pi4(tmp_path / "pi4")
    orin_nano(tmp_path / "orin")
    assert _cpufreq(tmp_path / "pi4").set_max_fraction(0.5) == {"policy0": 700000}
    assert _cpufreq(tmp_path / "orin").set_max_fraction(0.5) == {"policy0": 755200, "policy4": 755200}
    assert _cpufreq(tmp_path / "pi4").set_max_fraction(1) == {"policy0": 1500000}
    assert _cpufreq(tmp_path / "pi4").set_max_fraction(0.01) == {"policy0": 600000}
    assert _cap(tmp_path / "pi4") == 600000


@pytest.mark.parametrize("fraction", [0, -0.1, 1.01, float("nan"), float("inf"), True, "0.5", None])
def test_set_max_fraction_rejects_bad_values(tmp_path, fraction):
    cf = _cpufreq(pi4(tmp_path))
    with pytest.raises(ValueError) as info:
        cf.set_max_fraction(fraction)
    assert repr(fraction) in str(info.value) and "(0, 1]" in str(info.value)
    assert _cap(tmp_path) == 1500000


@pytest.mark.parametrize("khz", [float("nan"), float("inf"), "1000000", None, False])
def test_set_max_khz_rejects_non_numbers(tmp_path, khz):
    cf = _cpufreq(pi4(tmp_path))
    with pytest.raises(ValueError, match="finite number of kHz") as info:
        cf.set_max_khz(khz)
    assert repr(khz) in str(info.value)


def test_rejected_value_propagates_naming_node_and_value(tmp_path, mocker):
    cf = _cpufreq(pi4(tmp_path))
    mocker.patch("os.write", side_effect=OSError(errno.EINVAL, "Invalid argument"))
    with pytest.raises(SysfsError) as info:
        cf.set_max_khz(1000000)
    assert "policy0/scaling_max_freq" in str(info.value) and "'1000000'" in str(info.value)
    assert cf.permission_problem is None


# ----------------------------------------------------------------------------- permission refused


def test_permission_refused_is_warned_once_and_not_raised(tmp_path, mocker, caplog):
    cf = _cpufreq(orin_nano(tmp_path))
    _refuse_writes(mocker)
    with caplog.at_level(logging.WARNING, logger="drivers.cpufreq"):
        assert cf.set_max_khz(1000000) == {}
        assert cf.set_max_khz(800000) == {}
        assert cf.set_max_fraction(0.5) == {}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert PERMISSION_REMEDY in warnings[0].getMessage()
    assert "policy0/scaling_max_freq" in warnings[0].getMessage()
    assert cf.permission_problem == PERMISSION_REMEDY
    assert "install the fieldnode systemd units" in PERMISSION_REMEDY and "run as root" in PERMISSION_REMEDY
    assert _cap(tmp_path, "policy0") == 1510400  # untouched


def test_each_instance_warns_once(tmp_path, mocker, caplog):
    orin_nano(tmp_path)
    _refuse_writes(mocker)
    with caplog.at_level(logging.WARNING, logger="drivers.cpufreq"):
        _cpufreq(tmp_path).set_max_khz(1000000)
        _cpufreq(tmp_path).set_max_khz(1000000)
    assert len([r for r in caplog.records if PERMISSION_REMEDY in r.getMessage()]) == 2


def test_one_refused_policy_does_not_stop_the_others(tmp_path, mocker):
    cf = _cpufreq(orin_nano(tmp_path))
    _refuse_writes(mocker, only="policy0")
    assert cf.set_max_khz(1000000) == {"policy4": 1000000}
    assert (_cap(tmp_path, "policy0"), _cap(tmp_path, "policy4")) == (1510400, 1000000)
    assert cf.permission_problem == PERMISSION_REMEDY


def test_warning_goes_to_the_injected_logger(tmp_path, mocker, caplog):
    cf = _cpufreq(pi4(tmp_path), log=logging.getLogger("fieldnode.test.cpufreq"))
    _refuse_writes(mocker)
    with caplog.at_level(logging.WARNING):
        cf.set_max_khz(1000000)
    assert [r.name for r in caplog.records if r.levelno == logging.WARNING] == ["fieldnode.test.cpufreq"]


def test_concurrent_refusals_warn_once(tmp_path, mocker, caplog):
    cf = _cpufreq(orin_nano(tmp_path))
    _refuse_writes(mocker)
    start = threading.Barrier(6)
    results = []

    def cap():
        start.wait(timeout=30)
        results.append(cf.set_max_khz(900000))

    with caplog.at_level(logging.WARNING, logger="drivers.cpufreq"):
        threads = [threading.Thread(target=cap) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert results == [{}] * 6
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


# ----------------------------------------------------------------------------- kernel governor


def test_set_governor_switches_the_virtual_board(tmp_path):
    from drivers.sim.board import VirtualBoard

    board = VirtualBoard(str(tmp_path), "rpi4", ambient_c=20.0)
    cf = CpuFreq(board.fs)
    assert "schedutil" in cf.policies()[0].available_governors
    assert cf.set_governor("schedutil") == {"policy0": "schedutil"}
    st = board.advance(5)
    assert st.governor == "schedutil" and st.freq_khz == 600000  # idle under schedutil: the minimum
    assert cf.policies()[0].governor == "schedutil"


def test_set_governor_already_running_writes_nothing(tmp_path, mocker):
    pi4(tmp_path)
    write_text = mocker.patch.object(Sysfs, "write_text")
    assert _cpufreq(tmp_path).set_governor("ondemand") == {"policy0": "ondemand"}
    write_text.assert_not_called()


@pytest.mark.parametrize("name, message", [
    ("turbo", "policy0 has no cpufreq governor 'turbo'; available: ondemand, performance"),
    ("Perf ormance", "cpufreq governor must be a lower-case name"),
    (None, "cpufreq governor must be a lower-case name"),
])
def test_set_governor_refuses_what_the_policy_does_not_offer(tmp_path, name, message):
    write(tmp_path, {**policy(0, "0", 600000, 1500000),
                     f"{CPUFREQ}/policy0/scaling_available_governors": "ondemand performance"})
    with pytest.raises(ValueError, match=message):
        _cpufreq(tmp_path).set_governor(name)
    assert (tmp_path / CPUFREQ / "policy0" / "scaling_governor").read_text() == "ondemand\n"


def test_set_governor_permission_refused_is_warned_once_and_not_raised(tmp_path, mocker, caplog):
    write(tmp_path, {**policy(0, "0", 600000, 1500000), **policy(1, "1", 600000, 1500000)})
    real_open = os.open

    def fake(path, flags, *args, **kwargs):
        if str(path).endswith("policy0/scaling_governor") and flags & os.O_WRONLY:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    mocker.patch("os.open", side_effect=fake)
    cf = _cpufreq(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert cf.set_governor("powersave") == {"policy1": "powersave"}
        cf.set_governor("powersave")
    assert cf.permission_problem == PERMISSION_REMEDY
    assert sum("cannot" in r.getMessage() for r in caplog.records) == 1
