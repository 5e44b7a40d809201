"""The harvest log on its own: fed what a gauge and a meter read over a day, it learns the harvest and plans the
constant power that day sustains, checked against a walk of the battery done here slot by slot."""

from __future__ import annotations

import math

import pytest

from power.harvest import HarvestLog

DAY = 86400.0
W_PER_WH_S = 3600.0  # fuel in Wh: one Wh per second drained is 3600 W


def sun(t: float, peak_w: float = 12.0) -> float:
    """A harvest of ``peak_w`` at noon, from 06:00 to 18:00 (t = 0 is midnight)."""
    h = (t / 3600.0) % 24.0
    return peak_w * math.sin(math.pi * (h - 6.0) / 12.0) if 6.0 < h < 18.0 else 0.0


def feed(log: HarvestLog, hours: float, load_w: float, fuel: float, capacity: float, step_s: float = 60.0,
         t0: float = 0.0) -> float:
    """Runs a board drawing ``load_w`` under :func:`sun` for ``hours``; returns the fuel left."""
    t = t0
    while t < t0 + hours * 3600.0:
        log.add(t, fuel, load_w, W_PER_WH_S)
        fuel = min(capacity, fuel + (sun(t + step_s / 2) - load_w) * step_s / 3600.0)
        t += step_s
    log.add(t, fuel, load_w, W_PER_WH_S)
    return fuel


def walk(log: HarvestLog, now: float, fuel: float, capacity: float, watts: float, step_s: float = 60.0) -> float:
    """The lowest charge over a day at a constant ``watts`` under the same sun."""
    low, t = fuel, now
    while t < now + DAY:
        fuel = min(capacity, fuel + (sun(t + step_s / 2) - watts) * step_s / 3600.0)
        low, t = min(low, fuel), t + step_s
    return low


