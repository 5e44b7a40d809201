"""The virtual board: a live fake sysfs tree driven by simulated physics.

:class:`VirtualBoard` writes the nodes a real Raspberry Pi or Jetson exposes (thermal zones, power
supplies, cpufreq policy, the Pi firmware's throttle flags, device-tree model, cpuinfo) into a directory,
and updates them as simulated time passes. The agent's drivers read that directory through a
:class:`drivers.sysfs.Sysfs` root exactly as they read ``/`` on a board, and what the agent writes
(``scaling_max_freq``) changes the physics, so the governor is tested in a real closed loop:

* **Power** follows frequency and load (:mod:`drivers.sim.profiles`), and idles low.
* **Temperature** is a lumped first-order model: it relaxes towards ``ambient + R * P`` with time constant
  ``tau``. The firmware throttles by itself at the profile's soft and hard limits, and reports it in
  ``get_throttled`` the way the Pi firmware does.
* **Battery** (optional): a Li-ion cell discharged by the power drawn through a converter, charged when
  mains is plugged; an empty battery stops the board (:attr:`VirtualBoard.alive`).
* **Load**: either real work reported by the agent (:meth:`VirtualBoard.record_busy`), or a simulated
  inference demand (:meth:`VirtualBoard.set_demand`) whose rate follows the frequency, the thread count, the
  model variant's cost and the duty-cycle interval; the board counts the inferences it completes.
* **Sensor MCU** (optional): :class:`drivers.sim.mcu.SimulatedMcu` on a pseudo-terminal, fed in step with
  simulated time.

Time is a :class:`drivers.sim.clock.SimClock` by default: :meth:`VirtualBoard.advance` runs hours of board
time in seconds. :meth:`VirtualBoard.start` instead steps it against the real clock for live demos.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass

from drivers.sim.clock import SimClock
from drivers.sim.profiles import BoardProfile, get_profile
from drivers.sysfs import Sysfs

CPUFREQ = "sys/devices/system/cpu/cpufreq/policy0"
THERMAL = "sys/class/thermal"
SUPPLY = "sys/class/power_supply"
FIRMWARE_THROTTLE = "sys/devices/platform/soc/soc:firmware/get_throttled"

# Pi firmware get_throttled bits (now / has occurred since boot).
UNDER_VOLTAGE, FREQ_CAPPED, THROTTLED, SOFT_TEMP = 0x1, 0x2, 0x4, 0x8
OCCURRED_SHIFT = 16

CELL_EMPTY_V, CELL_FULL_V = 3.3, 4.2
_CELL_CURVE = ((0.0, CELL_EMPTY_V), (5.0, 3.5), (10.0, 3.6), (20.0, 3.68), (50.0, 3.78), (80.0, 3.95),
               (100.0, CELL_FULL_V))


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
    """

    def __init__(self, root: str, profile: str | BoardProfile = "rpi4", *, clock=None, ambient_c: float = 25.0,
                 battery_mah: float | None = None, soc_pct: float = 100.0, mains: bool = True,
                 converter_efficiency: float = 0.9, charge_w: float = 7.5, mcu=None):
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
        self.alive = True
        self.temp_c = self.ambient_c + self.profile.r_c_per_w * self.profile.power_w(self.profile.min_khz, 0.0)
        self.inferences = 0.0
        self.energy_wh = 0.0
        self._throttled = 0
        self._busy_reported = 0.0  # core-seconds at the current frequency reported since the last step
        self._demand: tuple[int, float, float] | None = None  # threads, cost, interval_s
        self._power = 0.0
        self._freq = self.profile.max_khz
        self._busy = 0.0
        self._lock = threading.RLock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._mcu_carry = 0.0
        self._last_t = self.clock.monotonic()
        self._written: dict[str, str] = {}
        self._write_static()
        self._write_dynamic()

    # ------------------------------------------------------------------------------------ the agent's side

    def set_demand(self, threads: int, cost: float, interval_s: float = 0.0) -> None:
        """Simulates an inference loop: back-to-back inferences (``interval_s`` 0) or one per interval.

        Args:
            threads: Interpreter threads per inference.
            cost: Relative cost of the model variant (1.0 = ``infer_s_at_max`` on one core at f_max).
            interval_s: Minimum time between inference starts (the duty cycle); 0 means continuous.
        """
        with self._lock:
            self._demand = (max(1, int(threads)), float(cost), max(0.0, float(interval_s)))

    def clear_demand(self) -> None:
        with self._lock:
            self._demand = None

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
                self._integrate(dt)
            elif not self.alive:
                self._relax(dt)
            self._write_dynamic()
            return self.state()

    def _cap_khz(self) -> int:
        value = self.fs.read_int(f"{CPUFREQ}/scaling_max_freq")
        p = self.profile
        if value is None:
            return p.max_khz
        return min(max(value, p.min_khz), p.max_khz)

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

    def _integrate(self, dt: float) -> None:
        p = self.profile
        khz = min(self._cap_khz(), self._firmware_cap())
        # The kernel picks the highest table frequency under both caps.
        khz = max([f for f in p.frequencies_khz if f <= khz] or [p.min_khz])
        speed = khz / p.max_khz
        busy = self._busy_reported / dt
        self._busy_reported = 0.0
        if self._demand is not None:
            threads, cost, interval = self._demand
            service = cost * p.infer_s_at_max / (p.speedup(threads) * speed)
            period = max(service, interval)
            busy += min(threads, p.cpus) * service / period
            self.inferences += dt / period
        busy = min(busy, float(p.cpus))
        power = p.power_w(khz, busy)
        charging = self.mains and self.soc is not None and self.soc < 100.0
        # Exact solution of the first-order model over dt, so large steps stay stable.
        target = self.ambient_c + p.r_c_per_w * (power + (0.15 * self.charge_w if charging else 0.0))
        self.temp_c = target + (self.temp_c - target) * math.exp(-dt / p.tau_s)
        if self.soc is not None:
            capacity_wh = self.battery_mah / 1000.0 * 3.7
            if self.mains:
                self.soc = min(100.0, self.soc + 100.0 * self.charge_w * dt / 3600.0 / capacity_wh)
            else:
                drawn_wh = power / self.efficiency * dt / 3600.0
                self.soc = max(0.0, self.soc - 100.0 * drawn_wh / capacity_wh)
                if self.soc <= 0.0:
                    self.alive = False  # the PMIC cuts the board off
        self.energy_wh += power * dt / 3600.0
        self._power, self._freq, self._busy = power, khz, busy
        if self.mcu is not None:
            from drivers.sim.signal import SAMPLE_RATE_HZ

            self._mcu_carry += dt * SAMPLE_RATE_HZ
            n = int(self._mcu_carry)
            self._mcu_carry -= n
            if n:
                self.mcu.emit(n)

    def _relax(self, dt: float) -> None:
        """A dead board cools towards ambient."""
        if dt > 0:
            self.temp_c = self.ambient_c + (self.temp_c - self.ambient_c) * math.exp(-dt / self.profile.tau_s)
        self._power = self._busy = 0.0

    def _cell_voltage(self) -> float:
        if self.soc is None:
            return CELL_FULL_V
        # A Li-ion discharge curve: steep at both ends, flat in the middle.
        for (s0, v0), (s1, v1) in zip(_CELL_CURVE, _CELL_CURVE[1:]):
            if self.soc <= s1:
                return v0 + (v1 - v0) * (self.soc - s0) / (s1 - s0)
        return CELL_FULL_V

    def state(self) -> BoardState:
        with self._lock:
            return BoardState(
                t=self.clock.monotonic(), temp_c=self.temp_c, power_w=self._power, freq_khz=self._freq,
                cap_khz=self._cap_khz(), busy_cores=self._busy, soc_pct=self.soc,
                charging=bool(self.mains and self.soc is not None and self.soc < 100.0), mains=self.mains,
                throttled=self._throttled, inferences=self.inferences, alive=self.alive,
            )

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

    def _write_static(self) -> None:
        p = self.profile
        for d in (CPUFREQ, f"{SUPPLY}", "proc/device-tree", "sys/devices/platform/soc/soc:firmware"):
            os.makedirs(self.fs.path(d), exist_ok=True)
        cpus = " ".join(str(i) for i in range(p.cpus))
        self._put(f"{CPUFREQ}/affected_cpus", cpus)
        self._put(f"{CPUFREQ}/related_cpus", cpus)
        self._put(f"{CPUFREQ}/scaling_available_frequencies", " ".join(str(f) for f in p.frequencies_khz))
        self._put(f"{CPUFREQ}/cpuinfo_min_freq", p.min_khz)
        self._put(f"{CPUFREQ}/cpuinfo_max_freq", p.max_khz)
        self._put(f"{CPUFREQ}/scaling_min_freq", p.min_khz)
        self._put(f"{CPUFREQ}/scaling_governor", "ondemand")
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
        if self.soc is not None:
            os.makedirs(self.fs.path(f"{SUPPLY}/battery"), exist_ok=True)
            self._put(f"{SUPPLY}/battery/type", "Battery")
            self._put(f"{SUPPLY}/battery/present", 1)
            self._put(f"{SUPPLY}/battery/charge_full_design", int(self.battery_mah * 1000))
        os.makedirs(self.fs.path(f"{SUPPLY}/mains"), exist_ok=True)
        self._put(f"{SUPPLY}/mains/type", "Mains")

    def _write_supplies(self) -> None:
        self._put(f"{SUPPLY}/mains/online", int(self.mains))
        if self.soc is None:
            return
        volts = self._cell_voltage()
        if self.mains:
            status = "Full" if self.soc >= 100.0 else "Charging"
            current = (self.charge_w / volts) if self.soc < 100.0 else 0.0
        else:
            status = "Discharging"
            current = -self._power / self.efficiency / volts if self.alive else 0.0
        self._put(f"{SUPPLY}/battery/status", status)
        self._put(f"{SUPPLY}/battery/capacity", int(round(self.soc)))
        self._put(f"{SUPPLY}/battery/voltage_now", int(volts * 1e6))
        self._put(f"{SUPPLY}/battery/current_now", int(current * 1e6))
        self._put(f"{SUPPLY}/battery/power_now", int(abs(current) * volts * 1e6))

    def _write_dynamic(self) -> None:
        p = self.profile
        for i, _kind in enumerate(p.thermal_zones):
            offset = 0.0 if i == 0 else -1.5 * i  # other sensors read a little cooler than the CPU
            self._put(f"{THERMAL}/thermal_zone{i}/temp", int(round((self.temp_c + offset) * 1000)))
        self._put(f"{CPUFREQ}/scaling_cur_freq", self._freq)
        if p.firmware_throttle_node:
            self._put(FIRMWARE_THROTTLE, format(self._throttled, "x"))
        self._write_supplies()
