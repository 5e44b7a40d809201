"""The virtual board: a live fake sysfs tree driven by simulated physics.

:class:`VirtualBoard` writes the nodes a real Raspberry Pi or Jetson exposes (thermal zones, power
supplies, cpufreq policy, the Pi firmware's throttle flags, device-tree model, cpuinfo, optionally an INA2xx
power meter) into a directory, and updates them as simulated time passes. The agent's drivers read that
directory through a :class:`drivers.sysfs.Sysfs` root exactly as they read ``/`` on a board, and what the agent
writes (``scaling_max_freq``, ``scaling_governor``, the governors' tunables) changes the physics, so the
governor is tested in a real closed loop:

* **Frequency** is the kernel cpufreq governor's (:mod:`drivers.sim.kernelgov`: performance, powersave,
  userspace, ondemand, schedutil) under ``scaling_max_freq`` and the firmware's own cap.
* **Power** follows frequency and busy cores (:mod:`drivers.sim.profiles`).
* **Temperature** is a lumped first-order model: it relaxes towards ``ambient + R * P`` with time constant
  ``tau``. The firmware throttles by itself at the profile's soft and hard limits, and reports it in
  ``get_throttled`` the way the Pi firmware does.
* **Battery** (optional): a Li-ion cell discharged by the power drawn through a converter, charged from mains
  or by a solar panel's surplus (:mod:`drivers.sim.solar`); an empty battery stops the board
  (:attr:`VirtualBoard.alive`, :attr:`VirtualBoard.brownout`).
* **Load** (:mod:`drivers.sim.workload`): sensor windows at a fixed rate served FIFO with a deadline
  (:meth:`VirtualBoard.set_windows`), a continuous inference demand (:meth:`VirtualBoard.set_demand`), or real
  work reported by the agent (:meth:`VirtualBoard.record_busy`).
* **Sensor MCU** (optional): :class:`drivers.sim.mcu.SimulatedMcu` on a pseudo-terminal, fed in step with
  simulated time.

Static governors (performance, powersave, userspace) hold one frequency per step and the load is an exact
fluid average over it, which keeps long static runs fast. Sampling governors (ondemand, schedutil) run in
substeps of their sampling period with discrete window arrivals, so a burst lands in the sample it falls in.

Time is a :class:`drivers.sim.clock.SimClock` by default: :meth:`VirtualBoard.advance` runs hours of board
time in seconds. :meth:`VirtualBoard.start` instead steps it against the real clock for live demos.
"""

from __future__ import annotations

import math
import os
import random
import threading
from dataclasses import dataclass

from drivers.sim import kernelgov
from drivers.sim.clock import SimClock
from drivers.sim.profiles import BoardProfile, get_profile
from drivers.sim.solar import SolarPanel
from drivers.sim.workload import Workload
from drivers.sysfs import Sysfs

CPUFREQ = "sys/devices/system/cpu/cpufreq/policy0"
ONDEMAND_DIR = "sys/devices/system/cpu/cpufreq/ondemand"
SCHEDUTIL_DIR = f"{CPUFREQ}/schedutil"
THERMAL = "sys/class/thermal"
SUPPLY = "sys/class/power_supply"
HWMON = "sys/class/hwmon/hwmon0"
FIRMWARE_THROTTLE = "sys/devices/platform/soc/soc:firmware/get_throttled"

# Pi firmware get_throttled bits (now / has occurred since boot).
UNDER_VOLTAGE, FREQ_CAPPED, THROTTLED, SOFT_TEMP = 0x1, 0x2, 0x4, 0x8
OCCURRED_SHIFT = 16

CELL_EMPTY_V, CELL_FULL_V = 3.3, 4.2
_CELL_CURVE = ((0.0, CELL_EMPTY_V), (5.0, 3.5), (10.0, 3.6), (20.0, 3.68), (50.0, 3.78), (80.0, 3.95),
               (100.0, CELL_FULL_V))
METERS = ("ina219", "ina260")
GAUGES = ("full", "capacity", "none")
RAIL_V, RAIL_OHM = 5.1, 0.05  # a 5.1 V supply and its cable: the rail sags under load
AVAILABLE_GOVERNORS = "conservative ondemand userspace powersave performance schedutil"