def test_it_learns_the_day_from_the_charge_and_the_load():
    log = HarvestLog(slot_s=600.0)
    feed(log, 25.0, load_w=1.0, fuel=50.0, capacity=1000.0)  # never full: the whole harvest is seen
    assert log.ready(25 * 3600.0)
    day_wh = 12.0 * 12.0 * 2.0 / math.pi  # the integral of the sine, in Wh
    assert log.daily_gain() * W_PER_WH_S / 3600.0 == pytest.approx(day_wh, rel=0.01)
    noon = log.gain[int(12 * 3600 // 600)] * W_PER_WH_S
    assert noon == pytest.approx(12.0, rel=0.01)
    assert log.gain[int(2 * 3600 // 600)] * W_PER_WH_S == pytest.approx(0.0, abs=1e-6)  # the night


def test_before_a_whole_day_it_is_not_ready():
    log = HarvestLog()
    feed(log, 20.0, load_w=1.0, fuel=50.0, capacity=1000.0)
    assert not log.ready(20 * 3600.0)


@pytest.mark.parametrize("start_h, fuel", [(6.0, 10.0), (12.0, 40.0), (20.0, 30.0)])
def test_the_budget_is_the_most_that_keeps_the_reserve_for_a_day(start_h, fuel):
    capacity, reserve = 60.0, 3.0
    log = HarvestLog()
    feed(log, 24.0, load_w=3.0, fuel=30.0, capacity=1000.0)
    now = DAY + start_h * 3600.0
    watts = log.sustainable_w(now, fuel, capacity, reserve, W_PER_WH_S, 50.0)
    assert 0.0 < watts < 50.0
    assert walk(log, now, fuel, capacity, watts) >= reserve - 0.05
    assert walk(log, now, fuel, capacity, watts * 1.02) < reserve  # not a watt left on the table


def test_a_full_battery_turns_the_harvest_away_and_the_budget_knows():
    log = HarvestLog()
    feed(log, 24.0, load_w=3.0, fuel=30.0, capacity=1000.0)
    now = DAY + 8 * 3600.0
    small = log.sustainable_w(now, 15.0, 20.0, 1.0, W_PER_WH_S, 50.0)
    large = log.sustainable_w(now, 15.0, 200.0, 1.0, W_PER_WH_S, 50.0)
    assert small < large  # a small battery stores less of the day for the night


def test_without_a_harvest_it_spends_the_charge_over_the_day():
    log = HarvestLog()
    t = 0.0
    while t <= DAY + 600.0:
        log.add(t, 100.0 - t / 3600.0 * 0.001, 0.0036, W_PER_WH_S)  # a dark day, the load alone drains
        t += 60.0
    watts = log.sustainable_w(t, 25.0, 100.0, 1.0, W_PER_WH_S, 50.0)
    assert watts == pytest.approx((25.0 - 1.0) / 24.0, rel=0.01)


def test_below_the_reserve_it_asks_for_nothing_and_at_most_the_ceiling():
    log = HarvestLog()
    feed(log, 24.0, load_w=3.0, fuel=30.0, capacity=1000.0)
    night = DAY + 22 * 3600.0
    assert log.sustainable_w(night, 0.5, 60.0, 1.0, W_PER_WH_S, 50.0) == 0.0
    assert log.sustainable_w(night, 59.0, 60.0, 1.0, W_PER_WH_S, 0.5) == 0.5


def test_garbage_samples_are_ignored():
    log = HarvestLog(slot_s=600.0)
    log.add(0.0, 10.0, 1.0, W_PER_WH_S)
    log.add(300.0, float("nan"), 1.0, W_PER_WH_S)
    log.add(300.0, 10.0, 1.0, 0.0)  # no conversion
    log.add(300.0, 10.0, 1.0, W_PER_WH_S)
    log.add(200.0, 0.0, 99.0, W_PER_WH_S)  # back in time
    log.add(600.0, 10.0, 1.0, W_PER_WH_S)
    assert log.gain[0] == pytest.approx(1.0 / W_PER_WH_S)


@pytest.mark.parametrize("period_s, slot_s", [(86400.0, 0.0), (600.0, 1200.0), (float("nan"), 600.0)])
def test_a_bad_period_or_slot_is_refused(period_s, slot_s):
    with pytest.raises(ValueError, match="slot_s"):
        HarvestLog(period_s, slot_s)


@pytest.mark.parametrize("tolerance", [-0.1, 1.0])
def test_a_bad_tolerance_is_refused(tolerance):
    with pytest.raises(ValueError, match="tolerance"):
        HarvestLog(tolerance=tolerance)


def test_a_slightly_smaller_harvest_is_taken_for_noise():
    log = HarvestLog()
    fuel = feed(log, 24.0, load_w=3.0, fuel=30.0, capacity=1000.0)
    t = DAY
    while t < DAY + 12 * 3600.0:  # 80 % of yesterday's sun
        log.add(t, fuel, 3.0, W_PER_WH_S)
        fuel += (0.8 * sun(t + 30.0) - 3.0) * 60.0 / 3600.0
        t += 60.0
    log.add(t, fuel, 3.0, W_PER_WH_S)
    assert log.repeat_share() == 1.0


def test_a_day_that_falls_short_of_the_last_scales_the_rest_of_the_plan_down_at_once():
    log = HarvestLog()
    fuel = feed(log, 24.0, load_w=3.0, fuel=30.0, capacity=1000.0)
    assert log.repeat_share() == 1.0  # nothing to compare with yet
    fuel = feed(log, 10.0, load_w=3.0, fuel=fuel, capacity=1000.0, t0=DAY)  # the same sun until 10:00
    now = DAY + 10 * 3600.0
    assert log.repeat_share() == pytest.approx(1.0, abs=0.01)
    sunny = log.sustainable_w(now, 30.0, 60.0, 3.0, W_PER_WH_S, 50.0)
    t = now
    while t < now + 3600.0:  # then a cloud: a fifth of the harvest for an hour
        log.add(t, fuel, 3.0, W_PER_WH_S)
        fuel += (sun(t + 30.0) / 5.0 - 3.0) * 60.0 / 3600.0
        t += 60.0
    log.add(t, fuel, 3.0, W_PER_WH_S)
    assert log.repeat_share() == pytest.approx(0.2 / 0.6, abs=0.05)  # beyond the tolerance, in proportion
    assert log.sustainable_w(t, 30.0, 60.0, 3.0, W_PER_WH_S, 50.0) < 0.6 * sunny


def test_a_full_battery_is_not_taken_for_a_cloud():
    log = HarvestLog()
    fuel = feed(log, 24.0, load_w=3.0, fuel=30.0, capacity=1000.0)
    t = DAY + 11 * 3600.0
    feed(log, 11.0, load_w=3.0, fuel=fuel, capacity=1000.0, t0=DAY)
    for _ in range(60):  # full: the load alone is seen, the rest of the harvest turned away
        log.add(t, 1000.0, 3.0, W_PER_WH_S, battery_pct=100.0)
        t += 60.0
    log.add(t, 1000.0, 3.0, W_PER_WH_S, battery_pct=100.0)
    assert log.repeat_share() == 1.0


def test_the_budget_waits_for_a_day_and_the_capacity_and_is_walked_again_each_minute():
    log = HarvestLog(replan_s=60.0)
    feed(log, 23.0, load_w=3.0, fuel=30.0, capacity=1000.0)
    assert log.budget_w(23 * 3600.0, 30.0, W_PER_WH_S, 50.0) is None  # not a whole day yet
    feed(log, 2.0, load_w=3.0, fuel=30.0, capacity=1000.0, t0=23 * 3600.0 + 60.0)
    now = 25 * 3600.0 + 120.0
    assert log.budget_w(now, 30.0, W_PER_WH_S, 50.0) is None  # no capacity known yet
    log.add(now, 30.0, 3.0, W_PER_WH_S, battery_pct=50.0)
    assert log.capacity == pytest.approx(60.0)
    first = log.budget_w(now, 30.0, W_PER_WH_S, 50.0)
    assert first == pytest.approx(log.sustainable_w(now, 30.0, 60.0, 3.0, W_PER_WH_S, 50.0))
    assert log.budget_w(now + 30.0, 5.0, W_PER_WH_S, 50.0) == first  # within the minute: the same plan
    assert log.budget_w(now + 60.0, 5.0, W_PER_WH_S, 50.0) < first
    assert log.status(now + 60.0)["ready"] is True
