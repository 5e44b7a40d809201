"""Helpers shared by the spool tests."""

from __future__ import annotations


import pytest

from device.link.spool.spool import Kind, Message, Spool
from drivers.sim.clock import SimClock

T, R, E = Kind.TELEMETRY, Kind.RESULT, Kind.EVENT


@pytest.fixture
def clock():
    """The spool tests' clock (import it into a test module to use it as a fixture)."""
    return SimClock()


@pytest.fixture
def path(tmp_path):
    """Where a spool test's database lives (import it into a test module to use it as a fixture)."""
    return str(tmp_path / "spool" / "spool.db")


def all_messages(spool: Spool) -> list[Message]:
    return spool.batch(0, 1_000_000)
