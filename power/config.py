"""``[power]``: the governor's declarative policy.

Four levels, from least to most restrictive: ``performance``, ``balanced``, ``saver``, ``critical``. Each
level past ``performance`` is entered when the SoC temperature (or its prediction ``predict_s`` ahead) reaches
``enter_temp_c``, or the battery falls to ``enter_battery_pct`` while not charging. Each level says what the
agent may do there: a CPU frequency cap, interpreter threads, the model variant, the inference interval (the
duty cycle) and the telemetry period. :meth:`PowerConfig.validate` states the rules across keys (thresholds
must grow more severe level by level); the config loader runs it, and so does :class:`power.policy.Policy`.
"""

from __future__ import annotations

from dataclasses import dataclass

from device.configschema import section, setting

_VARIANT = dict(pattern=r"(?s).*\S.*", expect="'auto', 'cheapest' or a variant name")


@dataclass(frozen=True)
class PerformanceLevel:
    """``[power.performance]``: the unrestricted level."""

    freq_pct: float = setting(100.0, "CPU frequency cap, percent of the maximum.", minimum=1, maximum=100)
    threads: int = setting(0, "Interpreter threads; 0 means one per CPU.", minimum=0, maximum=64)
    variant: str = setting("auto", "Model variant: auto (the runtime picks), cheapest, or a variant name.", **_VARIANT)
    interval_ms: int = setting(0, "Minimum time between inferences; 0 means as often as windows arrive.",
                               minimum=0, maximum=3600000)
    telemetry_s: float = setting(10.0, "Telemetry period.", minimum=1, maximum=86400)


def _level(name: str, temp_: float, battery_: float, freq_: float, threads_: int, variant_: str, interval_: int,
           telemetry_: float, doc: str) -> type:
    # (trailing underscores: a class body cannot read an enclosing name it also assigns)
    @dataclass(frozen=True)
    class Level:
        enter_temp_c: float = setting(temp_, f"Enter {name} at this SoC temperature (or its prediction).",
                                      minimum=20, maximum=150)
        enter_battery_pct: float = setting(battery_, f"Enter {name} at this battery charge when not charging.",
                                           minimum=0, maximum=100)
        freq_pct: float = setting(freq_, "CPU frequency cap, percent of the maximum.", minimum=1, maximum=100)
        threads: int = setting(threads_, "Interpreter threads; 0 means one per CPU.", minimum=0, maximum=64)
        variant: str = setting(variant_, "Model variant: auto (the runtime picks), cheapest, or a variant name.",
                               **_VARIANT)
        interval_ms: int = setting(interval_, "Minimum time between inferences; 0 means as often as windows arrive.",
                                   minimum=0, maximum=3600000)
        telemetry_s: float = setting(telemetry_, "Telemetry period.", minimum=1, maximum=86400)

    Level.__name__ = Level.__qualname__ = f"{name.capitalize()}Level"
    Level.__doc__ = f"``[power.{name}]``: {doc}"
    return Level


BalancedLevel = _level("balanced", 80.0, 50.0, 80.0, 0, "cheapest", 0, 30.0,
                       "the cheap variant at full duty, a little slower and cooler.")
SaverLevel = _level("saver", 82.0, 25.0, 60.0, 2, "cheapest", 100, 60.0, "the cheap variant, duty-cycled.")
CriticalLevel = _level("critical", 84.0, 10.0, 40.0, 1, "cheapest", 1000, 300.0, "keep the board alive.")


@dataclass(frozen=True)
class PowerConfig:
    """``[power]``: the power governor."""

    enabled: bool = setting(True, "Run the governor; false leaves the board at the performance level.")
    planner: bool = setting(
        True, "On battery, and wherever the thermal trim binds, pick the variant, threads and frequency by what "
              "each was measured to cost on this board (power.planner); false: the levels' settings alone.")
    runtime_target_h: float = setting(
        0.0, "How many hours the battery must last from the agent's start (0: no target). The planner spends the "
             "energy left over the time left; the signed `governor.target` command changes it at run time.",
        minimum=0, maximum=8760)
    step_s: float = setting(5.0, "How often the governor reads the board and re-plans.", minimum=0.1, maximum=3600)
    dwell_s: float = setting(60.0, "Minimum time at a level before relaxing to a less restrictive one.",
                             minimum=0, maximum=86400)
    predict_s: float = setting(30.0, "How far ahead a rising temperature is extrapolated.", minimum=0, maximum=3600)
    slope_window_s: float = setting(30.0, "Temperature history the slope is fitted over.", minimum=1, maximum=3600)
    temp_hysteresis_c: float = setting(3.0, "How far below its entry temperature a level is left.",
                                       minimum=0, maximum=50)
    battery_hysteresis_pct: float = setting(5.0, "How far above its entry charge a level is left.",
                                            minimum=0, maximum=50)
    thermal_target_c: float = setting(
        79.5, "The thermal trim lowers the frequency cap one step at a time to keep the predicted "
              "temperature under this.", minimum=20, maximum=150)
    follow_board_limit: bool = setting(
        True, "The temperatures here are for a board that throttles itself at 80 C (every Raspberry Pi); they move "
              "by the difference on a board whose SoC thermal zone has another passive trip point (a Jetson). "
              "false: they are absolute.")
    trim_hysteresis_c: float = setting(0.5, "The trim gives a step back once this far under the target.",
                                       minimum=0, maximum=50)
    trim_dwell_s: float = setting(20.0, "Minimum time between two trim steps back up.", minimum=0, maximum=86400)
    performance: PerformanceLevel = section(PerformanceLevel, "The performance level.")
    balanced: BalancedLevel = section(BalancedLevel, "The balanced level.")
    saver: SaverLevel = section(SaverLevel, "The saver level.")
    critical: CriticalLevel = section(CriticalLevel, "The critical level.")

    def validate(self) -> list[tuple[str, str]]:
        """The rules no single key can check; the config loader runs this after the per-key checks.

        Returns:
            ``(key path, message)`` per problem: an entry threshold that does not grow more severe from one
            level to the next (temperatures rise, battery charges fall), or a thermal target that is not below
            the first temperature threshold.
        """
        problems = []
        names = ("balanced", "saver", "critical")
        for a, b in zip(names, names[1:]):
            prev, cur = getattr(self, a), getattr(self, b)
            if cur.enter_temp_c <= prev.enter_temp_c:
                problems.append((f"power.{b}.enter_temp_c", f"must be above power.{a}.enter_temp_c "
                                 f"({prev.enter_temp_c:g}), got {cur.enter_temp_c:g}"))
            if cur.enter_battery_pct >= prev.enter_battery_pct:
                problems.append((f"power.{b}.enter_battery_pct", f"must be below power.{a}.enter_battery_pct "
                                 f"({prev.enter_battery_pct:g}), got {cur.enter_battery_pct:g}"))
        first = self.balanced.enter_temp_c
        if self.thermal_target_c >= first:
            problems.append(("power.thermal_target_c", f"must be below power.balanced.enter_temp_c ({first:g}) so "
                             f"the trim acts before the levels do, got {self.thermal_target_c:g}"))
        return problems
