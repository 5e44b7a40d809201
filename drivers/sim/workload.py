"""The inference load of the virtual board: sensor windows served FIFO, or a continuous demand.

One inference of a variant of relative ``cost`` with ``threads`` threads takes
``cost × infer_s_at_max / speedup(threads)`` seconds at f_max and ``1 / (f / f_max)`` times that at ``f``; while
it runs, ``min(threads, cpus)`` cores are busy. Two kinds of load:

* **Windows** (:meth:`Workload.set_windows`): a window arrives every ``1 / rate_hz`` seconds and waits in a FIFO
  queue. A window still waiting when its deadline (``deadline_s`` after it arrived) has passed is dropped; one
  that finishes after its deadline is served but counts late. With ``interval_s`` > 0 a window arriving sooner
  than ``interval_s`` after the last start is skipped. FIFO with deadlines collapses under overload (the head is
  always old), as a real queue does: in steady overload almost every window is late.
* **Demand** (:meth:`Workload.set_demand`): back-to-back inferences, or one every ``interval_s``; every
  completion is a window done in time.

Two ways to run it over a span of constant frequency:

* :meth:`Workload.fluid` (static governors): an exact fluid average. The queue is one number, the lag ``L``
  (age of the window at the head): it grows at ``1 − Ta/s`` while the server is busy (``Ta`` the spacing of
  admitted windows, ``s`` the service time), is capped at the deadline (older windows are dropped) and drains to
  0, where the server idles. A window served at lag ``L`` is in time iff ``L + s ≤ deadline``. Skipping uses the
  admitted spacing ``ceil(interval / T) × T``, which is exact while the queue is empty (an interval of at least
  the service time keeps it so).
* :meth:`Workload.serve` (sampling governors): discrete windows at their exact arrival times, for the short
  substeps of a governor's sampling period.

Counters are floats (fluid averages); ``done + late + skipped`` equals ``arrived`` up to the windows queued.
"""

from __future__ import annotations

import collections
import math

