"""The governor's policy and timing rules, on snapshots (no board): hysteresis, dwell, slope, overrides,
unknown readings, and the config rules."""

from __future__ import annotations

import dataclasses

import pytest

from device import config
from device.errors import ConfigError
from drivers.sim.clock import SimClock
from drivers.throttle import ThrottleFlags
from power.config import PowerConfig
from power.governor import Governor
from power.policy import Level, Policy
from power.snapshot import PowerSnapshot, temperature_slope

POLICY = Policy.from_config()  # defaults: balanced 80 C / 50 %, saver 82 C / 25 %, critical 84 C / 10 %
RPI4 = tuple(range(600000, 1500001, 100000))


def snap(**kw) -> PowerSnapshot:
    kw.setdefault("t", 0.0)
    return PowerSnapshot(**kw)


# ----------------------------------------------------------------------------------------- called_for


def test_nominal_board_calls_for_performance():
    assert POLICY.called_for(snap(temp_c=50.0, temp_slope_c_per_s=0.0, battery_pct=90.0, charging=False),
                             Level.PERFORMANCE) == (Level.PERFORMANCE, "nominal")


@pytest.mark.parametrize("temp, level", [(79.9, Level.PERFORMANCE), (80.0, Level.BALANCED), (82.0, Level.SAVER),
                                         (84.0, Level.CRITICAL), (95.0, Level.CRITICAL)])
def test_temperature_thresholds(temp, level):
    called, why = POLICY.called_for(snap(temp_c=temp, temp_slope_c_per_s=0.0), Level.PERFORMANCE)
    assert called == level
    if level != Level.PERFORMANCE:
        assert f"temperature {temp:.1f} C" in why


@pytest.mark.parametrize("pct, level", [(51, Level.PERFORMANCE), (50, Level.BALANCED), (25, Level.SAVER),
                                        (10, Level.CRITICAL), (0, Level.CRITICAL)])
def test_battery_thresholds_when_discharging(pct, level):
    called, why = POLICY.called_for(snap(battery_pct=float(pct), charging=False), Level.PERFORMANCE)
    assert called == level
    if level != Level.PERFORMANCE:
        assert "battery" in why and "not charging" in why


def test_low_battery_is_ignored_while_charging():
    assert POLICY.called_for(snap(battery_pct=3.0, charging=True), Level.CRITICAL)[0] == Level.PERFORMANCE


def test_unknown_charging_state_counts_as_discharging():
    assert POLICY.called_for(snap(battery_pct=20.0, charging=None), Level.PERFORMANCE)[0] == Level.SAVER


def test_unknown_readings_are_no_evidence():
    assert POLICY.called_for(snap(), Level.PERFORMANCE) == (Level.PERFORMANCE, "nominal")
    # ...and an unknown temperature does not hide a low battery, nor the reverse
    assert POLICY.called_for(snap(battery_pct=8.0, charging=False), Level.PERFORMANCE)[0] == Level.CRITICAL
    assert POLICY.called_for(snap(temp_c=83.0), Level.PERFORMANCE)[0] == Level.SAVER


def test_slope_prediction_acts_before_the_threshold():
    # 77 C rising 6 C/min: 80 C within 30 s, so balanced now although 77 < 80
    called, why = POLICY.called_for(snap(temp_c=77.0, temp_slope_c_per_s=0.1), Level.PERFORMANCE)
    assert called == Level.BALANCED
    assert "rising" in why and "within 30 s" in why
    # the same temperature, steady or falling, calls for nothing
    assert POLICY.called_for(snap(temp_c=75.0, temp_slope_c_per_s=0.0), Level.PERFORMANCE)[0] == Level.PERFORMANCE
    assert POLICY.called_for(snap(temp_c=75.0, temp_slope_c_per_s=-0.5), Level.PERFORMANCE)[0] == Level.PERFORMANCE


def test_predicted_temperature_never_below_the_reading():
    s = snap(temp_c=70.0, temp_slope_c_per_s=-1.0)
    assert s.predicted_temp_c(30) == 70.0
    assert snap(temp_c=70.0, temp_slope_c_per_s=0.2).predicted_temp_c(30) == pytest.approx(76.0)
    assert snap().predicted_temp_c(30) is None


