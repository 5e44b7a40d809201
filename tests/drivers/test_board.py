"""The virtual board: its tree is what the real drivers read, and it reacts to what the agent writes."""

from __future__ import annotations

import pytest

from drivers import power_supply, thermal, throttle
from drivers.cpufreq import CpuFreq
from drivers.sim.board import VirtualBoard
from drivers.sim.clock import SimClock
from drivers.sim.profiles import PROFILES, get_profile
from drivers.sysfs import Sysfs


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_writes_a_tree_the_drivers_read(tmp_path, name):
    board = VirtualBoard(str(tmp_path), name, ambient_c=30.0, battery_mah=3000, soc_pct=80, mains=False)
    fs = Sysfs(str(tmp_path))
    profile = get_profile(name)
    temp, source = thermal.soc_temperature(thermal.read_zones(fs))
    assert source == profile.thermal_zones[0]
    assert temp == pytest.approx(board.temp_c, abs=0.001)
    policies = CpuFreq(fs).policies()
    assert len(policies) == 1
    assert policies[0].frequencies_khz == profile.frequencies_khz
    assert policies[0].cpus == tuple(range(profile.cpus))
    assert policies[0].scaling_max_khz == profile.max_khz
    power = power_supply.read_power(fs)
    assert power.battery_pct == 80 and power.charging is False and power.on_external_power is False
    flags = throttle.read_throttled(fs)
    assert (flags is not None) == profile.firmware_throttle_node
    assert fs.read_text("proc/device-tree/model").rstrip("\0") == profile.model


def test_unknown_profile_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown board profile 'rpi3'; known: jetson-orin-nano, rpi4, rpi5"):
        VirtualBoard(str(tmp_path), "rpi3")


def test_temperature_follows_power_with_a_time_constant(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4", ambient_c=20.0)
    idle = board.advance(1800, dt=5).temp_c
    board.set_demand(threads=4, cost=1.0)
    after_one_tau = board.advance(board.profile.tau_s, dt=5).temp_c
    settled = board.advance(3600, dt=5).temp_c
    p = board.profile
    assert settled == pytest.approx(20.0 + p.r_c_per_w * p.power_w(p.max_khz, 4), abs=0.05)
    # a first-order lag: 63 % of the way after one time constant
    assert (after_one_tau - idle) / (settled - idle) == pytest.approx(0.632, abs=0.02)
    assert idle < 50.0 < settled


def test_the_board_obeys_scaling_max_freq_written_by_the_agent(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4", ambient_c=25.0)
    board.set_demand(threads=4, cost=1.0)
    fast = board.advance(600)
    done_fast = fast.inferences
    assert CpuFreq(board.fs).set_max_khz(800000) == {"policy0": 800000}
    slow = board.advance(600)
    assert slow.freq_khz == 800000 and slow.cap_khz == 800000
    assert slow.power_w < fast.power_w
    assert (slow.inferences - done_fast) == pytest.approx(done_fast * 800 / 1500, rel=0.01)
    assert board.fs.read_int("sys/devices/system/cpu/cpufreq/policy0/scaling_cur_freq") == 800000


def test_firmware_throttles_at_the_soft_limit_and_reports_it(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4", ambient_c=45.0)
    board.set_demand(threads=4, cost=1.0)
    board.advance(1800, dt=5)
    seen = []
    for _ in range(60):  # the agent asked for nothing: the firmware alone holds the board at its limit
        st = board.advance(5)
        flags = throttle.read_throttled(board.fs)
        seen.append((st.temp_c, st.freq_khz, flags.soft_temp_limit))
    p = board.profile
    assert 45.0 + p.r_c_per_w * p.power_w(p.max_khz, 4) > 95  # where it would settle unthrottled
    assert max(t for t, _, _ in seen) < p.soft_limit_c + 1.0
    assert any(f == p.soft_cap_khz and soft for _, f, soft in seen)
    assert flags.soft_temp_limit_occurred and flags.freq_capped_occurred
    board.clear_demand()
    board.set_ambient(20.0)
    board.advance(3600, dt=10)
    flags = throttle.read_throttled(board.fs)
    assert not flags.soft_temp_limit and flags.soft_temp_limit_occurred  # history stays


def test_battery_discharges_by_the_power_drawn_and_dies(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4", ambient_c=20.0, battery_mah=1000, mains=False)
    board.set_demand(threads=4, cost=1.0)
    st = board.advance(600)
    p = board.profile
    used_wh = st.power_w / board.efficiency * 600 / 3600
    assert 100 - st.soc_pct == pytest.approx(100 * used_wh / 3.7, rel=0.05)
    supply = power_supply.read_power(board.fs).battery
    assert supply.status == "Discharging" and supply.current_a < 0 and supply.voltage_v > 3.3
    while board.alive:
        st = board.advance(300, dt=5)
    assert st.soc_pct == 0 and not st.alive
    assert 0.5 < st.t / 3600 < 1.0 / (p.power_w(p.max_khz, 4) / 3.7 / 0.9) + 0.1
    done = st.inferences
    assert board.advance(600).inferences == done  # a dead board does no work


def test_mains_charges_the_battery(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4", battery_mah=5000, soc_pct=20, mains=False)
    board.advance(60)
    low = board.state().soc_pct
    board.plug(True)
    st = board.advance(1800, dt=10)
    assert st.soc_pct > low
    power = power_supply.read_power(board.fs)
    assert power.charging and power.on_external_power and power.battery.status == "Charging"


def test_reported_real_work_raises_power(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4")
    idle = board.advance(10).power_w
    board.record_busy(core_seconds=20.0)  # two cores busy over the next 10 s step
    busy = board.advance(10, dt=10).power_w
    assert busy == pytest.approx(idle + 2 * board.profile.core_w, rel=0.01)


def test_realtime_mode_steps_with_a_real_clock(tmp_path):
    clock = SimClock()
    board = VirtualBoard(str(tmp_path), "rpi4", clock=clock)
    clock.advance(3600)
    board.step()  # one explicit step integrates everything since the last
    assert board.state().t == 3600
    from device.clock import SystemClock

    live = VirtualBoard(str(tmp_path / "live"), "rpi5", clock=SystemClock())
    live.start(period_s=0.01)
    try:
        first = live.state().t
        import threading

        threading.Event().wait(0.1)
        assert live.state().t > first
    finally:
        live.stop()
