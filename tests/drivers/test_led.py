"""The status LED: patterns, priorities and the pin it drives, on the simulated backend and clock."""

from __future__ import annotations

import logging
import math

import pytest

from drivers.errors import GpioError
from drivers.led import PRIORITY, LedCode, StatusLed, cycle_s, draw, pattern
from drivers.sim.clock import SimClock
from drivers.sim.gpio import SimPinFactory
from tests.conftest import ROOT
from tests.waiting import eventually

PIN = 5


@pytest.fixture
def board():
    clock = SimClock()
    factory = SimPinFactory(clock=clock)
    yield clock, factory
    factory.close()


def run_for(led: StatusLed, clock: SimClock, seconds: float) -> None:
    """Ticks exactly when the LED asks to, until ``seconds`` of simulated time have passed."""
    end = clock.monotonic() + seconds
    while clock.monotonic() < end - 1e-9:
        delay = led.tick()
        clock.advance(min(delay, end - clock.monotonic()))


def changes(factory: SimPinFactory) -> list[tuple[float, bool]]:
    """The recorded states after the initial one, times rounded to the microsecond."""
    return [(round(t, 6), v) for t, v in factory.states(PIN)[1:]]


def test_patterns_match_their_documented_timing():
    assert pattern(LedCode.OK) == ((True, 0.1), (False, 1.9))
    assert pattern(LedCode.STARTING) == ((True, 0.1), (False, 0.1)) and 1 / cycle_s(LedCode.STARTING) == 5
    assert 1 / cycle_s(LedCode.UPDATING) == pytest.approx(10)
    assert not any(level for level, _ in pattern(LedCode.OFF))
    for code, blinks in [(LedCode.NO_BROKER, 1), (LedCode.SENSOR_FAULT, 2), (LedCode.RUNTIME_FAULT, 3), (LedCode.POWER_CRITICAL, 4)]:
        steps = pattern(code)
        assert sum(level for level, _ in steps) == blinks
        assert steps[-1] == (False, 1.6)  # the pause after the group is what lets a person count
    for code in LedCode:
        assert all(duration > 0 for _, duration in pattern(code))


def test_pattern_rejects_what_is_not_a_code():
    with pytest.raises(ValueError, match="not an LED code: 'ok'"):
        pattern("ok")


def test_ok_heartbeat_is_driven_from_the_clock(board):
    clock, factory = board
    led = StatusLed(factory.output(PIN), clock)
    run_for(led, clock, 4.2)
    assert changes(factory) == [(0.0, True), (0.1, False), (2.0, True), (2.1, False), (4.0, True), (4.1, False)]


def test_four_blinks_for_power_critical(board):
    clock, factory = board
    led = StatusLed(factory.output(PIN), clock)
    led.raise_code(LedCode.POWER_CRITICAL)
    run_for(led, clock, cycle_s(LedCode.POWER_CRITICAL))
    assert changes(factory) == [
        (0.0, True), (0.4, False), (0.8, True), (1.2, False), (1.6, True), (2.0, False), (2.4, True), (2.8, False),
    ]


def test_the_most_severe_condition_wins_and_ok_returns(board):
    clock, factory = board
    led = StatusLed(factory.output(PIN), clock)
    assert led.code is LedCode.OK
    led.raise_code(LedCode.NO_BROKER)
    led.raise_code(LedCode.RUNTIME_FAULT)
    led.raise_code(LedCode.STARTING)
    assert led.code is LedCode.RUNTIME_FAULT
    led.raise_code(LedCode.UPDATING)
    assert led.code is LedCode.UPDATING
    led.raise_code(LedCode.POWER_CRITICAL)
    assert led.code is LedCode.POWER_CRITICAL
    for code in (LedCode.POWER_CRITICAL, LedCode.UPDATING, LedCode.RUNTIME_FAULT):
        led.clear_code(code)
    assert led.code is LedCode.NO_BROKER and led.active == {LedCode.NO_BROKER, LedCode.STARTING}
    led.clear_code(LedCode.NO_BROKER)
    led.clear_code(LedCode.STARTING)
    led.clear_code(LedCode.STARTING)  # clearing twice is harmless
    assert led.code is LedCode.OK and led.active == frozenset()
    assert PRIORITY[0] is LedCode.POWER_CRITICAL and LedCode.OK not in PRIORITY


def test_a_new_code_starts_its_cycle_from_the_beginning(board):
    clock, factory = board
    led = StatusLed(factory.output(PIN), clock)
    run_for(led, clock, 1.0)  # OK heartbeat, dark at 1.0
    led.raise_code(LedCode.SENSOR_FAULT)
    run_for(led, clock, 1.0)
    assert changes(factory) == [(0.0, True), (0.1, False), (1.0, True), (1.4, False), (1.8, True)]
    led.clear_code(LedCode.SENSOR_FAULT)
    run_for(led, clock, 0.5)
    # OK restarts at 2.0 with its flash; the LED is already lit there, so the next change is the dark at 2.1.
    assert changes(factory)[-2:] == [(1.8, True), (2.1, False)]


