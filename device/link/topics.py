"""The topic tree of one board (default prefix ``fieldnode/v1/<device id>``); see docs/mqtt.md.

It is part of the wire contract and lives in :mod:`device.link.wire` with the rest of it; this module keeps the
name its importers use.
"""

from __future__ import annotations

from device.link.wire import TOPIC_ROOT, Topics, default_prefix

__all__ = ["TOPIC_ROOT", "Topics", "default_prefix"]
