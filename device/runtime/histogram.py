"""A fixed-memory latency histogram with log-spaced buckets (about 1 % relative resolution).

Recording is O(1) and allocation-free, so it can sit on the per-inference path. Percentiles are read from
the bucket counts; the value reported for a bucket is its geometric midpoint.
"""

from __future__ import annotations

import math
import threading

_GROWTH = 1.02  # bucket width: each bucket is 2 % wider than the one before (~1 % error at its midpoint)
_LOG_GROWTH = math.log(_GROWTH)
_MIN_NS = 1_000.0  # 1 µs: everything faster lands in bucket 0
_BUCKETS = int(math.log(600e9 / _MIN_NS) / _LOG_GROWTH) + 2  # up to 10 minutes


class LatencyHistogram:
    """Counts latencies (in nanoseconds) into log-spaced buckets; thread-safe."""

    def __init__(self) -> None:
        self._counts = [0] * _BUCKETS
        self._n = 0
        self._sum_ns = 0
        self._max_ns = 0
        self._lock = threading.Lock()

    def record(self, ns: int) -> None:
        """Adds one latency sample, in nanoseconds."""
        if ns <= _MIN_NS:
            i = 0
        else:
            i = min(int(math.log(ns / _MIN_NS) / _LOG_GROWTH) + 1, _BUCKETS - 1)
        with self._lock:
            self._counts[i] += 1
            self._n += 1
            self._sum_ns += ns
            if ns > self._max_ns:
                self._max_ns = ns

    @property
    def count(self) -> int:
        """The number of samples recorded."""
        return self._n

    def percentile_ms(self, q: float) -> float | None:
        """Returns the q-th percentile (0 < q <= 100) in milliseconds, or None with no samples."""
        with self._lock:
            n = self._n
            if n == 0:
                return None
            rank = max(1, math.ceil(q / 100.0 * n))
            seen = 0
            for i, c in enumerate(self._counts):
                seen += c
                if seen >= rank:
                    break
        if i == 0:
            return _MIN_NS / 1e6
        lo = _MIN_NS * _GROWTH ** (i - 1)
        return lo * math.sqrt(_GROWTH) / 1e6

    def summary(self) -> dict:
        """Returns ``{count, p50_ms, p95_ms, p99_ms, mean_ms, max_ms}`` (None where there are no samples)."""
        n = self._n
        return {
            "count": n,
            "p50_ms": _round(self.percentile_ms(50)),
            "p95_ms": _round(self.percentile_ms(95)),
            "p99_ms": _round(self.percentile_ms(99)),
            "mean_ms": _round(self._sum_ns / n / 1e6) if n else None,
            "max_ms": _round(self._max_ns / 1e6) if n else None,
        }

    def reset(self) -> None:
        """Forgets every sample."""
        with self._lock:
            self._counts = [0] * _BUCKETS
            self._n = 0
            self._sum_ns = 0
            self._max_ns = 0


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)
