"""Diag checks of the hardware: the sensor, GPIO and the LED, temperatures, battery, throttling, cpufreq, accelerators.

Everything is read through the drivers the agent uses. With ``--sim`` the board is a fresh virtual board (its
sysfs tree, the simulated sensor MCU on a pseudo-terminal, the simulated GPIO backend) and every detail here
reads as simulated; without it, hardware that is absent is SKIP or FAIL with the reason, never simulated.
The sensor port and the GPIO lines belong to the running agent: when it answers, they are read from its
status instead of being opened a second time.
"""

from __future__ import annotations

import tempfile
import time

from device.diag.checks import FAIL, RUN_ALL, Check, fail, ok, register, skip, warn, worst

SIM = "SIMULATED "
HOT_MARGIN_C = 5.0  # below a zone's critical trip: about to shut down
RATE_MIN = 0.8  # of the rate the MCU announces


def _sim(ctx) -> str:
    return f"{SIM}board {ctx.sim}: " if ctx.sim else ""


# ------------------------------------------------------------------------------------------------- sensor


def _port_remedy(error: str, url: str) -> str:
    e = error.lower()
    if "permission denied" in e:
        return "add the fieldnode user to the dialout group (the installed units do), then restart the agent"
    if "no such file" in e or "could not open port" in e or "not found" in e:
        return f"check the sensor's cable and drivers.sensor_url ({url}; ls -l /dev/serial/by-id lists the ports)"
    if "busy" in e:
        return f"another process holds {url}: stop it (fuser {url} names it)"
    return f"check drivers.sensor_url ({url}) and the sensor's cable"


def sample_sensor(url: str, baudrate: int, timeout_s: float, sample_s: float) -> tuple:
    """Opens the port with the agent's driver and reads frames for ``sample_s``.

    Returns:
        ``(health, seconds sampled)``; stops early when the port cannot be opened.
    """
    from drivers.sensor import SerialSensor

    sensor = SerialSensor(url, baudrate=baudrate, read_timeout_s=timeout_s)
    t0 = time.monotonic()
    sensor.start()
    try:
        # A port that does not open says so at once; otherwise read for the whole sample.
        sensor.wait_until(lambda h: not h.connected and h.open_failures > 0, timeout=min(0.2, sample_s))
        h = sensor.health()
        if h.connected or not h.open_failures:
            time.sleep(max(0.0, sample_s - (time.monotonic() - t0)))
        return sensor.health(), time.monotonic() - t0
    finally:
        sensor.stop()


def judge_sample(h, seconds: float, url: str, prefix: str = "") -> Check:
    """The verdict on a sample: the port opened, frames arrived at the announced rate, few errors."""
    if not h.frames:
        if not h.connected and h.open_failures:
            return fail("sensor", f"{prefix}{h.last_error}", _port_remedy(h.last_error or "", url))
        return fail("sensor", f"{prefix}{url} opened, but no frame arrived in {seconds:.1f} s",
                    "check the sensor MCU is powered and drivers.sensor_baudrate matches its firmware")
    rate = h.samples / seconds if seconds > 0 else 0.0
    hello = h.hello
    detail = (f"{prefix}{url}: {h.frames} frames, {rate:.0f} samples/s"
              + (f" (MCU announces {hello.sample_rate_hz} Hz, firmware {hello.firmware})" if hello else "")
              + f", {h.crc_errors} CRC errors, {h.seq_gaps} gaps ({h.dropped_frames} frames lost) in {seconds:.1f} s")
    # Joining a stream mid-frame may cost one frame: a single error or gap at the start is not a fault.
    if h.crc_errors + h.length_errors > 1:
        return warn("sensor", detail, "check the serial wiring and ground, and that drivers.sensor_baudrate "
                                      "matches the MCU (CRC errors are corrupted bytes)")
    if h.seq_gaps > 1:
        return warn("sensor", detail, "frames are lost: the UART overruns (a lower sample rate, or a faster "
                                      "baud rate on both ends) or the board is overloaded")
    if hello and rate < RATE_MIN * hello.sample_rate_hz * (seconds - 0.3) / seconds:
        return warn("sensor", detail, "the MCU sends slower than it announces: check its power and firmware")
    return ok("sensor", detail)


