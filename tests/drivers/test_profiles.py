"""The board profiles against the wall power published for each board.

"Idle" is the kernel's default governor at idle: the lowest table frequency, no busy core. "Loaded" is every
core busy at the highest frequency. Each profile must be within 10 % of its published figures.
"""

from __future__ import annotations

import pytest

from drivers.sim.profiles import PROFILES, get_profile

# name: (idle W, loaded W, source)
PUBLISHED = {
    # Raspberry Pi 4 B: about 2.7 W idle, 6.4 W with four cores loaded (published wall power, as collected in
    # the project's facts file, "Power on the board").
    "rpi4": (2.7, 6.4),
    # Raspberry Pi 5: about 3 W idle, 8-9 W loaded (same source); the loaded figure is the middle, 8.5 W.
    "rpi5": (3.0, 8.5),
    # Jetson Orin Nano developer kit, 15 W mode: idle 4.5 W is an ASSUMPTION (stock kit with fan and NVMe; an
    # NVIDIA developer forum thread measures 2.6 W only for a board stripped of most peripherals). Loaded is
    # bounded by the mode's budget instead (test below), as NVIDIA publishes the mode, not a CPU-only figure.
    "jetson-orin-nano": (4.5, None),
}


def idle_w(name: str) -> float:
    p = get_profile(name)
    return p.power_w(p.min_khz, 0)


def loaded_w(name: str) -> float:
    p = get_profile(name)
    return p.power_w(p.max_khz, p.cpus)


def test_every_profile_has_published_figures():
    assert set(PUBLISHED) == set(PROFILES)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_idle_power_is_within_ten_percent_of_the_published_figure(name):
    assert idle_w(name) == pytest.approx(PUBLISHED[name][0], rel=0.10)


@pytest.mark.parametrize("name", [n for n, (_, loaded) in sorted(PUBLISHED.items()) if loaded is not None])
def test_full_load_power_is_within_ten_percent_of_the_published_figure(name):
    assert loaded_w(name) == pytest.approx(PUBLISHED[name][1], rel=0.10)


def test_the_jetson_stays_within_its_power_mode_budget_at_full_cpu_load():
    p = get_profile("jetson-orin-nano")
    assert p.power_budget_w == 15.0  # NVIDIA's 15 W nvpmodel mode
    assert idle_w(p.name) < loaded_w(p.name) <= p.power_budget_w


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_power_grows_with_frequency_and_load(name):
    p = get_profile(name)
    by_freq = [p.power_w(f, 1) for f in p.frequencies_khz]
    assert by_freq == sorted(by_freq) and by_freq[0] < by_freq[-1]
    assert p.power_w(p.max_khz, 2) > p.power_w(p.max_khz, 1) > p.power_w(p.max_khz, 0)
    assert p.power_w(p.max_khz, p.cpus + 3) == p.power_w(p.max_khz, p.cpus)  # no more cores than the board has
