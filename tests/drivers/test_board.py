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
    board = VirtualBoard(str(tmp_path), "rpi4", ambient_c=20.0)  # settles under the soft limit at f_max
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


# ----------------------------------------------------------------------------------- windows


def test_windows_are_done_in_time_when_the_board_keeps_up(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4", ambient_c=20.0)
    board.set_windows(rate_hz=10, threads=4, cost=1.0)
    st = board.advance(600)
    assert st.windows_arrived == pytest.approx(6000)
    assert st.windows_done == pytest.approx(6000) and st.windows_late == 0 and st.windows_skipped == 0
    p = board.profile
    service = p.infer_s_at_max / p.speedup(4)
    assert st.busy_cores == pytest.approx(4 * 10 * service)  # busy cores follow the served work
    assert st.power_w == pytest.approx(p.power_w(p.max_khz, 4 * 10 * service))


def test_late_windows_are_counted_when_the_board_is_too_slow(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4", ambient_c=20.0)
    board.set_windows(rate_hz=10, threads=4, cost=1.0)
    CpuFreq(board.fs).set_max_khz(600000)  # 38 ms per window at 600 MHz: still in time
    board.advance(60)
    assert board.windows_late == 0
    board.set_windows(rate_hz=10, threads=1, cost=1.6)  # 80 ms at f_max, 200 ms at 600 MHz: overloaded
    st = board.advance(600)
    late = st.windows_late
    assert late > 0.95 * (st.windows_arrived - 600)  # FIFO with deadlines collapses under overload
    assert st.busy_cores == pytest.approx(1.0)
    assert st.windows_done + st.windows_late + st.windows_skipped == pytest.approx(st.windows_arrived, abs=2)
    board.fs.write_text("sys/devices/system/cpu/cpufreq/policy0/scaling_max_freq", 1500000)
    board.advance(60)  # fast enough again: the backlog drains and windows are in time again
    before = board.windows_done
    board.advance(60)
    assert board.windows_done - before == pytest.approx(600, abs=1)
    assert board.windows_late - late < 600 * 0.05 + 60


def test_an_interval_skips_windows_that_arrive_too_soon_after_the_last_start(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4")
    board.set_windows(rate_hz=10, threads=4, cost=1.0, interval_s=0.25)  # every third window is taken
    st = board.advance(300)
    assert st.windows_skipped == pytest.approx(2000, rel=0.01)
    assert st.windows_done == pytest.approx(1000, rel=0.01) and st.windows_late == 0


def test_a_window_past_its_deadline_is_late_even_if_served(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4")
    board.set_windows(rate_hz=2, threads=1, cost=1.0, deadline_s=0.02)  # 50 ms service, 20 ms deadline
    st = board.advance(60)
    assert st.windows_done == 0 and st.windows_late == pytest.approx(120)
    assert st.inferences == pytest.approx(120)  # served all the same


@pytest.mark.parametrize("kw, message", [
    (dict(rate_hz=0, threads=1, cost=1.0), "rate_hz must be a finite number > 0, got 0"),
    (dict(rate_hz=10, threads=1, cost=float("nan")), "cost must be a finite number > 0"),
    (dict(rate_hz=10, threads=1, cost=1.0, deadline_s=-1), "deadline_s must be a finite number > 0, got -1"),
])
def test_bad_window_settings_are_refused(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        VirtualBoard(str(tmp_path), "rpi4").set_windows(**kw)


def test_continuous_demand_counts_every_inference_as_a_window_done(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4", ambient_c=20.0)
    board.set_demand(threads=4, cost=1.0, interval_s=0.5)
    st = board.advance(100)
    assert st.inferences == pytest.approx(200) and st.windows_done == pytest.approx(200)
    assert st.windows_arrived == pytest.approx(200) and st.windows_late == 0
    board.set_demand(threads=4, cost=1.0, interval_s=0.5)  # the same demand again changes nothing
    board.clear_demand()
    assert board.advance(100).inferences == pytest.approx(200)


def test_the_fluid_and_the_discrete_queue_agree(tmp_path):
    from drivers.sim.workload import Workload

    for rate, threads, cost, speed in ((10, 1, 1.0, 1.0), (10, 1, 2.5, 0.6), (30, 4, 1.0, 0.4), (10, 1, 1.9, 1.0)):
        fluid, discrete = Workload(get_profile("rpi4")), Workload(get_profile("rpi4"))
        for w in (fluid, discrete):
            w.set_windows(rate, threads, cost, None, 0.0, 0.0)
        for i in range(300):
            fluid.fluid(i, i + 1.0, speed)
            for j in range(10):
                discrete.serve(i + j / 10, i + (j + 1) / 10, speed)
        assert discrete.done == pytest.approx(fluid.done, abs=3)
        assert discrete.late == pytest.approx(fluid.late, abs=3)


# ----------------------------------------------------------------------------------- solar


def test_solar_charges_by_day_and_drains_by_night(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4", battery_mah=10000, soc_pct=80, mains=False, solar_peak_w=10.0,
                         start_hour=0.0)
    board.set_demand(threads=1, cost=1.0, interval_s=1.0)
    fs = board.fs
    night = board.advance(6 * 3600, dt=60)
    assert night.alive and night.soc_pct < 40 and night.solar_w == 0
    assert fs.read_int("sys/class/power_supply/solar/online") == 0
    assert power_supply.read_power(fs).battery.status == "Discharging"
    noon = board.advance(6 * 3600, dt=60)
    assert noon.solar_w == pytest.approx(10.0 * 0.85, rel=0.01) and noon.charging
    assert noon.soc_pct > night.soc_pct
    assert fs.read_text("sys/class/power_supply/solar/type") == "Mains"
    assert fs.read_int("sys/class/power_supply/solar/online") == 1
    battery = power_supply.read_power(fs).battery
    assert battery.status == "Charging" and battery.current_a > 0
    evening = board.advance(6 * 3600, dt=60)
    assert evening.soc_pct > noon.soc_pct  # the afternoon harvest still exceeds the draw
    midnight = board.advance(6 * 3600, dt=60)
    assert midnight.soc_pct < evening.soc_pct and midnight.alive


def test_a_small_panel_cannot_keep_the_board_alive(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4", battery_mah=2000, soc_pct=30, mains=False, solar_peak_w=2.0)
    while board.alive and board.state().t < 3 * 86400:
        board.advance(3600, dt=60)
    assert not board.alive and board.brownout and board.state().soc_pct >= 0
    assert power_supply.read_power(board.fs).battery.status in ("Discharging", "Charging")


@pytest.mark.parametrize("kw, message", [
    (dict(solar_peak_w=-1.0), "solar_peak_w must be a finite number >= 0"),
    (dict(solar_peak_w=10.0, sunrise_h=19.0), "need 0 <= sunrise_h < sunset_h <= 24"),
    (dict(solar_peak_w=10.0, solar_efficiency=1.5), r"solar efficiency must be in \(0, 1\]"),
])
def test_bad_solar_figures_are_refused(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        VirtualBoard(str(tmp_path), "rpi4", battery_mah=2000, mains=False, **kw)


# ----------------------------------------------------------------------------------- meters and gauges


@pytest.mark.parametrize("meter", ["ina219", "ina260"])
def test_the_hwmon_meter_carries_the_board_power(tmp_path, meter):
    board = VirtualBoard(str(tmp_path), "rpi4", meter=meter, ambient_c=20.0)
    board.set_demand(threads=4, cost=1.0)
    st = board.advance(10)
    hw = "sys/class/hwmon/hwmon0"
    fs = board.fs
    assert fs.read_text(f"{hw}/name") == meter
    assert fs.read_int(f"{hw}/power1_input") == pytest.approx(st.power_w * 1e6, abs=1)
    volts, amps = fs.read_int(f"{hw}/in1_input") / 1e3, fs.read_int(f"{hw}/curr1_input") / 1e3
    assert 4.9 < volts < 5.1
    assert volts * amps == pytest.approx(st.power_w, rel=0.01)


def test_meter_noise_is_seeded(tmp_path):
    def readings(name, seed):
        board = VirtualBoard(str(tmp_path / name), "rpi4", meter="ina260", meter_noise_pct=2.0, meter_seed=seed)
        out = []
        for _ in range(20):
            board.advance(1)
            out.append(board.fs.read_int("sys/class/hwmon/hwmon0/power1_input"))
        return out, board.state().power_w

    a, power = readings("a", 1)
    assert a == readings("b", 1)[0] != readings("c", 2)[0]
    assert len(set(a)) > 1 and sum(a) / len(a) == pytest.approx(power * 1e6, rel=0.02)


def test_a_full_gauge_reports_charge_current_and_power(tmp_path):
    board = VirtualBoard(str(tmp_path), "rpi4", battery_mah=3000, soc_pct=60, mains=False)
    st = board.advance(10)
    b = "sys/class/power_supply/battery"
    fs = board.fs
    assert fs.read_int(f"{b}/charge_full") == 3000000
    assert fs.read_int(f"{b}/charge_now") == pytest.approx(3000000 * st.soc_pct / 100, abs=1)
    supply = power_supply.read_power(fs).battery
    assert supply.power_w == pytest.approx(st.power_w / board.efficiency, rel=0.01)


def test_a_capacity_only_gauge_and_no_gauge(tmp_path):
    board = VirtualBoard(str(tmp_path / "c"), "rpi4", battery_mah=3000, soc_pct=60, mains=False, gauge="capacity")
    board.advance(10)
    battery = power_supply.read_power(board.fs).battery
    assert battery.capacity_pct == 60 and battery.status == "Discharging"
    assert battery.power_w is None and battery.current_a is None and battery.voltage_v is None
    bare = VirtualBoard(str(tmp_path / "n"), "rpi4", battery_mah=3000, soc_pct=60, mains=False, gauge="none")
    bare.advance(10)
    assert power_supply.read_power(bare.fs).battery is None
    assert bare.state().soc_pct < 60  # the cell is there, only the gauge is not


@pytest.mark.parametrize("kw, message", [
    (dict(meter="ina226"), "unknown power meter 'ina226'; known: ina219, ina260"),
    (dict(gauge="coulomb"), "unknown fuel gauge 'coulomb'; known: full, capacity, none"),
    (dict(meter="ina219", meter_noise_pct=-1), "meter_noise_pct must be a finite number >= 0"),
])
def test_bad_meter_or_gauge_is_refused(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        VirtualBoard(str(tmp_path), "rpi4", **kw)