def test_temperature_hysteresis_holds_an_active_level():
    # 78 C is under balanced's 80 C, but within the 3 C hysteresis of the active balanced level
    s = snap(temp_c=78.0, temp_slope_c_per_s=0.0)
    assert POLICY.called_for(s, Level.PERFORMANCE)[0] == Level.PERFORMANCE
    assert POLICY.called_for(s, Level.BALANCED)[0] == Level.BALANCED
    assert POLICY.called_for(snap(temp_c=76.9, temp_slope_c_per_s=0.0), Level.BALANCED)[0] == Level.PERFORMANCE


def test_a_level_held_for_the_battery_does_not_lower_the_temperature_thresholds():
    s = snap(temp_c=78.0, temp_slope_c_per_s=0.0)  # within balanced's 3 C hysteresis, had it been entered for heat
    assert POLICY.called_for(s, Level.CRITICAL)[0] == Level.BALANCED  # without knowing why critical is in force
    assert POLICY.called_for(s, Level.CRITICAL, thermal=Level.PERFORMANCE)[0] == Level.PERFORMANCE
    assert POLICY.called_for(s, Level.CRITICAL, thermal=Level.BALANCED)[0] == Level.BALANCED


def test_battery_hysteresis_holds_an_active_level():
    s = snap(battery_pct=28.0, charging=False)  # above saver's 25 %, inside its 5 % hysteresis
    assert POLICY.called_for(s, Level.BALANCED)[0] == Level.BALANCED
    assert POLICY.called_for(s, Level.SAVER)[0] == Level.SAVER
    assert POLICY.called_for(snap(battery_pct=30.5, charging=False), Level.SAVER)[0] == Level.BALANCED


def test_firmware_throttling_and_under_voltage_call_for_balanced():
    called, why = POLICY.called_for(snap(temp_c=60.0, throttle=ThrottleFlags(0x80008)), Level.PERFORMANCE)
    assert called == Level.BALANCED and "firmware throttling" in why
    called, why = POLICY.called_for(snap(throttle=ThrottleFlags(0x1)), Level.PERFORMANCE)
    assert called == Level.BALANCED and "under-voltage" in why
    # bits that only say "has occurred since boot" are history, not a reason
    assert POLICY.called_for(snap(throttle=ThrottleFlags(0x50000)), Level.PERFORMANCE)[0] == Level.PERFORMANCE


def test_power_good_input_signalling_trouble_calls_for_critical():
    called, why = POLICY.called_for(snap(temp_c=50.0, battery_pct=80.0, charging=False, power_good=False),
                                    Level.PERFORMANCE)
    assert called == Level.CRITICAL and "power-good input" in why
    assert POLICY.called_for(snap(power_good=True), Level.PERFORMANCE)[0] == Level.PERFORMANCE


def test_temperature_slope_is_a_least_squares_fit():
    assert temperature_slope([]) is None
    assert temperature_slope([(0.0, 50.0)]) is None
    assert temperature_slope([(1.0, 50.0), (1.0, 52.0)]) is None
    assert temperature_slope([(0.0, 50.0), (10.0, 51.0), (20.0, 52.0)]) == pytest.approx(0.1)
    assert temperature_slope([(0.0, 50.0), (10.0, 52.0), (20.0, 50.0)]) == pytest.approx(0.0)
    # a sensor step seen by two readings a moment apart is not a slope
    assert temperature_slope([(0.0, 50.0), (0.2, 53.0)], min_span_s=10.0) is None
    assert temperature_slope([(0.0, 50.0), (10.0, 53.0)], min_span_s=10.0) == pytest.approx(0.3)


# ------------------------------------------------------------------------------------- config rules


def test_policy_from_config_reads_every_level():
    cfg = config.loads("[power]\ndwell_s = 10\n[power.saver]\nthreads = 3\nvariant = 'lite'\n")
    p = Policy.from_config(cfg.power)
    assert p.dwell_s == 10.0
    assert p.spec(Level.SAVER).threads == 3 and p.spec(Level.SAVER).variant == "lite"
    assert p.spec(Level.PERFORMANCE).enter_temp_c is None


