import random

import pytest

from device.runtime.histogram import LatencyHistogram


def test_empty_histogram_reports_none():
    h = LatencyHistogram()
    assert h.percentile_ms(50) is None
    assert h.summary() == {"count": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None,
                           "max_ms": None}


def test_percentiles_are_within_two_percent_of_exact():
    rng = random.Random(1)
    samples = [int(rng.lognormvariate(13, 0.6)) for _ in range(20000)]  # ~0.4 ms median
    h = LatencyHistogram()
    for s in samples:
        h.record(s)
    exact = sorted(samples)
    for q in (50, 95, 99):
        want = exact[int(q / 100 * len(exact)) - 1] / 1e6
        assert h.percentile_ms(q) == pytest.approx(want, rel=0.02)
    s = h.summary()
    assert s["count"] == 20000 and s["max_ms"] == pytest.approx(max(samples) / 1e6, abs=1e-4)
    assert s["mean_ms"] == pytest.approx(sum(samples) / len(samples) / 1e6, rel=1e-3)


def test_extremes_and_reset():
    h = LatencyHistogram()
    h.record(0)
    h.record(10**15)  # beyond the last bucket: clamped, not an IndexError
    assert h.count == 2 and h.percentile_ms(1) == 0.001
    h.reset()
    assert h.count == 0 and h.percentile_ms(50) is None
