"""The GPIO seam: backend selection and fallback, the three backends, the simulated board.

Neither GPIO library is installed in the test venv, so the selection and error paths run against their real
absence. The v1 refusal, the v2 chip search and the RPi.GPIO code paths run against small stand-in packages
written to tmp_path and put on sys.path: real imports of library-shaped modules, our code unchanged.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import textwrap
import threading

import pytest

from drivers.errors import GpioError, GpioUnavailable
from drivers.gpio import Edge, EdgeEvent, GpioFallback, Pull, make_factory
from drivers.gpio.libgpiod import V1_REFUSAL, LibgpiodFactory
from drivers.gpio.rpigpio import RPiGpioFactory
from drivers.sim import gpio as simgpio
from drivers.sim.clock import SimClock
from drivers.sim.gpio import SimPinFactory

LIB_ROOTS = ("gpiod", "RPi", "lgpio")

FAKE_GPIOD_V1 = {
    "gpiod/__init__.py": '''
        """The v1 bindings' shape: Chip.get_line().request(), no request_lines."""
        __version__ = "1.6.3"
        LINE_REQ_DIR_OUT = 3
        class Chip:
            def __init__(self, name): self.name = name
            def get_line(self, offset): raise NotImplementedError
    ''',
}

FAKE_GPIOD_V2 = {
    "gpiod/line.py": """
        from enum import Enum
        Value = Enum("Value", {"INACTIVE": 0, "ACTIVE": 1})
        Direction = Enum("Direction", "AS_IS INPUT OUTPUT")
        Bias = Enum("Bias", "AS_IS UNKNOWN DISABLED PULL_UP PULL_DOWN")
        Edge = Enum("Edge", "NONE RISING FALLING BOTH")
    """,
    "gpiod/__init__.py": '''
        """The v2 bindings' shape. A chip is a file holding its label; requests are kept for inspection."""
        import errno, os
        from dataclasses import dataclass
        from enum import Enum
        from . import line
        from .line import Bias, Direction, Edge, Value
        __version__ = "2.2.1"
        requests = []
        busy = set()

        @dataclass
        class LineSettings:
            direction: Direction = Direction.AS_IS
            edge_detection: Edge = Edge.NONE
            bias: Bias = Bias.AS_IS
            active_low: bool = False
            output_value: Value = Value.INACTIVE

        @dataclass(frozen=True)
        class ChipInfo:
            name: str
            label: str
            num_lines: int

        class EdgeEvent:
            Type = Enum("Type", "RISING_EDGE FALLING_EDGE")
            def __init__(self, event_type, timestamp_ns, line_offset):
                self.event_type, self.timestamp_ns, self.line_offset = event_type, timestamp_ns, line_offset

        class Chip:
            def __init__(self, path):
                with open(path) as f:
                    self._label = f.read().strip()
                self.path = path
            def get_info(self): return ChipInfo(os.path.basename(self.path), self._label, 54)
            def __enter__(self): return self
            def __exit__(self, *exc): pass

        class LineRequest:
            """Like the kernel's request, its fd is readable while edges wait to be read (here: a pipe)."""
            def __init__(self, path, consumer, config):
                self.path, self.consumer, self.config = path, consumer, dict(config)
                self.values = {off: s.output_value for off, s in config.items()}
                self.events = []
                self._r, self._w = os.pipe()
            @property
            def fd(self): return self._r
            def set_value(self, offset, value): self.values[offset] = value
            def get_value(self, offset): return self.values[offset]
            def wait_edge_events(self, timeout=None): return bool(self.events)
            def read_edge_events(self, max_events=None):
                out, self.events[:] = list(self.events), []
                if out:
                    os.read(self._r, 4096)
                return out
            def release(self):
                requests.remove(self)
                os.close(self._r)
                os.close(self._w)
            def inject(self, offset, rising, timestamp_ns):
                self.values[offset] = Value.ACTIVE if rising else Value.INACTIVE
                kind = EdgeEvent.Type.RISING_EDGE if rising else EdgeEvent.Type.FALLING_EDGE
                self.events.append(EdgeEvent(kind, timestamp_ns, offset))
                os.write(self._w, b"e")

        def request_lines(path, consumer=None, config=None, **kwargs):
            with Chip(path):
                for offset in config:
                    if offset >= 54:
                        raise ValueError("line offset of out range")
                    if (path, offset) in busy:
                        raise OSError(errno.EBUSY, "Device or resource busy")
            request = LineRequest(path, consumer, config)
            requests.append(request)
            return request
    ''',
}

FAKE_RPI_NOT_A_PI = {
    "RPi/__init__.py": "",
    "RPi/GPIO.py": 'raise RuntimeError("This module can only be run on a Raspberry Pi!")\n',
}

FAKE_RPI = {
    "RPi/__init__.py": "",
    "RPi/GPIO.py": '''
        """RPi.GPIO's module-level API over a dict of levels; _drive() is the outside world."""
        VERSION = "0.7.1"
        BCM, BOARD, OUT, IN, HIGH, LOW = 11, 10, 0, 1, 1, 0
        PUD_OFF, PUD_DOWN, PUD_UP = 20, 21, 22
        RISING, FALLING, BOTH = 31, 32, 33
        RPI_INFO = {"PROCESSOR": "BCM2711", "TYPE": "Pi 4 Model B"}
        mode = None
        setups, levels, callbacks, cleaned = {}, {}, {}, []
        FAIL_SETUP = ""
        FAIL_EVENT_DETECT = False
        def setwarnings(flag): pass
        def setmode(new):
            global mode
            if mode is not None and mode != new:
                raise ValueError("A different mode has already been set!")
            mode = new
        def setup(channel, direction, pull_up_down=PUD_OFF, initial=-1):
            if FAIL_SETUP:
                raise RuntimeError(FAIL_SETUP)
            setups[channel] = (direction, pull_up_down)
            if direction == OUT:
                levels[channel] = initial == HIGH
            else:
                levels.setdefault(channel, pull_up_down == PUD_UP)
        def output(channel, value): levels[channel] = bool(value)
        def input(channel): return HIGH if levels.get(channel) else LOW
        def add_event_detect(channel, edge, callback=None, bouncetime=None):
            if FAIL_EVENT_DETECT:
                raise RuntimeError("Failed to add edge detection")
            callbacks[channel] = callback
        def remove_event_detect(channel): callbacks.pop(channel, None)
        def cleanup(channel=None):
            cleaned.append(channel)
            setups.pop(channel, None)
        def _drive(channel, level):
            levels[channel] = level
            if channel in callbacks:
                callbacks[channel](channel)
    ''',
}


def _purge_libs() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in LIB_ROOTS:
            del sys.modules[name]


@pytest.fixture
def no_libs(monkeypatch):
    """The GPIO libraries absent: they are not installed in this venv; should one be, it is blocked."""
    for name in ("gpiod", "RPi"):
        if importlib.util.find_spec(name) is not None:
            monkeypatch.setitem(sys.modules, name, None)


@pytest.fixture
def fake_libs(tmp_path, monkeypatch):
    """Writes stand-in library packages to a directory on sys.path: ``install(FAKE_GPIOD_V2, ...)``."""
    root = tmp_path / "libs"
    root.mkdir()
    _purge_libs()
    monkeypatch.syspath_prepend(str(root))

    def install(*packages: dict[str, str]) -> None:
        for package in packages:
            for rel, text in package.items():
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(textwrap.dedent(text))
        importlib.invalidate_caches()

    yield install
    _purge_libs()


@pytest.fixture
def chips(tmp_path):
    """A fake /dev with gpiochip files holding labels: ``chips(gpiochip0="pinctrl-rp1")``."""
    dev = tmp_path / "dev"
    dev.mkdir()

    def make(**labels: str) -> str:
        for name, label in labels.items():
            (dev / name).write_text(label + "\n")
        return str(dev)

    return make


# -- selection --------------------------------------------------------------------------------------------


def test_sim_is_chosen_by_name_and_by_the_environment():
    clock = SimClock()
    assert isinstance(make_factory("sim", clock=clock, environ={}), SimPinFactory)
    factory = make_factory("libgpiod", clock=clock, environ={"FIELDNODE_GPIO": "sim"})
    assert isinstance(factory, SimPinFactory) and factory.clock is clock
    assert factory.describe()["backend"] == "sim" and factory.fallbacks == []


def test_unknown_backend_is_named_with_its_source_and_the_choices():
    with pytest.raises(GpioUnavailable, match=r"unknown GPIO backend 'pigpio' \(from the configuration\); choose one of auto, libgpiod, rpigpio, sim"):
        make_factory("pigpio", environ={})
    with pytest.raises(GpioUnavailable, match="'gpio0' \\(from the environment variable FIELDNODE_GPIO\\)"):
        make_factory("auto", environ={"FIELDNODE_GPIO": "gpio0"})


@pytest.mark.parametrize("backend, message", [
    ("libgpiod", r"gpiod package \(libgpiod v2 bindings\) is not installed: pip install 'fieldnode\[gpiod\]'"),
    ("rpigpio", r"RPi.GPIO is not installed: pip install 'fieldnode\[rpigpio\]'"),
])
def test_a_missing_library_names_its_extra(no_libs, backend, message):
    with pytest.raises(GpioUnavailable, match=message):
        make_factory(backend, environ={})


def test_auto_warns_on_fallback_and_fails_naming_both_reasons_and_extras(no_libs):
    with pytest.warns(GpioFallback, match="falling back from GPIO backend libgpiod: the gpiod package"):
        with pytest.raises(GpioUnavailable) as err:
            make_factory("auto", environ={})
    msg = str(err.value)
    assert msg.startswith("no GPIO backend works here: libgpiod: the gpiod package")
    assert "; rpigpio: RPi.GPIO is not installed" in msg
    assert "pip install 'fieldnode[gpiod]' (Pi 5 and newer kernels) or 'fieldnode[rpigpio]'" in msg


def test_gpiod_v1_bindings_are_refused(fake_libs, chips):
    fake_libs(FAKE_GPIOD_V1)
    with pytest.raises(GpioUnavailable) as err:
        LibgpiodFactory(dev_dir=chips(gpiochip0="pinctrl-bcm2711"))
    assert str(err.value) == "gpiod v1 bindings found; fieldnode needs libgpiod v2 (pip install 'gpiod>=2')"
    with pytest.warns(GpioFallback, match="gpiod v1 bindings found"):
        with pytest.raises(GpioUnavailable, match="libgpiod: " + V1_REFUSAL.replace("(", r"\(").replace(")", r"\)")):
            make_factory("auto", environ={})


def test_rpigpio_refusing_a_non_pi_is_reported(fake_libs):
    fake_libs(FAKE_RPI_NOT_A_PI)
    with pytest.raises(GpioUnavailable, match="RPi.GPIO refused to load: This module can only be run on a Raspberry Pi!"):
        make_factory("rpigpio", environ={})


def test_auto_falls_back_to_rpigpio_and_keeps_the_reason(fake_libs):
    fake_libs(FAKE_RPI)
    with pytest.warns(GpioFallback, match="libgpiod"):
        factory = make_factory("auto", environ={})
    assert isinstance(factory, RPiGpioFactory)
    assert len(factory.fallbacks) == 1 and factory.fallbacks[0].startswith("libgpiod: the gpiod package")
    info = factory.describe()
    assert info["backend"] == "rpigpio" and info["chip"] == "BCM2711" and info["version"] == "RPi.GPIO 0.7.1"
    assert info["fallbacks"] == factory.fallbacks
    factory.close()


# -- libgpiod v2 ------------------------------------------------------------------------------------------


def test_chip_is_found_by_label_with_the_pi5_label_preferred(fake_libs, chips):
    fake_libs(FAKE_GPIOD_V2)
    dev = chips(gpiochip0="pinctrl-bcm2711", gpiochip4="pinctrl-rp1", gpiochip10="rp1-extra")
    factory = LibgpiodFactory(dev_dir=dev)
    assert factory.path.endswith("/gpiochip4") and factory.label == "pinctrl-rp1"
    assert factory.describe() == {
        "backend": "libgpiod", "chip": "pinctrl-rp1", "path": factory.path, "version": "2.2.1", "fallbacks": [],
    }
    assert LibgpiodFactory("pinctrl-bcm2711", dev_dir=dev).path.endswith("/gpiochip0")


def test_no_chip_with_the_label_lists_what_was_found(fake_libs, chips):
    fake_libs(FAKE_GPIOD_V2)
    dev = chips(gpiochip0="gpio-sim", gpiochip1="tegra234-gpio")
    with pytest.raises(GpioUnavailable) as err:
        LibgpiodFactory(dev_dir=dev)
    msg = str(err.value)
    assert "no GPIO chip labelled 'pinctrl-rp1' or 'pinctrl-bcm2711' or 'pinctrl-bcm2835'" in msg
    assert "gpiochip0 is 'gpio-sim'" in msg and "gpiochip1 is 'tegra234-gpio'" in msg
    assert "set the chip label in the configuration" in msg
    with pytest.raises(GpioUnavailable, match="no GPIO chip labelled 'my-hat'"):
        LibgpiodFactory("my-hat", dev_dir=dev)


def test_no_gpiochip_devices_at_all(fake_libs, chips):
    fake_libs(FAKE_GPIOD_V2)
    with pytest.raises(GpioUnavailable, match=r"there is no .*gpiochip\* device"):
        LibgpiodFactory(dev_dir=chips())


def test_libgpiod_lines_use_the_v2_request_api(fake_libs, chips):
    fake_libs(FAKE_GPIOD_V2)
    import gpiod

    clock = SimClock(start=3.0)
    factory = LibgpiodFactory(clock=clock, dev_dir=chips(gpiochip0="pinctrl-bcm2711"))
    led = factory.output(17, initial=True)
    request = gpiod.requests[-1]
    assert request.consumer == "fieldnode" and request.path == factory.path
    assert request.config[17].direction is gpiod.line.Direction.OUTPUT
    assert request.values[17] is gpiod.line.Value.ACTIVE and led.value is True
    led.value = False
    assert request.values[17] is gpiod.line.Value.INACTIVE and led.value is False

    button = factory.input(27, Pull.UP)
    settings = gpiod.requests[-1].config[27]
    assert settings.direction is gpiod.line.Direction.INPUT
    assert settings.edge_detection is gpiod.line.Edge.BOTH and settings.bias is gpiod.line.Bias.PULL_UP
    gpiod.requests[-1].inject(27, rising=True, timestamp_ns=1)
    gpiod.requests[-1].inject(27, rising=False, timestamp_ns=2)
    assert button.wait_edge(1.0) is Edge.RISING
    assert button.poll() == [EdgeEvent(Edge.FALLING, 3.0)]  # stamped on the injected (simulated) clock
    assert button.value is False and button.wait_edge(0) is None

    factory.close()
    assert gpiod.requests == [] and led.closed and button.closed


def test_libgpiod_wake_ends_a_wait_on_the_request_fd(fake_libs, chips):
    fake_libs(FAKE_GPIOD_V2)
    import gpiod

    factory = LibgpiodFactory(dev_dir=chips(gpiochip0="pinctrl-rp1"))
    button = factory.input(27)
    assert button.can_wake
    button.wake()  # before the wait: kept for it, so a thread told to stop just before waiting still stops
    assert button.wait_edge(600.0) is None
    assert button.poll() == []  # a look without waiting leaves a wake-up alone
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(button.wait_edge(600.0)))
    waiter.start()
    button.wake()
    waiter.join(30)
    assert not waiter.is_alive() and got == [None]
    gpiod.requests[-1].inject(27, rising=True, timestamp_ns=5)
    assert button.wait_edge(600.0) is Edge.RISING  # the wake-ups are used up: edges come through again
    factory.close()
    button.wake()  # closed: nothing to wake, no error


def test_libgpiod_request_errors_name_the_pin_and_cause(fake_libs, chips):
    fake_libs(FAKE_GPIOD_V2)
    import gpiod

    factory = LibgpiodFactory(dev_dir=chips(gpiochip0="pinctrl-rp1"))
    with pytest.raises(GpioError, match=r"pin 60 does not exist on .*gpiochip0 \(pinctrl-rp1\)"):
        factory.output(60)
    gpiod.busy.add((factory.path, 5))
    with pytest.raises(GpioError, match="pin 5 on .*gpiochip0 is in use by another program"):
        factory.input(5)


# -- RPi.GPIO ---------------------------------------------------------------------------------------------


def test_rpigpio_outputs_inputs_and_interrupt_edges(fake_libs):
    fake_libs(FAKE_RPI)
    clock = SimClock(start=7.0)
    factory = RPiGpioFactory(clock=clock)
    gpio = factory.gpio
    assert gpio.mode == gpio.BCM
    led = factory.output(18, initial=True)
    assert gpio.setups[18] == (gpio.OUT, gpio.PUD_OFF) and gpio.levels[18] is True
    led.off()
    assert gpio.levels[18] is False and led.value is False

    pir = factory.input(4, Pull.DOWN)
    assert pir.edge_mode == "interrupt" and gpio.setups[4] == (gpio.IN, gpio.PUD_DOWN)
    gpio._drive(4, True)
    gpio._drive(4, False)
    assert pir.poll() == [EdgeEvent(Edge.RISING, 7.0), EdgeEvent(Edge.FALLING, 7.0)]
    gpio._drive(4, False)  # a pulse too short to read: the callback sees the old level again
    assert [e.edge for e in pir.poll()] == [Edge.RISING, Edge.FALLING]

    factory.close()
    assert sorted(gpio.cleaned) == [4, 18] and gpio.callbacks == {}


def test_rpigpio_polls_levels_when_edge_detection_fails(fake_libs):
    fake_libs(FAKE_RPI)
    gpio = importlib.import_module("RPi.GPIO")
    gpio.FAIL_EVENT_DETECT = True
    clock = SimClock()
    factory = RPiGpioFactory(clock=clock)
    button = factory.input(27, Pull.UP)
    assert button.edge_mode == "polling" and button.value is True
    assert button.wait_edge(0.5) is None and clock.monotonic() == pytest.approx(0.5)
    gpio.levels[27] = False
    assert button.wait_edge(0.5) is Edge.FALLING
    gpio.levels[27] = True
    assert button.poll() == [EdgeEvent(Edge.RISING, clock.monotonic())]
    factory.close()


@pytest.mark.parametrize("polling", [False, True])
def test_rpigpio_wake_ends_a_wait(fake_libs, polling):
    fake_libs(FAKE_RPI)
    gpio = importlib.import_module("RPi.GPIO")
    gpio.FAIL_EVENT_DETECT = polling
    clock = SimClock()
    factory = RPiGpioFactory(clock=clock)
    button = factory.input(27, Pull.DOWN)
    assert button.can_wake and button.edge_mode == ("polling" if polling else "interrupt")
    button.wake()
    assert button.wait_edge(600.0) is None
    assert clock.monotonic() < 600.0  # ended by the wake-up, not by the timeout
    gpio._drive(27, True)
    assert button.wait_edge(600.0) is Edge.RISING
    factory.close()


def test_rpigpio_on_a_pi5_names_the_gpiod_extra(fake_libs):
    fake_libs(FAKE_RPI)
    importlib.import_module("RPi.GPIO").FAIL_SETUP = "Cannot determine SOC peripheral base address"
    factory = RPiGpioFactory()
    with pytest.raises(GpioUnavailable, match=r"cannot set up an output on pin 17: Cannot determine SOC .*Raspberry Pi 5; pip install 'fieldnode\[gpiod\]'"):
        factory.output(17)


def test_rpigpio_in_board_mode_already_is_an_error(fake_libs):
    fake_libs(FAKE_RPI)
    gpio = importlib.import_module("RPi.GPIO")
    gpio.setmode(gpio.BOARD)
    with pytest.raises(GpioError, match="already in another numbering mode"):
        RPiGpioFactory()


def test_rpi_lgpio_shim_is_recognised(fake_libs):
    shim = dict(FAKE_RPI)
    shim["RPi/GPIO.py"] = "import lgpio\n" + textwrap.dedent(FAKE_RPI["RPi/GPIO.py"])
    fake_libs(shim, {"lgpio.py": "VERSION = '0.2.2.0'\n"})
    assert RPiGpioFactory().describe()["version"] == "rpi-lgpio 0.7.1"


# -- the simulated backend --------------------------------------------------------------------------------


def test_sim_records_output_changes_with_clock_timestamps():
    clock = SimClock(start=10.0)
    factory = SimPinFactory(clock=clock)
    led = factory.output(5)
    clock.advance(0.5)
    led.on()
    led.on()  # no change, nothing recorded
    clock.advance(0.25)
    led.value = False
    assert factory.states(5) == [(10.0, False), (10.5, True), (10.75, False)]
    factory.assert_states(5, [False, True, False])
    with pytest.raises(AssertionError, match=r"pin 5: expected states \[True\], recorded \[False, True, False\]"):
        factory.assert_states(5, [True])
    assert factory.states(6) == []


def test_sim_inputs_read_their_pull_and_queue_driven_edges():
    clock = SimClock()
    factory = SimPinFactory(clock=clock)
    button = factory.input(27, Pull.UP)
    floating = factory.input(22)
    assert button.value is True and floating.value is False
    clock.advance(1.0)
    factory.drive_low(27)
    factory.drive_low(27)  # already low: no edge
    clock.advance(0.2)
    factory.drive_high(27)
    assert button.value is True
    assert button.wait_event(5.0) == EdgeEvent(Edge.FALLING, 1.0)
    assert button.poll() == [EdgeEvent(Edge.RISING, 1.2)]
    assert button.poll() == []
    assert clock.monotonic() == 1.2  # pending edges return at once


def test_sim_wait_without_an_edge_lets_simulated_time_pass():
    clock = SimClock()
    line = SimPinFactory(clock=clock).input(4)
    assert line.wait_edge(2.5) is None
    assert clock.monotonic() == pytest.approx(2.5)
    assert line.wait_edge(0) is None and clock.monotonic() == pytest.approx(2.5)


def test_sim_drive_before_request_sets_the_initial_level():
    factory = SimPinFactory(clock=SimClock())
    factory.drive_high(9)
    line = factory.input(9, Pull.DOWN)
    assert line.value is True and line.poll() == []


def test_sim_pins_are_exclusive_and_reusable_after_close():
    factory = SimPinFactory(clock=SimClock())
    led = factory.output(5)
    with pytest.raises(GpioError, match=r"pin 5 is already in use \(requested as an output\)"):
        factory.input(5)
    with pytest.raises(GpioError, match="pin 5 is an output of the agent; the simulation cannot drive it"):
        factory.drive_high(5)
    assert factory.in_use() == {5: "output"}
    led.close()
    led.close()
    with pytest.raises(GpioError, match="pin 5: the line is closed"):
        led.value = True
    assert factory.input(5).value is False and factory.in_use() == {5: "input"}
    factory.close()
    assert factory.in_use() == {}


def test_sim_unread_edges_are_bounded():
    factory = SimPinFactory(clock=SimClock())
    line = factory.input(3)
    for i in range(simgpio.MAX_PENDING + 6):
        (factory.drive_high if i % 2 == 0 else factory.drive_low)(3)
    assert len(line.poll()) == simgpio.MAX_PENDING and line.dropped == 6


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda f: f.output(-1), "pin must be a BCM number between 0 and 1023, got -1"),
        (lambda f: f.output("17"), "pin must be a BCM number \\(int\\), got '17'"),
        (lambda f: f.input(True), "pin must be a BCM number \\(int\\), got True"),
        (lambda f: f.input(4, "up"), "pull must be Pull.NONE, Pull.UP or Pull.DOWN, got 'up'"),
        (lambda f: f.input(4).wait_edge(-1), "timeout must be a finite number of seconds >= 0, got -1"),
        (lambda f: f.input(4).wait_event(float("nan")), "timeout must be a finite number of seconds >= 0, got nan"),
        (lambda f: setattr(f.output(4), "value", "on"), "pin 4: an output value must be True or False, got 'on'"),
        (lambda f: setattr(f.output(4), "value", 2), "pin 4: an output value must be True or False, got 2"),
        (lambda f: f.drive_low(2000), "pin must be a BCM number between 0 and 1023, got 2000"),
    ],
)
def test_malformed_arguments_are_named(call, message):
    with pytest.raises(GpioError, match=message):
        call(SimPinFactory(clock=SimClock()))


def test_sim_wake_ends_a_wait_on_either_clock():
    clock = SimClock()
    line = SimPinFactory(clock=clock).input(17)
    line.wake()
    assert line.wait_edge(600.0) is None and clock.monotonic() == 0.0  # no simulated time went by
    assert line.wait_edge(0.5) is None and clock.monotonic() == pytest.approx(0.5)  # used up by the first wait
    real = SimPinFactory().input(17)  # the system clock: the wait blocks on the line, not in steps
    got: list[Edge | None] = []
    waiter = threading.Thread(target=lambda: got.append(real.wait_edge(600.0)))
    waiter.start()
    real.wake()
    waiter.join(30)
    assert not waiter.is_alive() and got == [None]


def test_sim_edge_wakes_a_waiting_thread():
    # Real time here: a thread blocked in wait_edge sees an edge driven from another thread.
    factory = SimPinFactory(step_s=0.001)
    line = factory.input(17)
    got: list[Edge | None] = []
    waiting = threading.Event()

    def waiter() -> None:
        waiting.set()
        got.append(line.wait_edge(30.0))

    thread = threading.Thread(target=waiter)
    thread.start()
    waiting.wait(30)
    factory.drive_high(17)
    thread.join(30)
    assert not thread.is_alive() and got == [Edge.RISING]