@pytest.mark.parametrize("toml, key", [
    ("[power.saver]\nenter_temp_c = 70\n", "power.saver.enter_temp_c"),
    ("[power.critical]\nenter_temp_c = 80\n", "power.critical.enter_temp_c"),
    ("[power.saver]\nenter_battery_pct = 60\n", "power.saver.enter_battery_pct"),
    ("[power]\nthermal_target_c = 80\n", "power.thermal_target_c"),
])
def test_policy_refuses_thresholds_out_of_order(toml, key):
    # The config loader refuses them (so `fieldnode config check` does too)...
    with pytest.raises(ConfigError) as e:
        config.loads(toml)
    assert e.value.key_path == key
    assert key in str(e.value)
    # ...and so does the policy, for a PowerConfig built in code that no loader checked.
    section, _, name = key[len("power."):].rpartition(".")
    value = float(toml.rsplit("=", 1)[1])
    pc = PowerConfig()
    if section:
        pc = dataclasses.replace(pc, **{section: dataclasses.replace(getattr(pc, section), **{name: value})})
    else:
        pc = dataclasses.replace(pc, **{name: value})
    with pytest.raises(ConfigError) as e:
        Policy.from_config(pc)
    assert e.value.key_path == key
    assert key in str(e.value)


def test_level_parse():
    assert Level.parse("Saver") is Level.SAVER
    with pytest.raises(ValueError, match="unknown level 'turbo'; expected one of performance, balanced"):
        Level.parse("turbo")


# ------------------------------------------------------------------------------- governor timing rules


class Board:
    """A scripted snapshot source: tests set what the next read returns."""

    def __init__(self, clock):
        self.clock = clock
        self.temp_c: float | None = 50.0
        self.slope = 0.0
        self.battery: float | None = None
        self.charging: bool | None = None

    def read(self) -> PowerSnapshot:
        return PowerSnapshot(t=self.clock.monotonic(), temp_c=self.temp_c, temp_slope_c_per_s=self.slope,
                             battery_pct=self.battery, charging=self.charging)


@pytest.fixture
def rig():
    clock = SimClock()
    board = Board(clock)
    events = []
    gov = Governor(POLICY, board.read, frequencies_khz=RPI4, cpus=4, clock=clock,
                   on_event=lambda kind, data: events.append((clock.monotonic(), kind, data)))
    return clock, board, gov, events


def test_escalation_is_immediate_and_relaxation_waits_the_dwell(rig):
    clock, board, gov, events = rig
    assert gov.step().level == Level.PERFORMANCE
    board.battery, board.charging = 40.0, False
    clock.advance(5)
    plan = gov.step()
    assert plan.level == Level.BALANCED and "battery 40%" in plan.reason
    assert events[-1][1:] == ("governor_level", {"from": "performance", "to": "balanced",
                                                 "reason": plan.reason, "override": False})
    board.charging = True  # plugged in: the board calls for performance again
    for _ in range(11):  # 55 s < 60 s dwell
        clock.advance(5)
        plan = gov.step()
        assert plan.level == Level.BALANCED
        assert "holding balanced for the dwell time" in plan.reason
    clock.advance(5)
    assert gov.step().level == Level.PERFORMANCE
    assert [e[2]["to"] for e in events if e[1] == "governor_level"] == ["balanced", "performance"]


def test_relaxation_jumps_straight_to_the_called_level(rig):
    clock, board, gov, events = rig
    board.battery, board.charging = 5.0, False
    gov.step()
    assert gov.level == Level.CRITICAL
    board.charging = True
    clock.advance(POLICY.dwell_s)
    assert gov.step().level == Level.PERFORMANCE  # not critical -> saver -> balanced -> performance
    assert len([e for e in events if e[1] == "governor_level"]) == 2


