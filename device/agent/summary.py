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

import threading

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
    (its version), else ``idle``. Then ``update_install`` (started, progress: ``downloading``; deferred; failed;
    installed: ``trial``; up_to_date: ``idle``), ``update_trial`` (started: ``trial``), ``update_committed`` and
    ``update_rolled_back`` move it.

    Args:
        store_status: The update store's status at start (``AgentUpdates.status()["store"]``), or None.
    """

    def __init__(self, store_status: dict | None = None) -> None:
        self._lock = threading.Lock()
        self._state: dict = {"state": "idle"}
        active = (store_status or {}).get("active")
        if isinstance(active, dict) and active.get("version") is not None:
            state = "trial" if active.get("state") == "trial" else "committed"
            self._state = {"state": state, "version": active["version"]}

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
        return True


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
