"""``[drivers]``: where the agent finds its hardware (sysfs root, GPIO lines, the serial sensor)."""

from __future__ import annotations

from dataclasses import dataclass

from device.configschema import setting

_PIN = dict(minimum=-1, maximum=1023)


@dataclass(frozen=True)
class DriversConfig:
    """``[drivers]``: hardware access."""

    sysfs_root: str = setting(
        "", "Directory standing for / when reading sysfs, /proc and /dev; empty means / "
            "(FIELDNODE_SYSFS_ROOT overrides).")
    virtual_board: str = setting(
        "", "Run on a simulated board instead of the hardware: rpi4, rpi5 or jetson-orin-nano; empty uses the real one.",
        choices=("", "rpi4", "rpi5", "jetson-orin-nano"))
    gpio: str = setting("auto", "GPIO backend: auto tries libgpiod, then rpigpio (FIELDNODE_GPIO overrides); only "
                                "opened when a pin is configured.", choices=("auto", "libgpiod", "rpigpio", "sim"))
    gpio_chip_label: str = setting("", "GPIO chip label for gpiod; empty tries pinctrl-rp1, pinctrl-bcm2711, "
                                       "pinctrl-bcm2835.")
    led_pin: int = setting(-1, "Status LED line (BCM number); -1 means no LED.", **_PIN)
    led_active_low: bool = setting(False, "The LED lights when the line is low.")
    trigger_pin: int = setting(-1, "Wake/trigger input line (a PIR or button); -1 means none.", **_PIN)
    trigger_pull: str = setting("down", "Bias of the trigger input.", choices=("none", "up", "down"))
    trigger_debounce_s: float = setting(0.05, "The trigger line must settle this long before it counts.",
                                        minimum=0, maximum=10)
    power_good_pin: int = setting(-1, "Power-good / low-battery input line; -1 means none.", **_PIN)
    power_good_pull: str = setting("up", "Bias of the power-good input.", choices=("none", "up", "down"))
    power_good_active_low: bool = setting(True, "The power-good input signals trouble when low.")
    sensor_url: str = setting(
        "", "Serial sensor port for serial_for_url (/dev/ttyAMA0, loop://); required by fieldnode run unless "
            "virtual_board (or --sim) asks for a simulated board.")
    sensor_baudrate: int = setting(921600, "Serial sensor baud rate.", minimum=1200, maximum=12000000)
    sensor_timeout_s: float = setting(1.0, "A sensor silent this long counts a timeout and is stale.",
                                      minimum=0.01, maximum=3600)