def test_tick_writes_only_changes_and_reports_the_next_change(board):
    clock, factory = board
    led = StatusLed(factory.output(PIN), clock)
    assert led.tick() == pytest.approx(0.1)
    assert led.tick() == pytest.approx(0.1)
    clock.advance(0.05)
    assert led.tick(now=0.05) == pytest.approx(0.05)
    assert changes(factory) == [(0.0, True)]


def test_no_led_on_the_board_is_a_no_op():
    clock = SimClock()
    led = StatusLed(None, clock)
    led.raise_code(LedCode.NO_BROKER)
    assert led.tick() == pytest.approx(0.4) and led.code is LedCode.NO_BROKER
    led.start()
    led.stop()
    assert not led.running


@pytest.mark.parametrize("code", [LedCode.OK, LedCode.OFF, "no_broker", None])
def test_only_conditions_can_be_raised(code):
    led = StatusLed(None, SimClock())
    with pytest.raises(ValueError, match=r"only conditions can be raised or cleared \(POWER_CRITICAL, UPDATING"):
        led.raise_code(code)
    with pytest.raises(ValueError, match="only conditions can be raised or cleared"):
        led.clear_code(code)


def test_tick_on_a_broken_line_raises_the_gpio_error(board):
    clock, factory = board
    line = factory.output(PIN)
    line.close()
    with pytest.raises(GpioError, match="pin 5: the line is closed"):
        StatusLed(line, clock).tick()


def test_thread_blinks_the_pattern_and_stop_turns_the_led_off(board):
    clock, factory = board
    led = StatusLed(factory.output(PIN), clock)
    led.raise_code(LedCode.STARTING)
    led.start()
    led.start()  # already running: no second thread
    assert eventually(lambda: len(factory.states(PIN)) >= 8)
    led.stop()
    assert not led.running
    recorded = factory.states(PIN)
    assert recorded[-1][1] is False and led.code is LedCode.STARTING
    steps = changes(factory)[:6]
    assert [v for _, v in steps] == [True, False, True, False, True, False]
    assert [t for t, _ in steps] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5], abs=1e-6)


def test_thread_on_the_real_clock_sleeps_to_the_edges_and_wakes_for_a_new_code():
    factory = SimPinFactory()  # the system clock: the thread sleeps in real time
    led = StatusLed(factory.output(PIN))
    led.start()
    assert eventually(lambda: [v for _, v in factory.states(PIN)] == [False, True, False])  # OK: flash, dark
    led.raise_code(LedCode.POWER_CRITICAL)  # in the middle of the heartbeat's 1.9 s of dark
    assert eventually(lambda: len(factory.states(PIN)) >= 6)  # the blinks begin
    led.stop(timeout=None)  # a thread asleep until the next edge is woken (a hang would fail the test)
    levels = [v for _, v in factory.states(PIN)]
    assert levels[:6] == [False, True, False, True, False, True] and levels[-1] is False


def test_only_a_change_of_the_shown_code_wakes_the_thread():
    led = StatusLed(None, SimClock())
    led.raise_code(LedCode.POWER_CRITICAL)
    assert led._wake.is_set()
    led._wake.clear()
    led.raise_code(LedCode.NO_BROKER)  # less severe: POWER_CRITICAL still shows, nothing to redraw
    led.clear_code(LedCode.STARTING)  # not active
    assert not led._wake.is_set()
    led.clear_code(LedCode.POWER_CRITICAL)  # NO_BROKER shows now
    assert led._wake.is_set()


def test_a_steady_level_is_never_due_again():
    assert StatusLed._position(LedCode.OFF, 12.5) == (False, math.inf)


def test_thread_survives_a_broken_led_and_says_so_once(board, caplog):
    clock, factory = board
    line = factory.output(PIN)
    line.close()
    led = StatusLed(line, clock)
    caplog.set_level(logging.WARNING, logger="drivers.led")
    led.start()
    assert eventually(lambda: clock.monotonic() > 5.0)  # many ticks have failed by now
    led.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("status LED: pin 5: the line is closed") == 1
    assert "status LED: cannot switch off: pin 5: the line is closed" in messages


def test_draw_shows_lit_dark_and_flicker():
    assert draw(LedCode.OK) == "█" + "▁" * 19
    assert draw(LedCode.STARTING) == "█▁" * 10
    assert draw(LedCode.UPDATING) == "▒" * 20
    assert draw(LedCode.SENSOR_FAULT) == "████▁▁▁▁████" + "▁" * 16


def test_technician_table_matches_the_code():
    doc = (ROOT / "docs" / "led-codes.md").read_text(encoding="utf-8")
    for code in LedCode:
        row = next((line for line in doc.splitlines() if line.startswith(f"| {code.name} ")), None)
        assert row is not None, f"docs/led-codes.md has no row for {code.name}"
        assert f"`{draw(code)}`" in row, f"docs/led-codes.md draws {code.name} differently from pattern()"
