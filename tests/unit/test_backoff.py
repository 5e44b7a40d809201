"""The one jittered exponential backoff (device.clock.backoff_delay) that the link and the sensor share."""

from __future__ import annotations

import random

import pytest

from device.clock import backoff_delay


@pytest.mark.parametrize("attempt, nominal", [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (400, 5.0),
                                              (-3, 0.5)])
def test_delay_doubles_up_to_the_cap_and_stays_in_the_upper_half(attempt, nominal):
    rng = random.Random(7)
    waits = [backoff_delay(attempt, 0.5, 5.0, rng) for _ in range(200)]
    assert all(nominal / 2 <= w <= nominal for w in waits)
    assert max(waits) - min(waits) > nominal / 4  # jittered, not a constant


def test_seeded_randomness_is_reproducible():
    a, b = random.Random(3), random.Random(3)
    assert [backoff_delay(i, 0.2, 60, a) for i in range(10)] == [backoff_delay(i, 0.2, 60, b) for i in range(10)]