from drivers.sim.profiles import BoardProfile


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class Workload:
    """The simulated inference load of one board (see the module docstring)."""

    def __init__(self, profile: BoardProfile):
        self.profile = profile
        self.kind: str | None = None  # "demand", "windows" or None
        self.threads, self.cost, self.interval = 1, 1.0, 0.0
        self.rate, self.deadline = 1.0, 1.0
        self.work_s = 0.0  # one inference at f_max, wall seconds
        self.inferences = self.arrived = self.done = self.late = self.skipped = 0.0
        self._lag = 0.0  # fluid queue state
        self._queue: collections.deque[float] = collections.deque()  # discrete queue: arrival times
        self._job: list[float] | None = None  # [arrival, work left at f_max]
        self._last_start = -math.inf
        self._origin, self._n = 0.0, 1  # arrival n is at origin + n / rate
        self._discrete = False

    @property
    def cores(self) -> int:
        """Cores one inference keeps busy (0 without load)."""
        return min(self.threads, self.profile.cpus) if self.kind else 0

    def _set(self, kind: str, threads: int, cost: float, interval_s: float) -> None:
        self.kind = kind
        self.threads = max(1, int(threads))
        self.cost = _positive("cost", cost)
        self.interval = max(0.0, float(interval_s))
        self.work_s = self.cost * self.profile.infer_s_at_max / self.profile.speedup(self.threads)

    def set_demand(self, threads: int, cost: float, interval_s: float, now: float) -> None:
        """A continuous demand; the same demand again changes nothing (an inference in progress goes on)."""
        if self.kind == "demand" and (self.threads, self.cost, self.interval) == (
                max(1, int(threads)), float(cost), max(0.0, float(interval_s))):
            return
        self._queue.clear()
        self._lag = 0.0
        self._set("demand", threads, cost, interval_s)

    def set_windows(self, rate_hz: float, threads: int, cost: float, deadline_s: float | None, interval_s: float,
                    now: float) -> None:
        """Windows at ``rate_hz``; the same setting again changes nothing, another keeps the queue."""
        rate = _positive("rate_hz", rate_hz)
        deadline = _positive("deadline_s", deadline_s) if deadline_s is not None else 1.0 / rate
        if self.kind == "windows" and (self.rate, self.threads, self.cost, self.deadline, self.interval) == (
                rate, max(1, int(threads)), float(cost), deadline, max(0.0, float(interval_s))):
            return
        if self.kind != "windows" or rate != self.rate:
            self._origin, self._n = now, 1
        if self.kind != "windows":
            self._job, self._lag = None, 0.0
        self.rate, self.deadline = rate, deadline
        self._lag = min(self._lag, deadline)
        self._set("windows", threads, cost, interval_s)

    def clear(self) -> None:
        self.kind = None
        self._queue.clear()
        self._job, self._lag = None, 0.0

    # ------------------------------------------------------------------------------------------ fluid

    def fluid(self, t0: float, t1: float, speed: float) -> float:
        """Runs ``[t0, t1]`` at ``speed`` (f / f_max) as a fluid average; returns the busy share."""
        if self.kind is None:
            return 0.0
        if self._discrete:
            self._to_fluid(t0)
        dt = t1 - t0
        s = self.work_s / speed
        if self.kind == "demand":
            period = max(s, self.interval)
            n = dt / period
            self.inferences += n
            self.done += n
            self.arrived += n
            return s / period
        t_arr = 1.0 / self.rate
        k = max(1, math.ceil(self.interval / t_arr - 1e-9)) if self.interval > 0 else 1
        ta = k * t_arr
        # keep the arrival grid moving, for a switch to discrete windows
        self._n = max(self._n, math.floor((t1 - self._origin) * self.rate + 1e-9) + 1)
        d, lag0 = self.deadline, self._lag
        arrived, admitted = dt / t_arr, dt / ta
        g = 1.0 - ta / s  # lag growth while the server is busy
        thr = d - s  # the largest lag still served in time
        served = in_time = busy = 0.0
        left, lag = dt, lag0
        if lag > 0 or g > 0:
            t_hit = (d - lag) / g if g > 0 else (lag / -g if g < 0 else math.inf)
            ta_span = min(left, t_hit)
            lag1 = min(max(lag + g * ta_span, 0.0), d)
            n = ta_span / s
            if lag1 == lag:
                frac = 1.0 if lag <= thr else 0.0
            else:
                x = min(max((thr - lag) / (lag1 - lag), 0.0), 1.0)
                frac = x if lag1 > lag else 1.0 - x
            served, in_time, busy = n, n * frac, ta_span
            lag, left = lag1, left - ta_span
        if left > 1e-12:
            if g > 0:  # overloaded, the lag pinned at the deadline: served late, the rest dropped
                served += left / s
                busy += left
            else:  # idle between windows
                n = left / ta
                served += n
                in_time += n if s <= d else 0.0
                busy += n * s
        self._lag = lag
        dropped = max(0.0, admitted - served - (lag - lag0) / ta)
        self.arrived += arrived
        self.skipped += arrived - admitted
        self.inferences += served
        self.done += in_time
        self.late += served - in_time + dropped
        return min(busy / dt, 1.0)

    def _to_fluid(self, now: float) -> None:
        self._discrete = False
        head = self._job[0] if self._job else (self._queue[0] if self._queue else None)
        self._lag = min(max(now - head, 0.0), self.deadline) if head is not None and self.kind == "windows" else 0.0
        self._queue.clear()
        self._job = None

    # ------------------------------------------------------------------------------------------ discrete

    def _to_discrete(self, now: float) -> None:
        self._discrete = True
        if self.kind == "windows" and self._lag > 0:
            t_arr = 1.0 / self.rate
            self._queue.extend(now - self._lag + j * t_arr for j in range(int(self._lag / t_arr)))
            self._last_start = now - self.interval
        self._lag = 0.0

    def _arrival(self) -> float:
        """Time of the next arrival (one expression everywhere, so comparisons with it are exact)."""
        return self._origin + self._n / self.rate

    def _admit(self, t: float, inclusive: bool) -> None:
        """Takes in the arrivals before ``t`` (or at it), skipping those too soon after the last start."""
        while True:
            a = self._arrival()
            if a > t or (not inclusive and a >= t):
                return
            self._n += 1
            self.arrived += 1
            if self.interval > 0 and a - self._last_start < self.interval - 1e-12:
                self.skipped += 1
            else:
                self._queue.append(a)

    def serve(self, t0: float, t1: float, speed: float) -> float:
        """Runs ``[t0, t1]`` at ``speed`` (f / f_max) with discrete windows; returns the busy seconds."""
        if self.kind is None:
            return 0.0
        if not self._discrete:
            self._to_discrete(t0)
        busy, tau = 0.0, t0
        windows = self.kind == "windows"
        q, d = self._queue, self.deadline
        while True:
            if self._job is None:
                if windows:
                    self._admit(tau, True)
                    while q and q[0] + d <= tau + 1e-12:
                        q.popleft()
                        self.late += 1
                    if q:
                        self._job = [q.popleft(), self.work_s]
                    else:
                        nxt = self._arrival()
                        if nxt >= t1:
                            break
                        tau = nxt
                        continue
                else:
                    start = max(tau, self._last_start + self.interval)
                    if start >= t1:
                        break
                    tau = start
                    self._job = [start, self.work_s]
                    self.arrived += 1
                self._last_start = tau
            need = self._job[1] / speed
            if tau + need <= t1:
                tau += need
                busy += need
                self.inferences += 1
                if not windows or tau <= self._job[0] + d + 1e-12:
                    self.done += 1
                else:
                    self.late += 1
                self._job = None
            else:
                self._job[1] -= (t1 - tau) * speed
                busy += t1 - tau
                break
        if windows:
            self._admit(t1, False)
        return busy