@register("sensor")
def check_sensor(ctx) -> Check:
    d = ctx.cfg.drivers
    sample_s = min(ctx.sample_s, max(0.2, ctx.remaining() - 1.0))
    if ctx.sim:
        from drivers.sim.mcu import SimulatedMcu
        from drivers.sim.signal import VibrationSource

        with tempfile.TemporaryDirectory(prefix="fieldnode-diag-mcu-") as tmp:
            mcu = SimulatedMcu(VibrationSource(seed=7), link_dir=tmp)
            try:
                mcu.start()  # live, at the source's rate, as on the agent's virtual board
                h, seconds = sample_sensor(mcu.port, d.sensor_baudrate, d.sensor_timeout_s, sample_s)
            finally:
                mcu.close()
        return judge_sample(h, seconds, mcu.port, prefix=f"{SIM}sensor MCU on a pty, ")
    if not d.sensor_url:
        return skip("sensor", "drivers.sensor_url is empty (the config check says what fieldnode run needs)")
    status, why = ctx.agent()
    health = status.get("sensor") if status else None
    if isinstance(health, dict):
        return _from_agent(health, d.sensor_url, why)
    held = ctx.held_by_agent("sensor")  # two readers would split the agent's byte stream
    if held is not None:
        return held
    verdict = judge_sample(*sample_sensor(d.sensor_url, d.sensor_baudrate, d.sensor_timeout_s, sample_s),
                           d.sensor_url)
    if verdict.status == FAIL and "permission denied" in verdict.detail.lower() and ctx.who.not_the_service:
        # The port is the service's (group dialout): this user's refusal says nothing of the service's access.
        return skip("sensor", f"{verdict.detail}: that is the permission of {ctx.who.user}, not of the service "
                              f"(whose user is in the group dialout); {RUN_ALL} opens the port")
    return verdict


