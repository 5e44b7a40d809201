"""Trigger and power-good inputs, on the simulated backend and clock."""

from __future__ import annotations

import logging
import threading

import pytest

from drivers.errors import GpioError
from drivers.gpio import Pull
from drivers.inputs import PowerGoodInput, TriggerInput
from drivers.sim.clock import EPOCH, SimClock
from drivers.sim.gpio import SimPinFactory
from tests.waiting import eventually

PIN = 23


@pytest.fixture
def board():
    clock = SimClock(start=100.0)
    factory = SimPinFactory(clock=clock)
    yield clock, factory
    factory.close()


def make_trigger(clock, factory, debounce_s=0.05):
    fired: list[float] = []
    trigger = TriggerInput(factory.input(PIN, Pull.DOWN), fired.append, debounce_s=debounce_s, clock=clock)
    return trigger, fired


def pulse(clock, factory, *steps: tuple[float, bool]) -> None:
    """Drives the pin: each step waits ``dt`` simulated seconds, then sets the level."""
    for dt, level in steps:
        clock.advance(dt)
        (factory.drive_high if level else factory.drive_low)(PIN)


def test_a_press_fires_once_it_has_settled(board):
    clock, factory = board
    trigger, fired = make_trigger(clock, factory)
    factory.drive_high(PIN)
    assert trigger.check() == 0 and fired == []  # not settled yet
    clock.advance(0.05)
    assert trigger.check() == 1
    assert fired == [EPOCH + 100.0]  # wall-clock time of the rising edge
    clock.advance(1.0)
    assert trigger.check() == 0 and trigger.triggers == 1


def test_contact_bounce_on_press_and_release_fires_once(board):
    clock, factory = board
    trigger, fired = make_trigger(clock, factory)
    pulse(clock, factory, (0.0, True), (0.002, False), (0.002, True), (0.003, False), (0.001, True))
    clock.advance(0.3)
    pulse(clock, factory, (0.0, False), (0.002, True), (0.002, False), (0.002, True), (0.001, False))
    clock.advance(1.0)
    assert trigger.check() == 1
    assert fired == [pytest.approx(EPOCH + 100.0)]  # stamped at the first edge of the press


def test_a_spike_shorter_than_the_debounce_is_ignored(board):
    clock, factory = board
    trigger, fired = make_trigger(clock, factory)
    pulse(clock, factory, (0.0, True), (0.01, False))
    clock.advance(1.0)
    assert trigger.check() == 0 and fired == []


def test_a_late_check_still_sees_every_settled_press(board):
    clock, factory = board
    trigger, fired = make_trigger(clock, factory)
    pulse(clock, factory, (0.0, True), (3.0, False), (2.0, True), (0.01, False), (0.01, True))
    clock.advance(10.0)
    assert trigger.check() == 2
    assert fired == [pytest.approx(EPOCH + 100.0), pytest.approx(EPOCH + 105.0)]


def test_a_pir_held_high_fires_once_and_again_after_it_drops(board):
    clock, factory = board
    trigger, fired = make_trigger(clock, factory)
    factory.drive_high(PIN)
    for _ in range(5):
        clock.advance(1.0)
        trigger.check()
    pulse(clock, factory, (0.0, False), (4.0, True))
    clock.advance(0.1)
    trigger.check()
    assert fired == [pytest.approx(EPOCH + 100.0), pytest.approx(EPOCH + 109.0)]


def test_zero_debounce_fires_on_every_rising_edge(board):
    clock, factory = board
    trigger, fired = make_trigger(clock, factory, debounce_s=0)
    pulse(clock, factory, (0.0, True), (0.001, False), (0.001, True))
    assert trigger.check() == 2
    assert fired == [pytest.approx(EPOCH + 100.0), pytest.approx(EPOCH + 100.002)]


