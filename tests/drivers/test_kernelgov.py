"""The kernel cpufreq governor models, alone and on the virtual board through its sysfs tree."""

from __future__ import annotations

import pytest

from drivers.sim.board import CPUFREQ, ONDEMAND_DIR, SCHEDUTIL_DIR, VirtualBoard
from drivers.sim.kernelgov import Ondemand, Schedutil, Table, resolve_tunables

PI4 = Table(tuple(range(600000, 1500001, 100000)))


def run(board: VirtualBoard, seconds: float, dt: float = 1.0) -> list[float]:
    """Advances the board and returns the mean frequency of every step, in MHz."""
    return [board.advance(dt, dt).mean_freq_khz / 1000 for _ in range(int(seconds / dt))]


# ----------------------------------------------------------------------------------- the models alone


def test_table_relations_follow_the_kernel():
    assert PI4.at_most(1049999) == 1000000 and PI4.at_most(1) == 600000  # RELATION_H
    assert PI4.at_least(1000001) == 1100000 and PI4.at_least(9e9) == 1500000  # RELATION_L
    assert PI4.closest(1040000) == 1000000 and PI4.closest(1060000) == 1100000
    assert PI4.closest(1050000) == 1000000  # RELATION_C: a tie goes to the lower entry


def test_ondemand_jumps_to_max_above_up_threshold_and_stays_there_sampling_down_factor_periods():
    od = Ondemand(PI4, resolve_tunables("rpi-os"))
    assert od.period_s() == pytest.approx(0.1)
    assert od.sample(0.51, 600000, 600000, 1500000) == 1500000
    assert od.rate_mult == 50 and od.period_s() == pytest.approx(5.0)
    assert od.sample(0.60, 1500000, 600000, 1500000) == 1500000
    assert od.rate_mult == 50  # already at max: the factor is not re-applied, it stays
    # at or below the threshold: proportional to load over the hardware range, closest table entry
    assert od.sample(0.50, 1500000, 600000, 1500000) == 1000000  # 600 + 50 % of 900 = 1050 -> tie -> 1000
    assert od.rate_mult == 1
    assert od.sample(0.0, 1000000, 600000, 1500000) == 600000


def test_ondemand_load_is_whole_percent_and_strictly_above_the_threshold():
    assert Ondemand(PI4, resolve_tunables(None)).tunables["up_threshold"] == 95
    assert Ondemand(PI4, resolve_tunables(None)).period_s() == pytest.approx(0.010)
    od = Ondemand(PI4, resolve_tunables({"up_threshold": 80}))
    assert od.sample(0.805, 600000, 600000, 1500000) == 1300000  # load 80: 600 + 720 = 1320 -> 1300
    assert od.sample(0.81, 600000, 600000, 1500000) == 1500000


def test_ondemand_respects_the_scaling_limits():
    od = Ondemand(PI4, resolve_tunables(None))
    assert od.sample(1.0, 600000, 600000, 1000000) == 1000000  # "max" is policy->max
    assert od.sample(0.1, 1000000, 800000, 1000000) == 800000  # 690 MHz clamped up to scaling_min_freq


def test_schedutil_asks_for_a_quarter_more_than_the_utilisation():
    su = Schedutil(PI4, resolve_tunables(None))
    for _ in range(100):  # one second at 10 ms: PELT converges
        su.account(0.5, 1.0, 0.010)  # half busy at f_max (a busy CPU: util_est does not apply yet)
    assert su.util == pytest.approx(0.5, abs=0.01)
    assert su.sample(0.5, 1500000, 600000, 1500000) == 1000000  # 1.25 * 0.5 * 1500 = 937.5 -> RELATION_L
    assert su.sample(0.5, 1500000, 600000, 900000) == 900000


def test_pelt_halves_in_32_ms():
    su = Schedutil(PI4, resolve_tunables(None))
    su.util = 0.8
    su.account(0.0, 1.0, 0.032)
    assert su.util == pytest.approx(0.4)


@pytest.mark.parametrize("tunables, message", [
    ("raspbian", "unknown governor tunables preset 'raspbian'; known: rpi-os"),
    ({"up_treshold": 50}, "unknown governor tunable 'up_treshold'"),
    ({"up_threshold": 101}, r"up_threshold must be an integer in \[1, 100\], got 101"),
    ({"sampling_rate": "100000"}, "sampling_rate must be an integer"),
    ({"sampling_down_factor": True}, "sampling_down_factor must be an integer"),
])
def test_bad_tunables_are_refused_naming_the_problem(tunables, message):
    with pytest.raises(ValueError, match=message):
        resolve_tunables(tunables)


def test_an_unknown_governor_is_refused_naming_the_modelled_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown cpufreq governor 'conservative'; modelled: performance, "
                                         "powersave, userspace, ondemand, schedutil"):
        VirtualBoard(str(tmp_path), "rpi4", cpu_governor="conservative")


# ----------------------------------------------------------------------------------- on the board


