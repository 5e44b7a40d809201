"""The fleet summary in a board's retained state: what a fleet tool needs to count boards without asking each one.

The retained ``online`` state (:meth:`device.agent.agent.Agent.birth`, published by the link with its ``session``)
already said the agent version (``version``), the model (``models``: name, version, variants), the variant that
serves (``variant``) and the governor's level (``level``). This module adds the rest, small (a broker holds and
replays one per board):

* ``update``: the update state, one of :data:`UPDATE_STATES`, with its ``version`` and error ``code`` when there
  is one (:class:`UpdateState`, followed from the update events the agent already sees: nothing in
  :mod:`device.update` changes for it);
* ``faults``: the parts at fault now (``sensor``, ``link``, ``worker``, ``runtime``), an empty list when none;
* ``groups``: the board's groups.

The agent publishes the state again when one of these changes (:func:`republish_on`).
"""

from __future__ import annotations

import json
import logging
import threading
import time

from device.statefile import parse_versioned, set_aside, short_error, write_atomic

log = logging.getLogger(__name__)

UPDATE_STATES = ("idle", "downloading", "trial", "committed", "rolled_back", "failed", "deferred")

# Events after which the retained state is published again (besides the update events UpdateState follows).
FAULT_EVENTS = frozenset(f"{part}_{what}" for part in ("sensor", "link", "worker", "runtime")
                         for what in ("fault", "recovered"))
STATE_EVENTS = FAULT_EVENTS | {"governor_level"}

# update_install states -> the summary's state (progress is a download, unpack or validation on its way).
_INSTALL = {"started": "downloading", "progress": "downloading", "deferred": "deferred", "failed": "failed",
            "installed": "trial", "up_to_date": "idle"}


class UpdateState:
    """The board's update state, followed from the agent's ``update_*`` events; thread-safe.

    At start it is ``trial`` when the store's active slot is on trial, ``committed`` when a committed slot serves
    (its version), else ``idle``; but an outcome the store does not keep (``failed``, ``rolled_back``,
    ``deferred``, with its version and code) is kept in ``path`` and said again after a restart, until the next
    update event moves it. Then ``update_install`` (started, progress: ``downloading``; deferred; failed;
    installed: ``trial``; up_to_date: ``idle``), ``update_trial`` (started: ``trial``), ``update_committed`` and
    ``update_rolled_back`` move it.

    A file that does not parse is set aside (``<path>.corrupt-<time>``) and the store's state is used.

    Args:
        store_status: The update store's status at start (``AgentUpdates.status()["store"]``), or None.
        path: The file that keeps the summary across restarts (``<state_dir>/update-summary.json``); None keeps
            it in memory.
    """

    def __init__(self, store_status: dict | None = None, path: str | None = None) -> None:
        self._lock = threading.Lock()
        self._path = path
        self._state: dict = {"state": "idle"}
        self.problem: str | None = None
        active = (store_status or {}).get("active")
        if isinstance(active, dict) and active.get("version") is not None:
            state = "trial" if active.get("state") == "trial" else "committed"
            self._state = {"state": state, "version": active["version"]}
        kept = self._load()
        if kept is not None and kept["state"] in _KEPT:
            self._state = kept

    def summary(self) -> dict:
        """``{"state", "version", "code"}``, the last two only when known."""
        with self._lock:
            return dict(self._state)

    def on_event(self, kind: str, data: dict) -> bool:
        """Follows one agent event; True when the summary changed (the retained state should say so)."""
        new = _follow(kind, data)
        if new is None:
            return False
        new = {k: v for k, v in new.items() if v is not None}
        with self._lock:
            if new["state"] == self._state["state"] and "version" not in new and "version" in self._state:
                new["version"] = self._state["version"]  # an install's progress says no version: still the same
            if new == self._state:
                return False
            self._state = new
            self._save(new)
        return True

    def _save(self, state: dict) -> None:
        if self._path is None:
            return
        try:
            write_atomic(self._path, json.dumps({"format": _FORMAT, **state}, separators=(",", ":")).encode())
        except OSError as exc:  # the summary goes on in memory; after a restart the store's state is said
            self.problem = f"cannot write {self._path}: {short_error(exc)}"
            log.warning("update summary: %s", self.problem)

    def _load(self) -> dict | None:
        if self._path is None:
            return None
        try:
            with open(self._path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.problem = f"cannot read {self._path}: {short_error(exc)}"
            log.warning("update summary: %s", self.problem)
            return None
        try:
            return parse_summary_file(raw)
        except ValueError as exc:
            moved = set_aside(self._path, time.time())
            self.problem = f"{self._path} was corrupt ({exc}); {moved}"
            log.warning("update summary: %s", self.problem)
            return None


_FORMAT = 1
_KEPT = ("failed", "rolled_back", "deferred")  # what the store does not remember by itself


def parse_summary_file(raw: bytes) -> dict:
    """The update summary kept in the state directory: ``{"state", "version"?, "code"?}``.

    Raises:
        ValueError: Not what :class:`UpdateState` writes; the message says what is wrong.
    """
    doc = parse_versioned(raw, _FORMAT)
    if doc.get("state") not in UPDATE_STATES:
        raise ValueError(f"'state': expected one of {', '.join(UPDATE_STATES)}, got {doc.get('state')!r}")
    if "code" in doc and not isinstance(doc["code"], str):
        raise ValueError(f"'code': expected a string, got {doc['code']!r}")
    if "version" in doc and (isinstance(doc["version"], bool) or not isinstance(doc["version"], (int, str))):
        raise ValueError(f"'version': expected a number or a string, got {doc['version']!r}")
    return {k: doc[k] for k in ("state", "version", "code") if k in doc}


def _follow(kind: str, data: dict) -> dict | None:
    if kind == "update_install":
        state = _INSTALL.get(data.get("state"))
        if state is None:
            return None
        return {"state": state, "version": data.get("version"),
                "code": data.get("code") if state in ("failed", "deferred") else None}
    if kind == "update_trial" and data.get("verdict") is None and data.get("version") is not None:
        return {"state": "trial", "version": data.get("version")}  # a trial that starts (no verdict yet)
    if kind == "update_committed":
        return {"state": "committed", "version": data.get("version")}
    if kind == "update_rolled_back":
        return {"state": "rolled_back", "version": data.get("version"), "code": data.get("code")}
    return None


def faults(by_part: dict) -> list[str]:
    """The parts at fault, sorted (the summary keeps the part names; ``status`` has the problems)."""
    return sorted(by_part)


def republish_on(kind: str) -> bool:
    """Whether an event (other than the update events) changes the summary."""
    return kind in STATE_EVENTS
