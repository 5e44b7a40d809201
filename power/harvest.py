"""The harvest a board was given over the last day, and the constant power it can sustain on it.

A solar board's battery is a buffer between a harvest that comes by day and a load that runs day and night.
The board does not know the sun; it knows its battery gauge (the charge or energy left) and the power it draws
(a power monitor, the battery's own gauge while it discharges, or the board profile's model). From those two
the harvest follows: what the battery gained per second plus what the load would have drained from it.

:class:`HarvestLog` keeps that gain for each slot of one period (a day, ``period_s``), as last observed, on the
governor's monotonic clock: only the period matters, not the time of day. A slot observed while the battery was
full records what the load took, a lower bound (the rest of the harvest was turned away).

:meth:`HarvestLog.sustainable_w` plans on the assumption that the next period repeats the last one: the
largest constant power whose drain, walked slot by slot over one period from the charge left now (the battery
clipped at its capacity, where a harvest is wasted), never takes the battery under ``reserve``. Re-planned as
the governor goes, this is an energy-neutral budget: at night it spends the charge until the harvest is due to
cover the board again; by day it stores what that night will need and spends the rest, so it neither browns out
nor turns a harvest away while the repeat holds. Where the repeat fails (a cloudy day), the charge measured
lowers the next plan; the reserve covers the gap until it does.

Pure: no I/O, no clock. The governor feeds it samples and asks it for a budget.
"""

from __future__ import annotations

import math


