"""A board's retained state and its session counter: ``online``, ``offline`` and the last will ``lost``.

The broker keeps one retained message per topic, the last one. A board that reconnects publishes ``online``; the
will of its previous connection (``lost``) may still come later (the broker notices a dead connection only after
the keepalive, or publishes the old will when the new connection takes the client id over). Left alone, that late
``lost`` would be the retained state of a board that is online. Two things prevent it, as Sparkplug's ``bdSeq``
does:

1. **A session counter** (:class:`SessionCounter`): a number kept in the state directory (written atomically) and
   made one higher before every connect. The ``online`` of a connection, its will ``lost`` and its ``offline`` all
   carry it as ``session``, so a consumer can tell a late ``lost`` from an old session apart from a newer
   ``online`` (:func:`device.link.wire.state_supersedes`).
2. **The board heals its own state**: it subscribes to its own state topic, and while connected, a ``lost`` or
   ``offline`` (or a message without a session) from an older session than its own makes it publish ``online``
   again (:func:`needs_heal`). The retained state of a connected board therefore ends as ``online``.

A counter file that cannot be written does not stop the link: the counter goes on in memory, the problem is
logged once and shown in ``status`` (``link.session_problem``); after a restart it would count again from the last
number written.
"""

from __future__ import annotations

import json
import logging
import os

from device.clock import Clock
from device.link import wire
from device.statefile import parse_versioned, set_aside, short_error, write_atomic

log = logging.getLogger(__name__)

_FORMAT = 1


class SessionCounter:
    """The session number of a board's connections, persisted in ``path`` (None: in memory only).

    Args:
        path: The counter file (``<state_dir>/link-session.json``), or None.
        clock: ``time()`` for the name of a corrupt file set aside.
    """

    def __init__(self, path: str | None = None, clock: Clock | None = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.problem: str | None = None
        self._clock = clock
        self.value = self._read()

    def next(self) -> int:
        """The next session number (one more than the last), written before it is returned."""
        self.value += 1
        if self.path is not None:
            try:
                write_atomic(self.path, json.dumps({"format": _FORMAT, "session": self.value}).encode("ascii"))
            except OSError as exc:
                if self.problem is None:
                    log.warning("link: session counter %s: cannot write it (%s); counting on in memory", self.path,
                                short_error(exc))
                self.problem = f"session counter {self.path}: cannot write it ({short_error(exc)})"
            else:
                self.problem = None
        return self.value

    def _read(self) -> int:
        if self.path is None:
            return 0
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            self.problem = f"session counter {self.path}: cannot read it ({short_error(exc)}); counting from 0"
            log.warning("link: %s", self.problem)
            return 0
        try:
            return parse_counter(raw)
        except ValueError as exc:
            when = self._clock.time() if self._clock is not None else 0.0
            moved = set_aside(self.path, when)
            self.problem = f"session counter {self.path}: corrupt ({exc}); {moved}; counting from 0"
            log.warning("link: %s", self.problem)
            return 0


def parse_counter(raw: bytes) -> int:
    """The session number of a counter file.

    Raises:
        ValueError: Not the JSON object this module writes; the message says what is wrong.
    """
    doc = parse_versioned(raw, _FORMAT)
    value = doc.get("session")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"'session': expected an integer >= 0, got {value!r}")
    return value


def will(device_id: str, session: int, groups: tuple[str, ...] = ()) -> dict:
    """The last will of a connection: ``{"state": "lost", "device", "session"}``, and ``groups`` (the board's
    groups when it connected) when it has any, so a fleet tool expects a lost member of a group."""
    out = {"state": "lost", "device": device_id, "session": session}
    if groups:
        out["groups"] = list(groups)
    return out


def offline(device_id: str, session: int, time: float, groups: tuple[str, ...] = ()) -> dict:
    """The clean stop's state: ``{"state": "offline", "device", "session", "time"}``, and ``groups`` when the board
    has any (a fleet tool counts a member that is away as missing)."""
    out = {"state": "offline", "device": device_id, "session": session, "time": time}
    if groups:
        out["groups"] = list(groups)
    return out


def online(device_id: str, session: int, time: float, birth: dict) -> dict:
    """A connection's ``online`` state: ``{"state": "online", "device", "session", "time", **birth}``."""
    return {"state": "online", "device": device_id, "session": session, "time": time, **birth}


def needs_heal(payload: bytes, session: int) -> bool:
    """Whether a message seen on the board's own state topic, while connected in ``session``, calls for publishing
    ``online`` again: a ``lost`` or ``offline`` from an older session (or without one), or anything that is not a
    state at all. Our own ``online`` (same session) does not."""
    try:
        doc = wire.parse_object(payload)
    except ValueError:
        return True  # something else took the retained state: put ours back
    if doc.get("state") not in wire.STATES:
        return True
    seen = doc.get("session")
    if isinstance(seen, bool) or not isinstance(seen, int):
        return True
    return seen < session  # an old connection's state (an online too: a delayed copy); ours is newer