def test_the_tree_says_which_governor_runs_and_its_tunables(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4", cpu_governor="ondemand", governor_tunables="rpi-os")
    fs = board.fs
    assert fs.read_text(f"{CPUFREQ}/scaling_governor") == "ondemand"
    assert "schedutil" in fs.read_text(f"{CPUFREQ}/scaling_available_governors")
    assert [fs.read_int(f"{ONDEMAND_DIR}/{k}") for k in ("up_threshold", "sampling_rate", "sampling_down_factor")] \
        == [50, 100000, 50]
    assert fs.read_int(f"{SCHEDUTIL_DIR}/rate_limit_us") == 10000
    assert fs.read_text(f"{CPUFREQ}/scaling_setspeed") == "<unsupported>"
    assert VirtualBoard(str(tmp_path / "b"), "rpi4").fs.read_text(f"{CPUFREQ}/scaling_governor") == "performance"


def test_performance_runs_at_the_cap_and_powersave_at_the_minimum(tmp_path):
    fast = VirtualBoard(str(tmp_path / "p"), "rpi4", ambient_c=20.0)
    slow = VirtualBoard(str(tmp_path / "s"), "rpi4", cpu_governor="powersave", ambient_c=20.0)
    for b in (fast, slow):
        b.set_windows(rate_hz=10, threads=4, cost=1.0)
    assert set(run(fast, 60)) == {1500.0}
    assert set(run(slow, 60)) == {600.0}
    assert slow.state().power_w < fast.state().power_w
    assert slow.windows_done == pytest.approx(fast.windows_done, abs=1)  # both keep up with 10 windows/s


def test_ondemand_with_raspberry_pi_os_tunables_sits_at_max_on_a_bursty_load(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4", cpu_governor="ondemand", governor_tunables="rpi-os")
    board.set_windows(rate_hz=1.0, threads=1, cost=1.0)  # 50 ms at f_max once a second: 5 % load on average
    freqs = run(board, 300)
    assert sum(f >= 1500 for f in freqs) / len(freqs) > 0.6  # each burst passes 50 % of a 100 ms sample
    assert sum(freqs) / len(freqs) > 1300
    default = VirtualBoard(str(tmp_path / "default"), "rpi4", cpu_governor="ondemand")
    default.set_windows(rate_hz=1.0, threads=1, cost=1.0)
    assert sum(run(default, 300)) / 300 < 800  # kernel defaults: 10 ms samples, back down after the burst


def test_schedutil_settles_at_a_frequency_proportional_to_the_load(tmp_path):
    means = []
    for cost in (0.8, 1.2, 1.6):  # 10 windows/s on one core: 40, 60, 80 % of a core at f_max
        board = VirtualBoard(str(tmp_path / str(cost)), "rpi4", cpu_governor="schedutil", ambient_c=20.0)
        board.set_windows(rate_hz=10, threads=1, cost=cost)
        run(board, 20)
        freqs = run(board, 60)
        means.append(sum(freqs) / len(freqs))
        assert board.windows_late <= 0.01 * board.windows_arrived
    assert means == sorted(means)
    for mean, util in zip(means, (0.4, 0.6, 0.8)):
        assert 1.25 * util * 1500 - 100 <= mean <= max(1.25 * util * 1500 * 1.25, 1500)


def test_schedutil_idles_at_the_minimum_and_goes_to_max_under_full_load(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4", cpu_governor="schedutil", ambient_c=20.0)
    assert set(run(board, 10)) == {600.0}
    board.set_demand(threads=4, cost=1.0)
    assert run(board, 10)[-1] == 1500.0


def test_the_governor_follows_scaling_governor_written_at_run_time(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4", ambient_c=20.0)
    board.set_windows(rate_hz=1.0, threads=1, cost=1.0)
    run(board, 5)
    board.fs.write_text(f"{ONDEMAND_DIR}/up_threshold", 50)  # raspi-config writes these after the governor
    board.fs.write_text(f"{CPUFREQ}/scaling_governor", "powersave")
    assert run(board, 5)[-1] == 600.0 and board.state().governor == "powersave"
    board.fs.write_text(f"{CPUFREQ}/scaling_governor", "userspace")
    board.advance(1)
    assert board.fs.read_int(f"{CPUFREQ}/scaling_setspeed") == 600000  # userspace starts where it was
    board.fs.write_text(f"{CPUFREQ}/scaling_setspeed", 1234567)
    assert run(board, 3)[-1] == 1300.0  # the lowest table entry at or above the speed set
    board.fs.write_text(f"{CPUFREQ}/scaling_max_freq", 1000000)
    assert run(board, 3)[-1] == 1000.0  # and never above scaling_max_freq
    board.fs.write_text(f"{CPUFREQ}/scaling_governor", "ondemand")
    run(board, 30)
    assert board.tunables["up_threshold"] == 50
    assert board.windows_done == pytest.approx(board.windows_arrived, abs=1)  # the queue survived each switch


def test_a_governor_or_tunable_the_kernel_would_refuse_is_put_back(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4", cpu_governor="ondemand")
    board.fs.write_text(f"{CPUFREQ}/scaling_governor", "turbo")
    board.fs.write_text(f"{ONDEMAND_DIR}/up_threshold", 0)
    board.fs.write_text(f"{ONDEMAND_DIR}/sampling_rate", "fast")
    board.advance(1)
    assert board.fs.read_text(f"{CPUFREQ}/scaling_governor") == "ondemand"
    assert board.fs.read_int(f"{ONDEMAND_DIR}/up_threshold") == 95
    assert board.fs.read_int(f"{ONDEMAND_DIR}/sampling_rate") == 10000
    board.fs.write_text(f"{ONDEMAND_DIR}/sampling_rate", 200000)
    board.advance(1)
    assert board.tunables["sampling_rate"] == 200000


def test_the_firmware_cap_applies_under_a_kernel_governor(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4", cpu_governor="schedutil", ambient_c=45.0)
    board.set_demand(threads=4, cost=1.0)
    freqs = run(board, 1800, dt=5)
    p = board.profile
    assert max(board.advance(5, 5).temp_c for _ in range(60)) < p.soft_limit_c + 1.0
    assert min(freqs[-60:]) <= p.soft_cap_khz / 1000
