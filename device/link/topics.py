"""The topic tree of one board (default prefix ``fieldnode/v1/<device id>``); see docs/mqtt.md."""

from __future__ import annotations

import re

from device.link.errors import BrokerUrlError

_SEGMENT = re.compile(r"[^/+#\x00]+")


def default_prefix(device_id: str) -> str:
    return f"fieldnode/v1/{device_id}"


class Topics:
    """Topic names under ``prefix``.

    Raises:
        BrokerUrlError: The prefix is empty, has an empty level, or contains a wildcard (``+``, ``#``).
    """

    def __init__(self, prefix: str):
        levels = prefix.split("/")
        if not prefix or not all(_SEGMENT.fullmatch(level) for level in levels):
            raise BrokerUrlError(f"topic prefix {prefix!r} must be non-empty levels without '+', '#' or NUL, "
                                 f"like fieldnode/v1/pump-07")
        self.prefix = prefix
        self.state = f"{prefix}/state"
        self.telemetry = f"{prefix}/telemetry"
        self.events = f"{prefix}/events"
        self.reply = f"{prefix}/reply"
        self.cmd_filter = f"{prefix}/cmd/+"
        self._cmd = f"{prefix}/cmd/"

    def results(self, model: str) -> str:
        if not _SEGMENT.fullmatch(model):
            raise ValueError(f"model name {model!r} cannot be a topic level")
        return f"{self.prefix}/results/{model}"

    def command_name(self, topic: str) -> str | None:
        """The command name of a ``<prefix>/cmd/<name>`` topic, else None."""
        if topic.startswith(self._cmd):
            name = topic[len(self._cmd):]
            return name if name and "/" not in name else None
        return None
