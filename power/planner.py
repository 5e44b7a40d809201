"""The measured planner: what a window costs on this board, learned as the governor goes.

The levels of :mod:`power.policy` say what is *allowed* (a frequency cap, the backstops at high temperature and
low battery). Within that, the planner picks the *operating point* (a model variant, a thread count and a
frequency step) by what it has measured on this board, never by a model of one board:

* **What it measures.** After every governor step, the point that was in force gets one sample: the board's
  power (``PowerSnapshot.power_w``, from an hwmon monitor or the battery's fuel gauge, else the board
  profile's model), the windows classified in time per second, the windows that were late, and the inference
  time per window. The estimates are kept per point (so per variant and per frequency step) as exponentially
  weighted means, and age: a point not measured for ``stale_s`` is measured again before it is trusted.
* **What it wants.** A window classified by a cheaper variant counts as that variant's accuracy relative to
  the default variant (``quality``). The objectives:

  - ``throughput`` (on external power): the most quality-weighted windows per second under the frequency the
    levels and the thermal trim allow; of the points that tie (windows at a fixed rate that several points keep
    up with), the one that draws the least.

  - ``efficiency`` (on battery): the most quality-weighted windows per joule, among points that keep up with
    the windows (at most ``late_max`` of them late). With windows at a fixed rate this is the point that keeps
    up at the least power; with a continuous demand it is the point where the board's base power and its
    dynamic power balance.
  - ``budget`` (on battery with a runtime target): the most quality-weighted windows per second whose power
    fits the budget (the energy left over the time left); below the cheapest point, the point is duty-cycled.
    Between two points the budget is met on average: the planner takes the points measured on the upper
    concave frontier of windows against power (a point under the chord of two others is never worth running)
    and alternates between the two that bracket the budget, by the energy it has drawn over or under the
    budget so far (a sigma-delta modulator, with a band of ``mix_band_s`` seconds at the budget so a point
    is held for minutes, not switched every step).

* **How it searches.** Hill climbing from the incumbent (the best point measured): an unmeasured or stale
  neighbour (one frequency step and a stride of a third of the table, one thread, another variant) is tried
  for one step; otherwise the governor
  moves to the best measured point only when it beats the one in force by ``hysteresis`` (a noisy meter
  must not make it flap). A neighbour that cannot keep up by the inference times measured so far is not tried,
  nor, for ``throughput``, one that could not deliver more windows than the incumbent by those times.

Pure: no I/O, no clock. The governor feeds it samples and asks it for a point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class Point:
    """One operating point: a model variant, interpreter threads and a CPU frequency step (kHz, or 0 when the
    board has no cpufreq table)."""

    variant: str
    threads: int
    khz: int

    def label(self) -> str:
        return f"{self.variant}/{self.threads}t/{self.khz // 1000} MHz"


@dataclass(frozen=True)
class Variant:
    """What the planner knows of a model variant: its relative cost (``model.json``) and its quality, the
    accuracy relative to the default variant (1.0 for the default)."""

    name: str
    cost: float
    quality: float = 1.0


@dataclass(frozen=True)
class Work:
    """Cumulative work counters the agent keeps (the governor takes differences).

    Attributes:
        done: Windows classified in time.
        late: Windows that arrived but were late or dropped.
        busy_s: Inference time spent on the ``done`` windows (seconds, wall clock per window).
    """

    done: float = 0.0
    late: float = 0.0
    busy_s: float = 0.0


class Estimate:
    """Exponentially weighted means for one point."""

    __slots__ = ("power_w", "done_per_s", "late_share", "service_s", "samples", "last_t")

    def __init__(self) -> None:
        self.power_w = self.done_per_s = self.late_share = 0.0
        self.service_s: float | None = None
        self.samples = 0
        self.last_t = -math.inf

    def add(self, t: float, power_w: float, done_per_s: float, late_share: float, service_s: float | None,
            weight: float) -> None:
        a = 1.0 if self.samples == 0 else weight
        self.power_w += a * (power_w - self.power_w)
        self.done_per_s += a * (done_per_s - self.done_per_s)
        self.late_share += a * (late_share - self.late_share)
        if service_s is not None:
            self.service_s = service_s if self.service_s is None else self.service_s + a * (service_s - self.service_s)
        self.samples += 1
        self.last_t = t


class Planner:
    """Learns the cost of each operating point and picks the next one.

    Args:
        variants: The variants this board can run; the first with quality 1.0 is the default.
        frequencies_khz: The board's frequency table (ascending), or empty without cpufreq.
        cpus: CPUs on the board (threads range over 1..cpus).
        hysteresis: A measured point must beat the one in force by this share before the planner moves.
        late_max: The share of late windows a point may have and still count as keeping up.
        stale_s: A point measured longer ago than this is measured again before it is trusted.
        weight: Weight of a new sample in the means (0..1].
        mix_band_s: Between two points under a budget, the energy over or under it (in seconds at the budget)
            that makes the planner switch from one to the other.
    """

    def __init__(self, variants: Sequence[Variant], frequencies_khz: Sequence[int], cpus: int, *,
                 hysteresis: float = 0.01, late_max: float = 0.01, stale_s: float = 1800.0, weight: float = 0.5,
                 mix_band_s: float = 120.0):
        if not variants:
            raise ValueError("the planner needs at least one variant")
        self.variants = {v.name: v for v in variants}
        self.frequencies = tuple(sorted(set(int(f) for f in frequencies_khz))) or (0,)
        self.cpus = max(1, int(cpus))
        self.hysteresis, self.late_max, self.stale_s, self.weight = hysteresis, late_max, stale_s, weight
        self.table: dict[Point, Estimate] = {}
        self._probing: Point | None = None
        self._rate_per_s = 0.0  # windows arriving per second, as last measured
        self.mix_band_s = mix_band_s
        self._credit = 0.0  # joules drawn under the budget (negative: over it) while mixing two points
        self._credit_t: float | None = None
        self.mixing = False  # the last choice alternates between two points that bracket the budget

    # ------------------------------------------------------------------------------------------ learning

    def record(self, t: float, point: Point, seconds: float, power_w: float | None, work: Work) -> None:
        """One sample: ``point`` was in force for ``seconds`` and did ``work`` (differences) at ``power_w``."""
        if seconds <= 0 or power_w is None or not math.isfinite(power_w) or power_w <= 0:
            return
        arrived = work.done + work.late
        late_share = work.late / arrived if arrived > 0 else 0.0
        service = work.busy_s / work.done if work.done > 0 and work.busy_s > 0 else None
        saturated = work.busy_s >= 0.97 * seconds  # the board never waited for a window
        # A saturated board with nothing late serves a continuous demand: no rate to keep up with.
        self._rate_per_s = 0.0 if saturated and work.late <= 0 else arrived / seconds
        self.table.setdefault(point, Estimate()).add(t, power_w, work.done / seconds, late_share, service,
                                                     self.weight)

    def known(self, point: Point, t: float) -> bool:
        est = self.table.get(point)
        return est is not None and est.samples > 0 and t - est.last_t <= self.stale_s

    # ----------------------------------------------------------------------------------------- objectives

    def weighted_rate(self, point: Point) -> float:
        """Quality-weighted windows per second measured at ``point``."""
        est = self.table[point]
        return est.done_per_s * self.variants[point.variant].quality

    def keeps_up(self, point: Point) -> bool:
        return self.table[point].late_share <= self.late_max

    def efficiency(self, point: Point) -> float:
        """Quality-weighted windows per joule at ``point`` (0 for a point that does not keep up)."""
        est = self.table[point]
        if not self.keeps_up(point) or est.power_w <= 0:
            return 0.0
        return self.weighted_rate(point) / est.power_w

    def _score(self, point: Point, objective: str, budget_w: float | None) -> float:
        if objective == "throughput":
            return self.weighted_rate(point)
        if objective == "budget" and budget_w is not None:
            est = self.table[point]
            if est.power_w > budget_w:
                return -est.power_w  # over budget: the cheaper the better, below every point that fits
            return self.weighted_rate(point) if self.keeps_up(point) else 0.0
        return self.efficiency(point)

    # ---------------------------------------------------------------------------------------- the search

    def candidates(self, max_khz: int | None = None, khz: int | None = None) -> list[Point]:
        """Every point allowed under a cap (``max_khz``) or at one frequency (``khz``)."""
        freqs = [f for f in self.frequencies if (max_khz is None or f <= max_khz) and (khz is None or f == khz)]
        freqs = freqs or [self.frequencies[0]]
        return [Point(v, n, f) for v in self.variants for n in range(1, self.cpus + 1) for f in freqs]

    def neighbours(self, point: Point, allowed: Iterable[Point]) -> list[Point]:
        allowed = set(allowed)
        i = self.frequencies.index(point.khz) if point.khz in self.frequencies else 0
        far = max(2, len(self.frequencies) // 3)  # a long stride too, so a long table is crossed in a few moves
        near = [Point(point.variant, point.threads, self.frequencies[j]) for j in (i - 1, i + 1, i - far, i + far)
                if 0 <= j < len(self.frequencies)]
        near += [Point(point.variant, n, point.khz) for n in (point.threads - 1, point.threads + 1)
                 if 1 <= n <= self.cpus]
        near += [Point(v, point.threads, point.khz) for v in self.variants if v != point.variant]
        return [p for p in near if p in allowed]

    def _predicted_service(self, point: Point, t: float) -> float | None:
        """Inference time at ``point`` from the nearest measured point with the same threads (time scales with
        cost / frequency; the thread speed-up is not assumed)."""
        best = None
        for p, est in self.table.items():
            if est.service_s is None or p.threads != point.threads or t - est.last_t > self.stale_s:
                continue
            scale = (self.variants[point.variant].cost / self.variants[p.variant].cost) * (
                (p.khz or 1) / (point.khz or 1))
            guess = est.service_s * scale
            best = guess if best is None else min(best, guess)
        return best

    def _could_keep_up(self, point: Point, t: float) -> bool:
        service = self._predicted_service(point, t)
        return service is None or self._rate_per_s <= 0 or service * self._rate_per_s <= 1.0

    def _could_be_better(self, point: Point, incumbent: Point, t: float, objective: str) -> bool:
        """For ``throughput``: whether ``point`` could deliver more weighted windows per second than the incumbent
        measured, by the inference times measured so far (a point that cannot is not worth a step to find out)."""
        if objective != "throughput":
            return True
        if self._rate_per_s <= 0 and point.threads < incumbent.threads and (point.variant, point.khz) == (
                incumbent.variant, incumbent.khz):
            return False  # with a continuous demand, fewer threads never classify more windows a second
        service = self._predicted_service(point, t)
        if service is None or service <= 0:
            return True
        done = 1.0 / service if self._rate_per_s <= 0 else min(self._rate_per_s, 1.0 / service)
        return done * self.variants[point.variant].quality >= (1.0 - self.hysteresis) * self.weighted_rate(incumbent)

    def choose(self, t: float, current: Point, allowed: Sequence[Point], objective: str,
               budget_w: float | None = None) -> tuple[Point, str]:
        """The point to run next, and why (one human line).

        Args:
            t: Now (seconds, the governor's clock).
            current: The point in force.
            allowed: The points the levels allow now.
            objective: ``throughput``, ``efficiency`` or ``budget``.
            budget_w: The power budget for ``budget``.
        """
        allowed = list(allowed)
        if not allowed:
            return current, "no point allowed"
        known = [p for p in allowed if self.known(p, t)]
        if not known:
            # Nothing measured yet: the variant that model.json says gives the most quality per unit of cost
            # (its cost is a measured latency ratio), at the point in force or the top allowed.
            prior = max(self.variants.values(), key=lambda v: (v.quality / v.cost, v.quality)).name
            start = Point(prior, current.threads, current.khz)
            if start not in allowed:
                start = max((p for p in allowed if p.variant == prior), key=lambda p: (p.khz, p.threads))
            return start, f"measuring {start.label()}"
        incumbent = max(known, key=lambda p: self._score(p, objective, budget_w))
        if objective == "throughput":  # of the points as good as the best, the one drawing the least
            top = self._score(incumbent, objective, budget_w) * (1.0 - self.hysteresis)
            incumbent = min((p for p in known if self._score(p, objective, budget_w) >= top),
                            key=lambda p: self.table[p].power_w)
        for n in self.neighbours(incumbent, allowed):
            if not self.known(n, t) and self._could_keep_up(n, t) and self._could_be_better(n, incumbent, t, objective):
                self._probing = n
                return n, f"measuring {n.label()} next to the best so far, {incumbent.label()}"
        self._probing = None
        self.mixing = False
        if objective == "budget" and budget_w is not None:
            mixed = self._mix(t, current, known, budget_w)
            if mixed is not None:
                return mixed
        else:
            self._credit_t = None
        if current in known and current != incumbent:
            s_inc, s_cur = (self._score(incumbent, objective, budget_w), self._score(current, objective, budget_w))
            if s_cur > 0 and s_inc <= s_cur * (1.0 + self.hysteresis):
                return current, f"holding {current.label()} (within {self.hysteresis:.0%} of {incumbent.label()})"
        return incumbent, self._why(incumbent, objective, budget_w)

    def frontier(self, points: Iterable[Point]) -> list[Point]:
        """The measured points that keep up on the upper concave frontier of weighted windows per second against
        power, by ascending power: each draws more than the one before and is worth it."""
        def xy(p: Point) -> tuple[float, float]:
            return self.table[p].power_w, self.weighted_rate(p)

        hull: list[Point] = []
        for p in sorted((p for p in points if self.keeps_up(p) and self.weighted_rate(p) > 0),
                        key=lambda p: (self.table[p].power_w, -self.weighted_rate(p))):
            x, y = xy(p)
            if hull and y <= xy(hull[-1])[1]:
                continue  # more power for no more windows
            while len(hull) >= 2:
                (x1, y1), (x2, y2) = xy(hull[-2]), xy(hull[-1])
                if (y2 - y1) * (x - x1) <= (y - y1) * (x2 - x1):
                    hull.pop()  # under the chord from the one before to this one
                else:
                    break
            hull.append(p)
        return hull

    def _mix(self, t: float, current: Point, known: Sequence[Point], budget_w: float) -> tuple[Point, str] | None:
        """The frontier point to run under ``budget_w``: the one under it and the one over it in turn, so that the
        power drawn meets the budget on average; None when no two frontier points bracket the budget."""
        hull = self.frontier(known)
        under = [p for p in hull if self.table[p].power_w <= budget_w]
        if not under or len(under) == len(hull):
            self._credit_t = None
            return None
        lo, hi = under[-1], hull[len(under)]
        band = budget_w * self.mix_band_s
        if self._credit_t is not None and current in self.table:
            self._credit += (budget_w - self.table[current].power_w) * max(0.0, t - self._credit_t)
            self._credit = max(-2.0 * band, min(2.0 * band, self._credit))
        else:
            self._credit = 0.0
        self._credit_t = t
        if current == hi:
            point = hi if self._credit > -band else lo
        elif current == lo:
            point = hi if self._credit >= band else lo
        else:
            point = hi if self._credit >= 0 else lo
        self.mixing = True
        p_lo, p_hi = self.table[lo].power_w, self.table[hi].power_w
        share = (budget_w - p_lo) / (p_hi - p_lo)
        return point, (f"{point.label()}: {hi.label()} ({p_hi:.2f} W) {share:.0%} of the time and {lo.label()} "
                       f"({p_lo:.2f} W) the rest, to draw {budget_w:.2f} W on average")

    def _why(self, point: Point, objective: str, budget_w: float | None) -> str:
        est = self.table[point]
        per_window = est.power_w / est.done_per_s if est.done_per_s > 0 else float("inf")
        base = f"{point.label()}: {est.power_w:.2f} W, {est.done_per_s:.2f} windows/s, {per_window:.3f} J/window"
        if objective == "budget" and budget_w is not None:
            return f"{base}, the most that fits {budget_w:.2f} W"
        if objective == "throughput":
            return f"{base}, the most weighted windows per second measured"
        return f"{base}, the most weighted windows per joule measured"

    def status(self) -> dict:
        """Energy per window (J) per variant and frequency step, with the threads that measured best."""
        out: dict[str, dict[str, float]] = {}
        for p, est in sorted(self.table.items(), key=lambda kv: (kv[0].variant, kv[0].khz, kv[0].threads)):
            if est.done_per_s <= 0:
                continue
            j = round(est.power_w / est.done_per_s, 4)
            key = str(p.khz // 1000)
            cell = out.setdefault(p.variant, {})
            cell[key] = min(cell.get(key, j), j)
        return {"joules_per_window": out, "points_measured": len(self.table),
                "probing": None if self._probing is None else self._probing.label()}


def quality_of(accuracy: Mapping[str, float] | None, names: Iterable[str], default: str) -> dict[str, float]:
    """Each variant's accuracy relative to the default variant's (1.0 for all when accuracy is unknown)."""
    names = list(names)
    if not accuracy or not accuracy.get(default):
        return {n: 1.0 for n in names}
    ref = float(accuracy[default])
    return {n: min(1.0, float(accuracy.get(n, ref)) / ref) for n in names}
