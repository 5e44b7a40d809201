"""The governor against the virtual board through the real sysfs files: what it reads is the board's tree,
what it writes (scaling_max_freq) changes the board's physics. Shorter runs than bench_governor."""

from __future__ import annotations

import pytest

from drivers.cpufreq import CpuFreq
from drivers.sim.board import VirtualBoard
from drivers.sim.clock import SimClock
from power.governor import Governor
from power.policy import Level, Policy
from power.simulate import StaticPlan, simulate
from power.snapshot import BoardReader

POLICY = Policy.from_config()


def test_the_governed_board_stays_under_the_soft_limit_where_static_max_does_not():
    governed = simulate(POLICY, hours=0.75, ambient_c=40.0, dt=2.0)
    flat_out = simulate(StaticPlan(1500000, 4), hours=0.75, ambient_c=40.0, dt=2.0)
    best = simulate(StaticPlan(1200000, 4), hours=0.75, ambient_c=40.0, dt=2.0)
    assert flat_out.max_temp_c >= 80.0 and flat_out.firmware_throttled
    assert governed.max_temp_c < 80.0 and not governed.firmware_throttled
    assert best.max_temp_c < 80.0
    assert governed.inferences >= 0.9 * best.inferences
    assert governed.cheap_inferences == 0  # the trim held it; the levels (and the cheap variant) were not needed


def test_on_battery_the_governor_lives_longer_and_does_more():
    kw = dict(hours=6.0, ambient_c=20.0, battery_mah=1500.0, mains=False, dt=5.0, record_every_s=60.0)
    governed = simulate(POLICY, **kw)
    static = simulate(StaticPlan(1500000, 4), **kw)
    assert governed.died and static.died
    assert governed.runtime_s >= 1.5 * static.runtime_s
    assert governed.inferences >= 1.2 * static.inferences
    levels = [d["to"] for _, kind, d in governed.events if kind == "governor_level"]
    assert levels == ["balanced", "saver", "critical"]


def test_plugging_mains_returns_to_performance_within_one_dwell():
    governed = simulate(POLICY, hours=0.25, ambient_c=25.0, battery_mah=5000.0, soc_pct=9.0, mains=False,
                        plug_at_s=30.0, record_every_s=5.0)
    changes = [(t, d["to"]) for t, kind, d in governed.events if kind == "governor_level"]
    assert changes[0] == (0.0, "critical")
    back = next(t for t, to in changes if to == "performance")
    assert 30.0 <= back <= 30.0 + POLICY.dwell_s


def test_the_plan_reaches_the_board_through_scaling_max_freq(tmp_path):
    clock = SimClock()
    board = VirtualBoard(str(tmp_path), "rpi4", clock=clock, ambient_c=40.0)
    board.set_demand(threads=4, cost=1.0)
    reader = BoardReader(board.fs, clock=clock)
    gov = Governor(POLICY, reader.read, frequencies_khz=CpuFreq(board.fs).policies()[0].frequencies_khz,
                   cpus=4, clock=clock)
    cpufreq = CpuFreq(board.fs)
    written = []
    for _ in range(360):  # 30 simulated minutes
        board.advance(POLICY.step_s)
        plan = gov.step()
        cpufreq.set_max_khz(plan.cpu_max_khz)
        written.append(board.fs.read_int("sys/devices/system/cpu/cpufreq/policy0/scaling_max_freq"))
    assert written[0] == 1500000
    assert min(written) < 1500000  # the trim took the cap down...
    assert board.state().freq_khz == written[-1]  # ...and the board runs at what was written
    assert gov.snapshot.temp_c == pytest.approx(board.temp_c, abs=0.01)
    assert gov.snapshot.temp_source == "cpu-thermal"
    assert gov.level == Level.PERFORMANCE


def test_a_board_without_readable_sensors_stays_at_performance(tmp_path):
    """An empty sysfs root: every reading is unknown, nothing crashes, nothing is throttled."""
    clock = SimClock()
    from drivers.sysfs import Sysfs

    reader = BoardReader(Sysfs(str(tmp_path)), clock=clock)
    gov = Governor(POLICY, reader.read, frequencies_khz=(), cpus=2, clock=clock)
    for _ in range(5):
        clock.advance(5)
        plan = gov.step()
    assert plan.level == Level.PERFORMANCE and plan.cpu_max_khz is None
    assert gov.snapshot.temp_c is None and gov.snapshot.battery_pct is None and gov.snapshot.throttle is None


def test_the_power_good_line_reaches_the_governor_through_gpio(tmp_path):
    """A UPS HAT's low-battery output on a GPIO line (sim backend): the governor goes critical at once."""
    from drivers.inputs import PowerGoodInput
    from drivers.sim.gpio import SimPinFactory

    clock = SimClock()
    board = VirtualBoard(str(tmp_path), "rpi4", clock=clock)
    pins = SimPinFactory(clock=clock)
    pins.drive_high(17)
    line = PowerGoodInput(pins.input(17), active_low=True)
    reader = BoardReader(board.fs, clock=clock, power_good=lambda: line.power_good)
    gov = Governor(POLICY, reader.read, frequencies_khz=board.profile.frequencies_khz, cpus=4, clock=clock)
    board.advance(5)
    assert gov.step().level == Level.PERFORMANCE and gov.snapshot.power_good is True
    pins.drive_low(17)
    board.advance(5)
    plan = gov.step()
    assert plan.level == Level.CRITICAL and "power-good input" in plan.reason