def test_a_failing_callback_is_logged_and_the_input_keeps_working(board, caplog):
    clock, factory = board
    calls: list[float] = []

    def callback(stamp: float) -> None:
        calls.append(stamp)
        if len(calls) == 1:
            raise RuntimeError("uplink queue full")

    trigger = TriggerInput(factory.input(PIN), callback, clock=clock)
    caplog.set_level(logging.ERROR, logger="drivers.inputs")
    pulse(clock, factory, (0.0, True), (1.0, False), (1.0, True))
    clock.advance(1.0)
    assert trigger.check() == 2
    assert len(calls) == 2 and trigger.callback_errors == 1 and trigger.triggers == 2
    assert "trigger callback failed" in caplog.text and "uplink queue full" in caplog.text


@pytest.mark.parametrize("debounce", [-0.01, "0.05", float("nan"), True])
def test_a_bad_debounce_is_named(board, debounce):
    clock, factory = board
    with pytest.raises(ValueError, match=r"debounce_s must be a number of seconds >= 0, got "):
        TriggerInput(factory.input(PIN), print, debounce_s=debounce, clock=clock)


def test_check_on_a_closed_line_raises(board):
    clock, factory = board
    line = factory.input(PIN)
    trigger = TriggerInput(line, print, clock=clock)
    line.close()
    with pytest.raises(GpioError, match="pin 23: the line is closed"):
        trigger.check()


def test_the_thread_fires_on_a_driven_press(board):
    clock, factory = board
    done = threading.Event()
    stamps: list[float] = []

    def on_trigger(stamp: float) -> None:
        stamps.append(stamp)
        done.set()

    trigger = TriggerInput(factory.input(PIN, Pull.DOWN), on_trigger, clock=clock)
    trigger.start()
    trigger.start()  # already running: no second thread
    assert eventually(lambda: clock.monotonic() > 101.0)  # the thread is waiting on the line
    before = clock.monotonic()
    factory.drive_high(PIN)
    after = clock.monotonic()
    assert done.wait(30)
    trigger.stop()
    assert not trigger.running and trigger.triggers == 1
    assert EPOCH + before <= stamps[0] <= EPOCH + after


def test_the_thread_on_the_real_clock_blocks_on_the_edge_and_stop_wakes_it():
    factory = SimPinFactory()  # the system clock: the wait blocks on the line until an edge or a wake-up
    fired = threading.Event()
    trigger = TriggerInput(factory.input(PIN, Pull.DOWN), lambda stamp: fired.set(), debounce_s=0.01)
    assert trigger._line.can_wake
    trigger.start()
    factory.drive_high(PIN)
    assert fired.wait(30)  # settled debounce_s after the edge: the wait ended for it
    factory.drive_low(PIN)
    trigger.stop(timeout=None)  # the thread waits up to an hour for an edge; stop() wakes it (a hang fails)
    assert not trigger.running and trigger.triggers == 1


def test_the_thread_survives_a_broken_line_and_says_so_once(board, caplog):
    clock, factory = board
    line = factory.input(PIN)
    trigger = TriggerInput(line, print, clock=clock)
    line.close()
    caplog.set_level(logging.WARNING, logger="drivers.inputs")
    trigger.start()
    assert eventually(lambda: clock.monotonic() > 110.0)
    trigger.stop()
    assert [r.getMessage() for r in caplog.records] == ["trigger input: pin 23: the line is closed"]


def test_power_good_with_an_active_low_alert(board):
    _, factory = board
    power = PowerGoodInput(factory.input(PIN, Pull.UP))
    assert power.power_good is True and power.fault is False
    factory.drive_low(PIN)  # the UPS HAT pulls its low-battery pin down
    assert power.power_good is False and power.fault is True
    factory.drive_high(PIN)
    assert power.power_good is True


def test_power_good_with_an_active_high_alert(board):
    _, factory = board
    power = PowerGoodInput(factory.input(PIN, Pull.DOWN), active_low=False)
    assert power.power_good is True
    factory.drive_high(PIN)
    assert power.power_good is False and power.fault is True


def test_power_good_on_a_closed_line_raises(board):
    _, factory = board
    line = factory.input(PIN)
    power = PowerGoodInput(line)
    line.close()
    with pytest.raises(GpioError, match="pin 23: the line is closed"):
        _ = power.power_good