@dataclass(frozen=True)
class BoardState:
    """What the board is doing right now (the simulation's truth, for benchmarks and plots)."""

    t: float
    temp_c: float
    power_w: float
    freq_khz: int
    cap_khz: int  # what the agent asked for in scaling_max_freq
    busy_cores: float
    soc_pct: float | None
    charging: bool
    mains: bool
    throttled: int  # get_throttled bits
    inferences: float
    alive: bool
    governor: str = "performance"
    solar_w: float = 0.0  # the charge controller's output over the last step
    windows_arrived: float = 0.0
    windows_done: float = 0.0
    windows_late: float = 0.0
    windows_skipped: float = 0.0
    mean_freq_khz: float = 0.0  # time-averaged over the last step (a sampling governor moves within it)


class VirtualBoard:
    """A simulated board behind a live fake sysfs tree.

    Args:
        root: Directory to write the tree into (created). Point ``FIELDNODE_SYSFS_ROOT`` or
            ``drivers.sysfs_root`` at it.
        profile: Board profile name (``rpi4``, ``rpi5``, ``jetson-orin-nano``) or a :class:`BoardProfile`.
        clock: Time source; a fresh :class:`SimClock` by default.
        ambient_c: Ambient temperature.
        battery_mah: Battery capacity, or ``None`` for a mains-only board (no battery supply node).
        soc_pct: Initial battery charge.
        mains: Whether mains (the external supply) is plugged in.
        converter_efficiency: Share of the battery's energy that reaches the board.
        charge_w: Charging power while mains is plugged.
        mcu: An optional simulated sensor MCU, fed ``SAMPLE_RATE_HZ`` samples per simulated second.
        cpu_governor: The kernel cpufreq governor at boot (:data:`drivers.sim.kernelgov.GOVERNORS`); the agent
            may change it at run time through ``scaling_governor``.
        governor_tunables: ondemand/schedutil tunables (``up_threshold``, ``sampling_rate``,
            ``sampling_down_factor``, ``rate_limit_us``) or a preset name (``"rpi-os"``); kernel defaults
            otherwise.
        solar_peak_w: Peak power of a solar panel charging the battery, or ``None`` for none.
        sunrise_h: Hour of sunrise.
        sunset_h: Hour of sunset.
        start_hour: Hour of day at simulated time 0.
        solar_efficiency: Share of the panel's power the charge controller delivers.
        meter: ``"ina219"`` or ``"ina260"``: an I2C power meter on the 5 V input, as hwmon0; ``None``: none.
        gauge: The battery's fuel gauge: ``"full"`` (capacity, status, voltage, current, power, charge),
            ``"capacity"`` (capacity and status only) or ``"none"`` (no battery supply node at all).
        meter_noise_pct: Standard deviation of the meter's and gauge's multiplicative noise, in percent.
        meter_seed: Seed of that noise.

    Raises:
        ValueError: An unknown profile, governor, tunable, meter or gauge, or bad solar figures.
    """

    def __init__(self, root: str, profile: str | BoardProfile = "rpi4", *, clock=None, ambient_c: float = 25.0,
                 battery_mah: float | None = None, soc_pct: float = 100.0, mains: bool = True,
                 converter_efficiency: float = 0.9, charge_w: float = 7.5, mcu=None,
                 cpu_governor: str = "performance", governor_tunables: dict | str | None = None,
                 solar_peak_w: float | None = None, sunrise_h: float = 6.0, sunset_h: float = 18.0,
                 start_hour: float = 0.0, solar_efficiency: float = 0.85, meter: str | None = None,
                 gauge: str = "full", meter_noise_pct: float = 0.0, meter_seed: int = 0):
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        self.clock = clock if clock is not None else SimClock()
        self.fs = Sysfs(root)
        self.root = self.fs.root
        self.ambient_c = float(ambient_c)
        self.battery_mah = battery_mah
        self.soc = min(max(float(soc_pct), 0.0), 100.0) if battery_mah else None
        self.mains = bool(mains) or not battery_mah
        self.efficiency = converter_efficiency
        self.charge_w = charge_w
        self.mcu = mcu
        self.table = kernelgov.Table(self.profile.frequencies_khz)
        self.governor = kernelgov.check_governor(cpu_governor)
        self.tunables = kernelgov.resolve_tunables(governor_tunables)
        self.solar = (SolarPanel(float(solar_peak_w), sunrise_h, sunset_h, start_hour, solar_efficiency)
                      if solar_peak_w is not None else None)
        if meter is not None and meter not in METERS:
            raise ValueError(f"unknown power meter {meter!r}; known: {', '.join(METERS)}")
        if gauge not in GAUGES:
            raise ValueError(f"unknown fuel gauge {gauge!r}; known: {', '.join(GAUGES)}")
        if not (math.isfinite(meter_noise_pct) and meter_noise_pct >= 0):
            raise ValueError(f"meter_noise_pct must be a finite number >= 0, got {meter_noise_pct!r}")
        self.meter, self.gauge, self.meter_noise_pct = meter, gauge, float(meter_noise_pct)
        self._rng = random.Random(meter_seed)
        self.alive = True
        self.brownout = False  # the battery emptied and the board went down
        self.temp_c = self.ambient_c + self.profile.r_c_per_w * self.profile.power_w(self.profile.min_khz, 0.0)
        self.energy_wh = 0.0
        self.load = Workload(self.profile)
        self._throttled = 0
        self._busy_reported = 0.0  # core-seconds reported since the last step
        self._power = 0.0
        self._cell_w = 0.0  # net power into the cell (negative: discharging)
        self._solar_w = 0.0
        self._freq = self.profile.max_khz if self.governor == "performance" else self.profile.min_khz
        self._mean_freq = float(self._freq)
        self._busy = 0.0
        self._gov: kernelgov.SampledPolicy | None = None
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._mcu_carry = 0.0
        self._last_t = self.clock.monotonic()
        self._written: dict[str, str] = {}
        self._write_static()
        self._switch_governor(self.governor)
        self._write_dynamic()

    # ------------------------------------------------------------------------------------ the agent's side

    @property
    def inferences(self) -> float:
        """Inferences completed (in time or late)."""
        return self.load.inferences

    @property
    def windows_arrived(self) -> float:
        return self.load.arrived

    @property
    def windows_done(self) -> float:
        """Windows whose inference finished within their deadline."""
        return self.load.done

    @property
    def windows_late(self) -> float:
        """Windows that missed their deadline: finished late, or dropped from the queue past it."""
        return self.load.late

    @property
    def windows_skipped(self) -> float:
        """Windows skipped because they arrived sooner than ``interval_s`` after the last start."""
        return self.load.skipped

    def set_demand(self, threads: int, cost: float, interval_s: float = 0.0) -> None:
        """Simulates an inference loop: back-to-back inferences (``interval_s`` 0) or one per interval.

        Args:
            threads: Interpreter threads per inference.
            cost: Relative cost of the model variant (1.0 = ``infer_s_at_max`` on one core at f_max).
            interval_s: Minimum time between inference starts (the duty cycle); 0 means continuous.
        """
        with self._lock:
            self.load.set_demand(threads, cost, interval_s, self.clock.monotonic())

    def set_windows(self, rate_hz: float, threads: int, cost: float, deadline_s: float | None = None,
                    interval_s: float = 0.0) -> None:
        """Simulates sensor windows arriving at ``rate_hz``, each served FIFO by one inference.

        Args:
            rate_hz: Window rate (the sensor's sample rate over the hop).
            threads: Interpreter threads per inference.
            cost: Relative cost of the model variant.
            deadline_s: A window not done this long after it arrived is late (dropped if not started);
                ``1 / rate_hz`` by default.
            interval_s: Windows arriving sooner than this after the last start are skipped.

        Raises:
            ValueError: A rate, cost or deadline that is not a finite positive number.
        """
        with self._lock:
            self.load.set_windows(rate_hz, threads, cost, deadline_s, interval_s, self.clock.monotonic())

    def clear_demand(self) -> None:
        """Stops the simulated load (demand or windows); the counters stay."""
        with self._lock:
            self.load.clear()

    def record_busy(self, core_seconds: float) -> None:
        """Reports real work the agent did (CPU core-seconds) since the last step, for the power model."""
        with self._lock:
            self._busy_reported += max(0.0, core_seconds)

    def plug(self, mains: bool = True) -> None:
        """Connects or disconnects mains (the external supply)."""
        with self._lock:
            self.mains = bool(mains) or not self.battery_mah
            self._write_supplies()

    def set_ambient(self, celsius: float) -> None:
        with self._lock:
            self.ambient_c = float(celsius)

    # ------------------------------------------------------------------------------------------ simulation

    def advance(self, seconds: float, dt: float = 1.0) -> BoardState:
        """Advances the clock (a SimClock) by ``seconds`` in steps of at most ``dt``, then returns the state."""
        remaining = float(seconds)
        while remaining > 1e-12:
            d = min(dt, remaining)
            self.clock.advance(d)
            self.step()
            remaining -= d
        return self.state()

    def step(self) -> BoardState:
        """Integrates the physics from the previous step to the clock's current time and rewrites the tree."""
        with self._lock:
            now = self.clock.monotonic()
            dt = now - self._last_t
            self._last_t = now
            if dt > 0 and self.alive:
                self._integrate(now - dt, dt)
            elif not self.alive:
                self._relax(now - dt, dt)
            self._write_dynamic()
            return self.state()

    def _read_limit(self, name: str, default: int) -> int:
        value = self.fs.read_int(f"{CPUFREQ}/{name}")
        p = self.profile
        return default if value is None else min(max(value, p.min_khz), p.max_khz)

    def _cap_khz(self) -> int:
        return self._read_limit("scaling_max_freq", self.profile.max_khz)

    def _firmware_cap(self) -> int:
        """Applies the firmware's own throttling and keeps the get_throttled bits."""
        p = self.profile
        now = 0
        cap = p.max_khz
        if self.temp_c >= p.hard_limit_c:
            cap = min(cap, p.hard_cap_khz)
            now |= THROTTLED | FREQ_CAPPED | SOFT_TEMP
        elif self.temp_c >= p.soft_limit_c:
            cap = min(cap, p.soft_cap_khz)
            now |= FREQ_CAPPED | SOFT_TEMP
        if self.soc is not None and not self.mains and self._cell_voltage() < 3.45:
            now |= UNDER_VOLTAGE
        self._throttled = now | (self._throttled & ~0xF) | (now << OCCURRED_SHIFT)
        return cap

    def _integrate(self, t0: float, dt: float) -> None:
        p = self.profile
        self._read_governor()
        hi = self._cap_khz()
        lo = self._read_limit("scaling_min_freq", p.min_khz) if self.governor != "performance" else p.min_khz
        fw = self._firmware_cap()
        recorded = min(self._busy_reported / dt, float(p.cpus))
        self._busy_reported = 0.0
        if self._gov is None:
            setspeed = self.fs.read_int(f"{CPUFREQ}/scaling_setspeed") if self.governor == "userspace" else None
            khz = self.table.at_most(min(kernelgov.static_khz(self.governor, self.table, lo, hi, setspeed), fw))
            share = self.load.fluid(t0, t0 + dt, khz / p.max_khz)
            busy = min(self.load.cores * share + recorded, float(p.cpus))
            power = p.power_w(khz, busy)
            self._mean_freq = float(khz)
        else:
            khz, busy, power, self._mean_freq = self._gov.run(self.load, p, t0, dt, lo, hi, fw, recorded)
        harvest = self.solar.harvest_w(t0, t0 + dt) if self.solar is not None else 0.0
        self._charge(power, harvest, dt)
        charging = self.mains and self.soc is not None and self.soc < 100.0
        # Exact solution of the first-order model over dt, so large steps stay stable.
        target = self.ambient_c + p.r_c_per_w * (power + (0.15 * self.charge_w if charging else 0.0))
        self.temp_c = target + (self.temp_c - target) * math.exp(-dt / p.tau_s)
        self.energy_wh += power * dt / 3600.0
        self._power, self._freq, self._busy, self._solar_w = power, khz, busy, harvest
        if self.mcu is not None:
            from drivers.sim.signal import SAMPLE_RATE_HZ

            self._mcu_carry += dt * SAMPLE_RATE_HZ
            n = int(self._mcu_carry)
            self._mcu_carry -= n
            if n:
                self.mcu.emit(n)

    def _charge(self, power: float, harvest: float, dt: float) -> None:
        """Moves energy in and out of the cell: mains charges it, else harvest covers the board first."""
        if self.soc is None:
            return
        capacity_wh = self.battery_mah / 1000.0 * 3.7
        if self.mains:
            cell_w = self.charge_w if self.soc < 100.0 else 0.0
        elif harvest >= power:
            cell_w = harvest - power if self.soc < 100.0 else 0.0
        else:
            cell_w = -(power - harvest) / self.efficiency
        self.soc = min(100.0, max(0.0, self.soc + 100.0 * cell_w * dt / 3600.0 / capacity_wh))
        self._cell_w = cell_w
        if self.soc <= 0.0 and self.alive:
            self.alive = False  # the PMIC cuts the board off
            self.brownout = True

    def _relax(self, t0: float, dt: float) -> None:
        """A dead board cools towards ambient; a solar controller still charges its cell."""
        if dt > 0:
            self.temp_c = self.ambient_c + (self.temp_c - self.ambient_c) * math.exp(-dt / self.profile.tau_s)
            if self.solar is not None and self.soc is not None:
                harvest = self.solar.harvest_w(t0, t0 + dt)
                self._solar_w = harvest
                self._charge(0.0, harvest, dt)
        self._power = self._busy = 0.0

    def _cell_voltage(self) -> float:
        if self.soc is None:
            return CELL_FULL_V
        # A Li-ion discharge curve: steep at both ends, flat in the middle.
        for (s0, v0), (s1, v1) in zip(_CELL_CURVE, _CELL_CURVE[1:]):
            if self.soc <= s1:
                return v0 + (v1 - v0) * (self.soc - s0) / (s1 - s0)
        return CELL_FULL_V

    def _charging(self) -> bool:
        return bool(self.soc is not None and self.soc < 100.0 and (self.mains or self._cell_w > 0))

    def state(self) -> BoardState:
        with self._lock:
            ld = self.load
            return BoardState(
                t=self.clock.monotonic(), temp_c=self.temp_c, power_w=self._power, freq_khz=self._freq,
                cap_khz=self._cap_khz(), busy_cores=self._busy, soc_pct=self.soc, charging=self._charging(),
                mains=self.mains, throttled=self._throttled, inferences=ld.inferences, alive=self.alive,
                governor=self.governor, solar_w=self._solar_w, windows_arrived=ld.arrived,
                windows_done=ld.done, windows_late=ld.late, windows_skipped=ld.skipped,
                mean_freq_khz=self._mean_freq,
            )

    # ------------------------------------------------------------------------------------ kernel governor

    def _read_governor(self) -> None:
        """Follows what was written to scaling_governor and the tunables, refusing what the kernel refuses."""
        rel = f"{CPUFREQ}/scaling_governor"
        name = self.fs.read_optional(rel)
        if name != self.governor:
            if name in kernelgov.GOVERNORS:
                self._switch_governor(name)
            else:
                self._rewrite(rel, self.governor)  # the kernel would have refused the write (EINVAL)
        if self._gov is not None:
            for key, rel in self._tunable_nodes():
                value = self.fs.read_int(rel)
                try:
                    self.tunables = kernelgov.resolve_tunables({**self.tunables, key: value})
                except ValueError:
                    self._rewrite(rel, self.tunables[key])
                self._gov.gov.tunables = self.tunables

    def _tunable_nodes(self) -> list[tuple[str, str]]:
        if self.governor == "ondemand":
            return [(k, f"{ONDEMAND_DIR}/{k}") for k in ("up_threshold", "sampling_rate", "sampling_down_factor")]
        if self.governor == "schedutil":
            return [("rate_limit_us", f"{SCHEDUTIL_DIR}/rate_limit_us")]
        return []

    def _switch_governor(self, name: str) -> None:
        self.governor = name
        gov = kernelgov.make_governor(name, self.table, self.tunables)
        self._gov = kernelgov.SampledPolicy(gov, self._freq, self.clock.monotonic()) if gov is not None else None
        self._rewrite(f"{CPUFREQ}/scaling_governor", name)
        self._rewrite(f"{CPUFREQ}/scaling_setspeed", self._freq if name == "userspace" else "<unsupported>")

    # ------------------------------------------------------------------------------------ real-time mode

    def start(self, period_s: float = 0.1) -> None:
        """Steps the board in a background thread every ``period_s`` of its clock (for a system clock)."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop():
            while not self._stop.wait(period_s):
                self.step()

        self._thread = threading.Thread(target=loop, name="virtual-board", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    # ------------------------------------------------------------------------------------------- the tree

    def _put(self, rel: str, value: object) -> None:
        """Writes one node atomically (temp file + rename), so a reader never sees half a value."""
        text = f"{value}\n"
        if self._written.get(rel) == text:
            return
        path = self.fs.path(rel)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        self._written[rel] = text

    def _rewrite(self, rel: str, value: object) -> None:
        """Writes a node the agent may also write (so the cache of what was written cannot be trusted)."""
        self._written.pop(rel, None)
        self._put(rel, value)

    def _noisy(self, value: float) -> float:
        if self.meter_noise_pct <= 0:
            return value
        return value * (1.0 + self._rng.gauss(0.0, self.meter_noise_pct / 100.0))

    def _write_static(self) -> None:
        p = self.profile
        for d in (CPUFREQ, f"{SUPPLY}", "proc/device-tree", "sys/devices/platform/soc/soc:firmware"):
            os.makedirs(self.fs.path(d), exist_ok=True)
        cpus = " ".join(str(i) for i in range(p.cpus))
        self._put(f"{CPUFREQ}/affected_cpus", cpus)
        self._put(f"{CPUFREQ}/related_cpus", cpus)
        self._put(f"{CPUFREQ}/scaling_available_frequencies", " ".join(str(f) for f in p.frequencies_khz))
        self._put(f"{CPUFREQ}/scaling_available_governors", AVAILABLE_GOVERNORS)
        self._put(f"{CPUFREQ}/cpuinfo_min_freq", p.min_khz)
        self._put(f"{CPUFREQ}/cpuinfo_max_freq", p.max_khz)
        if not self.fs.exists(f"{CPUFREQ}/scaling_min_freq"):
            self._put(f"{CPUFREQ}/scaling_min_freq", p.min_khz)
        if not self.fs.exists(f"{CPUFREQ}/scaling_max_freq"):
            self._put(f"{CPUFREQ}/scaling_max_freq", p.max_khz)
        for i, kind in enumerate(p.thermal_zones):
            zone = f"{THERMAL}/thermal_zone{i}"
            os.makedirs(self.fs.path(zone), exist_ok=True)
            self._put(f"{zone}/type", kind)
            self._put(f"{zone}/trip_point_0_temp", int(p.soft_limit_c * 1000))
            self._put(f"{zone}/trip_point_0_type", "passive")
            self._put(f"{zone}/trip_point_1_temp", int(p.hard_limit_c * 1000 + 5000))
            self._put(f"{zone}/trip_point_1_type", "critical")
        with open(self.fs.path("proc/device-tree/model"), "wb") as f:
            f.write(p.model.encode() + b"\0")
        lines = []
        for i in range(p.cpus):
            lines += [f"processor\t: {i}", "BogoMIPS\t: 108.00",
                      "Features\t: fp asimd evtstrm crc32 cpuid" + (" asimddp" if "rpi5" in p.name or "jetson" in p.name else ""),
                      "CPU implementer\t: 0x41", ""]
        lines += [f"Model\t\t: {p.model}", ""]
        with open(self.fs.path("proc/cpuinfo"), "w") as f:
            f.write("\n".join(lines) + "\n")
        # The tunables of both sampling governors stay in the tree whatever the governor (the kernel creates them
        # when the governor starts), so a script may write them before or after switching.
        os.makedirs(self.fs.path(ONDEMAND_DIR), exist_ok=True)
        os.makedirs(self.fs.path(SCHEDUTIL_DIR), exist_ok=True)
        for key in ("up_threshold", "sampling_rate", "sampling_down_factor"):
            self._rewrite(f"{ONDEMAND_DIR}/{key}", self.tunables[key])
        self._rewrite(f"{SCHEDUTIL_DIR}/rate_limit_us", self.tunables["rate_limit_us"])
        if self.soc is not None and self.gauge != "none":
            os.makedirs(self.fs.path(f"{SUPPLY}/battery"), exist_ok=True)
            self._put(f"{SUPPLY}/battery/type", "Battery")
            self._put(f"{SUPPLY}/battery/present", 1)
            if self.gauge == "full":
                self._put(f"{SUPPLY}/battery/charge_full_design", int(self.battery_mah * 1000))
                self._put(f"{SUPPLY}/battery/charge_full", int(self.battery_mah * 1000))
        os.makedirs(self.fs.path(f"{SUPPLY}/mains"), exist_ok=True)
        self._put(f"{SUPPLY}/mains/type", "Mains")
        if self.solar is not None:
            os.makedirs(self.fs.path(f"{SUPPLY}/solar"), exist_ok=True)
            self._put(f"{SUPPLY}/solar/type", "Mains")
        if self.meter is not None:
            os.makedirs(self.fs.path(HWMON), exist_ok=True)
            self._put(f"{HWMON}/name", self.meter)

    def _write_supplies(self) -> None:
        self._put(f"{SUPPLY}/mains/online", int(self.mains))
        if self.solar is not None:
            self._put(f"{SUPPLY}/solar/online", int(self._solar_w > 0.0))
        if self.soc is None or self.gauge == "none":
            return
        b = f"{SUPPLY}/battery"
        if self.mains:
            status = "Full" if self.soc >= 100.0 else "Charging"
        elif self._cell_w > 0:
            status = "Charging"
        elif self.soc >= 100.0 and self._solar_w > 0:
            status = "Full"  # the panel covers the board and the cell is full
        else:
            status = "Discharging"
        self._put(f"{b}/status", status)
        self._put(f"{b}/capacity", int(round(self.soc)))
        if self.gauge != "full":
            return
        volts = self._cell_voltage()
        if self.mains:
            cell_w = self.charge_w if self.soc < 100.0 else 0.0
        else:
            cell_w = self._cell_w if self.alive or self._cell_w > 0 else 0.0
        current = self._noisy(cell_w / volts)
        self._put(f"{b}/voltage_now", int(volts * 1e6))
        self._put(f"{b}/current_now", int(current * 1e6))
        self._put(f"{b}/power_now", int(abs(current) * volts * 1e6))
        self._put(f"{b}/charge_now", int(self.battery_mah * 1000 * self.soc / 100.0))

    def _write_meter(self) -> None:
        watts = self._noisy(self._power) if self.alive else 0.0
        amps = watts / RAIL_V
        volts = RAIL_V - RAIL_OHM * amps
        amps = watts / volts
        self._put(f"{HWMON}/power1_input", int(round(watts * 1e6)))
        self._put(f"{HWMON}/curr1_input", int(round(amps * 1e3)))
        self._put(f"{HWMON}/in1_input", int(round(volts * 1e3)))

    def _write_dynamic(self) -> None:
        p = self.profile
        for i, _kind in enumerate(p.thermal_zones):
            offset = 0.0 if i == 0 else -1.5 * i  # other sensors read a little cooler than the CPU
            self._put(f"{THERMAL}/thermal_zone{i}/temp", int(round((self.temp_c + offset) * 1000)))
        self._put(f"{CPUFREQ}/scaling_cur_freq", self._freq)
        if p.firmware_throttle_node:
            self._put(FIRMWARE_THROTTLE, format(self._throttled, "x"))
        self._write_supplies()
        if self.meter is not None:
            self._write_meter()