def _from_agent(h: dict, url: str, why: str) -> Check:
    detail = (f"{url} (held by the agent; {why}): {h.get('state')}, {h.get('frames')} frames, "
              f"{h.get('crc_errors')} CRC errors, {h.get('seq_gaps')} gaps, {h.get('reconnects')} reconnects")
    if h.get("state") in ("disconnected", "stale"):
        error = h.get("last_error") or ""
        return fail("sensor", f"{detail}; {error}".rstrip("; "), _port_remedy(error, url) if error else
                    "check the sensor MCU is powered and drivers.sensor_baudrate matches its firmware")
    frames = h.get("frames") or 0
    if frames and (h.get("crc_errors") or 0) > max(1, frames // 1000):
        return warn("sensor", detail, "check the serial wiring and ground, and the baud rate on both ends")
    return ok("sensor", detail)


# --------------------------------------------------------------------------------------------------- gpio


@register("gpio")
def check_gpio(ctx) -> Check:
    from drivers.errors import GpioError
    from drivers.gpio import make_factory

    d = ctx.cfg.drivers
    pins = {"led_pin": d.led_pin, "trigger_pin": d.trigger_pin, "power_good_pin": d.power_good_pin}
    wired = {k: v for k, v in pins.items() if v >= 0}
    if not ctx.sim and not wired:
        return skip("gpio", "no GPIO lines configured (drivers.led_pin, trigger_pin and power_good_pin are -1)")
    status, why = ctx.agent()
    hw = status.get("hardware") if status and not ctx.sim else None
    if isinstance(hw, dict):  # the agent holds the lines
        gpio = hw.get("gpio") or {}
        detail = f"held by the agent ({why}): backend {gpio.get('backend')}, LED shows {hw.get('led')}"
        if gpio.get("fallbacks"):
            return warn("gpio", f"{detail}; fell back: {'; '.join(gpio['fallbacks'])}",
                        "install the preferred backend: pip install 'fieldnode[gpiod]'")
        return ok("gpio", detail)
    held = ctx.held_by_agent("gpio")
    if held is not None:
        return held
    try:
        factory = make_factory("sim" if ctx.sim else d.gpio, chip_label=d.gpio_chip_label)
    except GpioError as exc:
        return fail("gpio", str(exc), "install a GPIO backend: pip install 'fieldnode[gpiod]' (or [rpigpio])")
    try:
        info = factory.describe()
        found = []
        if info.get("fallbacks"):
            found.append(warn("gpio", f"fell back to {info['backend']}: {'; '.join(info['fallbacks'])}",
                              "install the preferred backend: pip install 'fieldnode[gpiod]'"))
        if d.led_pin >= 0:
            found.append(_blink(factory, d.led_pin, d.led_active_low))
        chip = f", chip {info['chip']}" if info.get("chip") else ""
        lines = ", ".join(f"{k} {v}" for k, v in wired.items()) or "no lines configured"
        return worst("gpio", found, f"{_sim(ctx)}backend {info['backend']}{chip}; {lines}")
    finally:
        factory.close()


def _blink(factory, pin: int, active_low: bool) -> Check:
    from drivers.errors import GpioError

    try:
        line = factory.output(pin, initial=active_low)  # dark
    except GpioError as exc:
        return fail("gpio", f"LED line {pin}: {exc}", "free the line (is another program using it?) or fix "
                                                      "drivers.led_pin")
    try:
        seen = []
        for on in (True, False):
            line.value = on != active_low
            time.sleep(0.1)  # a technician watching sees the LED flash once
            seen.append(line.value == (on != active_low))
    finally:
        line.close()
    if not all(seen):
        return fail("gpio", f"LED line {pin} does not hold the level written to it",
                    "check drivers.led_pin is an output line, not used by an overlay")
    return ok("gpio", f"LED on line {pin} flashed once")


# ------------------------------------------------------------------------------------- thermal and battery


@register("thermal", needs_config=False)
def check_thermal(ctx) -> Check:
    from drivers import thermal

    zones = thermal.read_zones(ctx.fs)
    if not zones:
        return skip("thermal", f"{_sim(ctx)}no thermal zones under {ctx.fs.root}")
    temp, source = thermal.soc_temperature(zones)
    if temp is None:
        return warn("thermal", f"{_sim(ctx)}{len(zones)} thermal zone(s), none with a believable temperature",
                    "the thermal driver is broken or missing (the governor cannot protect the board): check the "
                    "kernel's thermal support")
    zone = next((z for z in zones if z.type == source), None)
    critical = zone.trip_c("critical") if zone is not None else None
    passive = zone.trip_c("passive") if zone is not None else None
    limit = critical if critical is not None else 85.0
    detail = f"{_sim(ctx)}{temp:.1f} C ({source})" + (f", critical at {critical:.0f} C" if critical else "")
    if temp >= limit - HOT_MARGIN_C:
        return fail("thermal", f"{detail}: about to shut down", "cool the board: a heatsink or fan, shade, "
                                                              "ventilation; the governor caps the CPU meanwhile")
    hot = min(x for x in (passive, ctx.cfg.power.saver.enter_temp_c) if x is not None)
    if temp >= hot:
        return warn("thermal", f"{detail}: running hot", "improve cooling (heatsink, fan, airflow); fieldnode power "
                                                         "status shows the level the governor chose")
    return ok("thermal", detail)


@register("battery", needs_config=False)
def check_battery(ctx) -> Check:
    from drivers import power_supply

    p = power_supply.read_power(ctx.fs)
    b = p.battery
    if b is None:
        ext = "" if p.external is None else f"; external supply {p.external.name} online {p.external.online}"
        return skip("battery", f"{_sim(ctx)}no battery on this board{ext}")
    pct = b.capacity_pct
    detail = f"{_sim(ctx)}battery {b.name}: {'unknown' if pct is None else f'{pct:.0f} %'}, {b.status or 'status unknown'}" \
             + (f", {b.voltage_v:.2f} V" if b.voltage_v is not None else "")
    if pct is None or not 0 <= pct <= 100 or (b.voltage_v is not None and not 2.5 <= b.voltage_v <= 60):
        return warn("battery", f"{detail}: implausible reading", "check the fuel gauge's driver and wiring")
    if pct <= ctx.cfg.power.critical.enter_battery_pct and p.charging is not True:
        return warn("battery", f"{detail}: nearly empty", "connect mains or replace the battery; the governor is "
                                                          "in its critical level meanwhile")
    return ok("battery", detail)


@register("throttle", needs_config=False)
def check_throttle(ctx) -> Check:
    from drivers import throttle

    flags = throttle.read_throttled(ctx.fs, timeout_s=ctx.remaining(2.0))
    if flags is None:
        return skip("throttle", f"{_sim(ctx)}no firmware throttle flags (not a Raspberry Pi, or vcgencmd missing)")
    text = f"{_sim(ctx)}{flags.describe()} since boot (get_throttled 0x{flags.raw:x})"
    if flags.under_voltage:
        return fail("throttle", text, "use a stronger power supply and a short, thick cable (Pi 4: 5.1 V 3 A; "
                                      "Pi 5: 5.1 V 5 A)")
    if flags.throttled or flags.freq_capped or flags.soft_temp_limit:
        return warn("throttle", text, "the firmware slows the CPU: improve cooling (see the thermal check)")
    if flags.occurred_only:
        return warn("throttle", text, "it happened since boot: check the supply (under-voltage) or the cooling")
    return ok("throttle", text)


@register("cpufreq", needs_config=False)
def check_cpufreq(ctx) -> Check:
    import os

    from drivers.cpufreq import CPUFREQ_DIR, PERMISSION_REMEDY, CpuFreq

    policies = CpuFreq(ctx.fs).policies()
    if not policies:
        return skip("cpufreq", f"{_sim(ctx)}no cpufreq policies (the governor cannot cap the CPU here)")
    locked = [p.name for p in policies
              if not os.access(ctx.fs.path(f"{CPUFREQ_DIR}/{p.name}/scaling_max_freq"), os.W_OK)]
    detail = "; ".join(f"{p.name} {p.min_khz // 1000}-{p.max_khz // 1000} MHz, cap "
                       f"{(p.scaling_max_khz or 0) // 1000} MHz, {p.governor}" for p in policies)
    if locked:
        return warn("cpufreq", f"{_sim(ctx)}{detail}; scaling_max_freq of {', '.join(locked)} is not writable by "
                               f"this user", PERMISSION_REMEDY)
    return ok("cpufreq", f"{_sim(ctx)}{detail}; writable")


@register("accelerators", needs_config=False)
def check_accelerators(ctx) -> Check:
    return ok("accelerators", _sim(ctx) + "; ".join(ctx.accelerators().summary()))