def test_plan_follows_the_level_spec(rig):
    clock, board, gov, _ = rig
    board.battery, board.charging = 20.0, False
    plan = gov.step()
    spec = POLICY.spec(Level.SAVER)
    assert plan.level == Level.SAVER
    assert plan.cpu_max_khz == 900000  # 60 % of 1.5 GHz
    assert (plan.threads, plan.variant, plan.interval_ms, plan.telemetry_s) == (
        spec.threads, spec.variant, spec.interval_ms, spec.telemetry_s)
    board.battery = 90.0
    clock.advance(60)
    plan = gov.step()
    assert (plan.cpu_max_khz, plan.threads) == (1500000, 4)  # threads = 0 means one per CPU


def test_thermal_trim_steps_down_then_back_up(rig):
    clock, board, gov, _ = rig

    def steps(n):
        out = []
        for _ in range(n):
            clock.advance(5)
            out.append(gov.step().cpu_max_khz // 1000)
        return out

    board.temp_c, board.slope = 78.5, 0.04  # predicted 79.7 >= the 79.5 target, the reading under it
    # one step, then the next only once the prediction has had predict_s (30 s) to see the first's effect
    assert steps(8) == [1400, 1400, 1400, 1400, 1400, 1400, 1300, 1300]
    assert gov.level == Level.PERFORMANCE  # the trim acts, the level does not move
    board.temp_c, board.slope = 79.6, 0.0  # the reading itself at the target: a step every governor step
    assert steps(2) == [1200, 1100]
    board.temp_c, board.slope = 79.2, 0.0  # under the target, but within its 0.5 C hysteresis: hold
    assert steps(12) == [1100] * 12
    board.temp_c = 76.0
    # one step back up per trim_dwell_s (20 s), steps every 5 s
    assert steps(8) == [1200, 1200, 1200, 1200, 1300, 1300, 1300, 1300]
    assert gov.plan.trim_steps == 2


def test_unknown_temperature_keeps_the_trim(rig):
    clock, board, gov, _ = rig
    board.temp_c, board.slope = 79.6, 0.0
    clock.advance(5)
    gov.step()
    trimmed = gov.plan.trim_steps
    assert trimmed == 1
    board.temp_c = None
    clock.advance(120)
    assert gov.step().trim_steps == trimmed


def test_override_forces_a_level_until_its_ttl(rig):
    clock, board, gov, events = rig
    plan = gov.override("saver", 120, by="op-key-1")
    assert plan.level == Level.SAVER and plan.override and plan.override_remaining_s == 120
    clock.advance(60)
    plan = gov.step()
    assert plan.level == Level.SAVER and "override by op-key-1" in plan.reason
    assert gov.status()["override"] == {"level": "saver", "by": "op-key-1", "remaining_s": 60.0}
    clock.advance(60)
    plan = gov.step()
    assert plan.level == Level.PERFORMANCE and not plan.override
    kinds = [e[1] for e in events]
    assert kinds == ["governor_override", "governor_level", "governor_override_expired", "governor_level"]


def test_override_can_be_cleared_and_refuses_bad_arguments(rig):
    clock, board, gov, events = rig
    gov.override(Level.CRITICAL, 600)
    assert gov.clear_override().level == Level.PERFORMANCE
    assert "governor_override_cleared" in [e[1] for e in events]
    with pytest.raises(ValueError, match="unknown level"):
        gov.override("max", 10)
    for ttl in (0, -5, True, "60", 10 ** 9):
        with pytest.raises(ValueError, match="ttl_s must be a number of seconds"):
            gov.override("saver", ttl)


def test_a_broken_event_listener_does_not_stop_the_governor():
    clock = SimClock()
    board = Board(clock)

    def boom(kind, data):
        raise RuntimeError("listener bug")

    gov = Governor(POLICY, board.read, frequencies_khz=RPI4, cpus=4, clock=clock, on_event=boom)
    board.temp_c = 90.0
    assert gov.step().level == Level.CRITICAL


def test_no_cpufreq_table_means_no_frequency_cap():
    clock = SimClock()
    gov = Governor(POLICY, Board(clock).read, frequencies_khz=(), cpus=2, clock=clock)
    plan = gov.step()
    assert plan.cpu_max_khz is None and plan.threads == 2
