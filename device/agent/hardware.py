"""The agent's GPIO: the status LED, the trigger input and the power-good input, from ``[drivers]``.

Nothing is opened unless a pin is configured (``-1`` means none), so a board without GPIO wiring never
needs a GPIO library. :meth:`BoardIO.update` maps the agent's state onto the LED's blink codes
(docs/led-codes.md): starting, no broker (the link's fault), sensor fault, runtime fault (not serving, or a hung
worker), power critical; OK otherwise.
"""

from __future__ import annotations

import logging
from typing import Callable

from device.clock import SYSTEM_CLOCK
from drivers.gpio import Pull, make_factory
from drivers.inputs import PowerGoodInput, TriggerInput
from drivers.led import LedCode, StatusLed

log = logging.getLogger(__name__)

_PULLS = {"none": Pull.NONE, "up": Pull.UP, "down": Pull.DOWN}


class _ActiveLow:
    """An output line seen through an inverter (an LED wired to 3V3 lights when the line is low)."""

    def __init__(self, line):
        self._line = line
        self._line.value = True  # dark

    @property
    def value(self) -> bool:
        return not self._line.value

    @value.setter
    def value(self, on: bool) -> None:
        self._line.value = not on

    def close(self) -> None:
        self._line.close()


class BoardIO:
    """The GPIO the agent uses, built from the ``[drivers]`` section.

    Args:
        drivers: The ``[drivers]`` config section.
        on_trigger: Called with the time of each debounced trigger edge.
        clock: Time source for the LED pattern and debouncing.
        factory: A pin factory to use instead of making one (tests pass a ``SimPinFactory``).

    Raises:
        GpioUnavailable: A pin is configured but no GPIO backend can run here (the message names the extras).
    """

    def __init__(self, drivers, on_trigger: Callable[[float], None] | None = None, clock=SYSTEM_CLOCK,
                 factory=None):
        d = drivers
        wanted = max(d.led_pin, d.trigger_pin, d.power_good_pin) >= 0
        self.pins = factory if factory is not None else (
            make_factory(d.gpio, chip_label=d.gpio_chip_label, clock=clock) if wanted else None)
        line = None
        if self.pins is not None and d.led_pin >= 0:
            out = self.pins.output(d.led_pin, initial=d.led_active_low)
            line = _ActiveLow(out) if d.led_active_low else out
        self.led = StatusLed(line, clock=clock)
        self.trigger = None
        if self.pins is not None and d.trigger_pin >= 0 and on_trigger is not None:
            self.trigger = TriggerInput(self.pins.input(d.trigger_pin, _PULLS[d.trigger_pull]), on_trigger,
                                        debounce_s=d.trigger_debounce_s, clock=clock)
        self.power_good = None
        if self.pins is not None and d.power_good_pin >= 0:
            self.power_good = PowerGoodInput(self.pins.input(d.power_good_pin, _PULLS[d.power_good_pull]),
                                             active_low=d.power_good_active_low)
        self.led.raise_code(LedCode.STARTING)

    def read_power_good(self) -> bool | None:
        return None if self.power_good is None else self.power_good.power_good

    def start(self) -> None:
        self.led.start()
        if self.trigger is not None:
            self.trigger.start()

    def update(self, *, started: bool, broker_ok: bool | None, sensor_ok: bool, runtime_ok: bool,
               critical: bool) -> LedCode:
        """Sets the LED's conditions from the agent's state; returns the code now shown.

        Args:
            started: The agent has started (else STARTING).
            broker_ok: False while the link is a fault (down past its grace, or the broker stopped acknowledging:
                NO_BROKER); None without a link.
            sensor_ok: False while the sensor is a fault (SENSOR_FAULT).
            runtime_ok: False while no variant can serve or a request is late for its worker (RUNTIME_FAULT).
            critical: The governor is at its critical level (POWER_CRITICAL).
        """
        for code, active in ((LedCode.STARTING, not started), (LedCode.NO_BROKER, broker_ok is False),
                             (LedCode.SENSOR_FAULT, not sensor_ok), (LedCode.RUNTIME_FAULT, not runtime_ok),
                             (LedCode.POWER_CRITICAL, critical)):
            (self.led.raise_code if active else self.led.clear_code)(code)
        return self.led.code

    def describe(self) -> dict:
        # "led" is the code a status LED shows, or None when no LED is wired (led_pin = -1): a board without
        # one must not claim to be showing "ok".
        led = self.led.code.value if self.led.wired else None
        return {"gpio": None if self.pins is None else self.pins.describe(), "led": led,
                "trigger": None if self.trigger is None else {"triggers": self.trigger.triggers},
                "power_good": self.read_power_good()}

    def close(self) -> None:
        if self.trigger is not None:
            self.trigger.stop()
        self.led.stop()
        if self.pins is not None:
            self.pins.close()