class HarvestLog:
    """The harvest's gain to the battery per slot of the last period.

    Args:
        period_s: The harvest's period (a day).
        slot_s: One slot: the harvest is taken as constant within it.
        recent_slots: How many of the last slots check that the period repeats.
        tolerance: The shortfall against the period before that is taken for measurement noise.
        reserve_share: The share of the battery's capacity the plan keeps for a harvest that comes late.
        full_pct: A battery this full is full (the harvest beyond the load is turned away).
        replan_s: :meth:`budget_w` walks the period again after this long.
    """

    def __init__(self, period_s: float = 86400.0, slot_s: float = 600.0, recent_slots: int = 6,
                 tolerance: float = 0.4, reserve_share: float = 0.05, full_pct: float = 98.0, replan_s: float = 60.0):
        if not (math.isfinite(period_s) and math.isfinite(slot_s) and 0 < slot_s <= period_s):
            raise ValueError(f"need 0 < slot_s <= period_s, got slot_s={slot_s!r}, period_s={period_s!r}")
        if not 0 <= tolerance < 1:
            raise ValueError(f"the tolerance must be in [0, 1), got {tolerance!r}")
        self.tolerance = float(tolerance)
        self.reserve_share, self.full_pct, self.replan_s = float(reserve_share), float(full_pct), float(replan_s)
        self.capacity: float | None = None  # the battery's charge (or energy) when full, as measured
        self.planned: tuple[float, float] | None = None  # (when, watts) of the last plan
        self.period_s, self.slot_s = float(period_s), float(slot_s)
        self.slots = max(1, int(round(period_s / slot_s)))
        self.recent_slots = max(1, int(recent_slots))
        self.gain: list[float | None] = [None] * self.slots  # fuel units per second the harvest brought
        self._before: list[float | None] = [None] * self.slots  # the same, one period earlier
        self._full: list[bool] = [False] * self.slots  # the battery was full in the slot (its gain a lower bound)
        self._recent: list[int] = []  # the slots closed last, oldest first
        self._first: float | None = None  # when the first slot was opened
        self._open: tuple[int, float, float, float] | None = None  # slot, t0, fuel at t0, load integral (W s)
        self._last_t: float | None = None
        self._last_load = 0.0

    def _slot(self, t: float) -> int:
        return int((t % self.period_s) // self.slot_s) % self.slots

    def add(self, t: float, fuel: float, load_w: float, w_per_fuel: float, battery_pct: float | None = None) -> None:
        """One sample: ``fuel`` (charge or energy) left at ``t``, the board drawing ``load_w`` since the last
        sample, ``w_per_fuel`` watts per unit of fuel per second while the battery feeds the board, and the
        battery's percentage (its capacity follows from it; a full battery turns a harvest away)."""
        if not (math.isfinite(fuel) and math.isfinite(load_w) and w_per_fuel > 0):
            return
        full = battery_pct is not None and battery_pct >= self.full_pct
        if battery_pct is not None and battery_pct >= 50.0:  # the percentage's rounding is under 1 % up there
            self.capacity = fuel * 100.0 / battery_pct
        if self._last_t is not None and t <= self._last_t:
            return
        if self._open is not None and self._last_t is not None:
            slot, t0, f0, load_ws = self._open
            load_ws += load_w * (t - self._last_t)
            self._open = (slot, t0, f0, load_ws)
            self._full[slot] = self._full[slot] or full
            if self._slot(t) != slot or t - t0 >= self.slot_s:
                seconds = t - t0
                if seconds >= 0.5 * self.slot_s:  # a slot seen in part (a start, a gap) is not a measurement
                    self._before[slot] = self.gain[slot]
                    self.gain[slot] = (fuel - f0) / seconds + load_ws / seconds / w_per_fuel
                    self._recent = (self._recent + [slot])[-self.recent_slots:]
                self._open = None
        if self._open is None:
            self._open = (self._slot(t), t, fuel, 0.0)
            self._full[self._slot(t)] = full
            if self._first is None:
                self._first = t
        self._last_t = t

    def ready(self, now: float) -> bool:
        """Whether a whole period has been observed (before that, the repeat is not known)."""
        return self._first is not None and now - self._first >= self.period_s and all(
            g is not None for g in self.gain)

    def daily_gain(self) -> float:
        """The fuel the last period's harvest brought (fuel units), before any load."""
        return sum(g or 0.0 for g in self.gain) * self.slot_s

    def repeat_share(self) -> float:
        """How much of the period before's harvest the plan counts on: 1.0 while the last slots brought at least
        ``1 - tolerance`` of what the same slots brought the period before (or there is nothing to compare: the
        night, a first period, a full battery), less in proportion below that."""
        now_sum = before_sum = 0.0
        for slot in self._recent:
            if self._before[slot] is None or self._full[slot]:
                continue
            now_sum += max(0.0, self.gain[slot] or 0.0)
            before_sum += max(0.0, self._before[slot])
        # a slot's worth of the day's mean harvest keeps a dawn's tiny figures from deciding the share
        floor = max(0.0, self.daily_gain()) / self.period_s * len(self._recent) * 0.1
        if before_sum <= floor:
            return 1.0
        return max(0.0, min(1.0, (now_sum + floor) / (before_sum + floor) / (1.0 - self.tolerance)))

    def _survives(self, now: float, fuel: float, capacity: float, reserve: float, drain: float,
                  share: float = 1.0) -> bool:
        """Whether a constant ``drain`` (fuel per second) keeps the battery at or over ``reserve`` for a period,
        with the harvest at ``share`` of the last period's."""
        t, end = now, now + self.period_s
        while t < end - 1e-9:
            slot = self._slot(t)
            nxt = min(end, (math.floor(t / self.slot_s) + 1) * self.slot_s)
            fuel = min(capacity, fuel + (share * (self.gain[slot] or 0.0) - drain) * (nxt - t))
            if fuel < reserve:
                return False
            t = nxt
        return True

    def sustainable_w(self, now: float, fuel: float, capacity: float, reserve: float, w_per_fuel: float,
                      most_w: float) -> float:
        """The largest constant power (watts, at ``w_per_fuel``) that keeps the battery over ``reserve`` for one
        period if the harvest repeats the last period's; 0 when not even none does, ``most_w`` at most.

        Args:
            now: The governor's clock.
            fuel: The charge (or energy) left now.
            capacity: The battery's charge (or energy) when full.
            reserve: The charge (or energy) the plan must never go under.
            w_per_fuel: Watts per unit of fuel per second drained.
            most_w: The most the board can draw (the search's upper end).
        """
        share = self.repeat_share()
        if not self._survives(now, fuel, capacity, reserve, 0.0, share):
            return 0.0
        lo, hi = 0.0, max(0.0, most_w) / w_per_fuel
        if self._survives(now, fuel, capacity, reserve, hi, share):
            return most_w
        for _ in range(24):
            mid = (lo + hi) / 2.0
            if self._survives(now, fuel, capacity, reserve, mid, share):
                lo = mid
            else:
                hi = mid
        return lo * w_per_fuel

    def budget_w(self, now: float, fuel: float, w_per_fuel: float, most_w: float) -> float | None:
        """:meth:`sustainable_w` from the charge left now, with the reserve kept, walked again every
        ``replan_s``; None before a whole period was observed, without a harvest, or before the capacity is
        known."""
        if self.capacity is None or not self.ready(now) or self.daily_gain() <= 0:
            return None
        if self.planned is None or now - self.planned[0] >= self.replan_s:
            watts = self.sustainable_w(now, fuel, self.capacity, self.capacity * self.reserve_share, w_per_fuel,
                                       most_w)
            self.planned = (now, watts)
        return self.planned[1]

    def status(self, now: float) -> dict:
        """For telemetry: whether a period is learned, its gain, the share of it counted on, the last plan."""
        return {"ready": self.ready(now), "daily_gain": round(self.daily_gain(), 4),
                "repeat_share": round(self.repeat_share(), 3),
                "sustainable_w": None if self.planned is None else round(self.planned[1], 3)}
