"""The groups a board is in: from ``device.groups``, or set by a signed ``groups.set`` that persists.

A board subscribes to ``fieldnode/v1/group/<g>/cmd/+`` for each of its groups (:mod:`device.link.wire`), accepts
an envelope bound to ``group:<g>`` only while it is a member of ``<g>`` and only on ``<g>``'s topic
(:class:`device.link.envelope.Verifier`), and lists its groups in its retained state.

Where the set comes from:

* ``device.groups`` in the configuration, until a ``groups.set`` changes it;
* ``groups.set {"groups": [...]}`` writes the new set to ``<state_dir>/groups.json`` (atomically) before it is in
  force; from then on that file wins over ``device.groups``, across restarts and reloads (SIGHUP), until
  ``groups.set {"reset": true}`` removes it and the configuration's list is in force again.

A file that cannot be read or parsed is set aside (corrupt) or left (unreadable), the configuration's list is in
force, and :attr:`Groups.problem` says so (``status``). :class:`Groups` is thread-safe: the command thread sets,
the network thread and the verifier read, and every change calls the listeners (the link re-subscribes, the agent
republishes its state).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Callable, Iterable

from device.clock import Clock
from device.link import wire
from device.statefile import parse_versioned, set_aside, short_error, write_atomic

log = logging.getLogger(__name__)

_FORMAT = 1


def groups_problem(value: object) -> str | None:
    """Why ``value`` is not a board's list of groups, or None.

    A list of at most :data:`wire.MAX_GROUPS` unique names, each one topic level of :data:`wire.GROUP_PATTERN`.
    """
    if not isinstance(value, (list, tuple)):
        return f"expected a list of group names, got {_show(value)}"
    if len(value) > wire.MAX_GROUPS:
        return f"at most {wire.MAX_GROUPS} groups, got {len(value)}"
    seen: set[str] = set()
    for i, g in enumerate(value):
        if not isinstance(g, str) or not wire.GROUP_RE.match(g):
            return f"group {i + 1} ({_show(g)}): expected {wire.GROUP_RULE}"
        if g in seen:
            return f"group {g!r} is listed twice"
        seen.add(g)
    return None


class Groups:
    """The board's groups in force, and where they come from.

    Args:
        configured: ``device.groups`` (checked by the configuration).
        path: The file a ``groups.set`` persists to (``<state_dir>/groups.json``); None keeps it in memory.
        clock: ``time()`` for the stamp of a change and the name of a corrupt file set aside.
    """

    def __init__(self, configured: Iterable[str] = (), path: str | None = None, clock: Clock | None = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        self._clock = clock
        self._lock = threading.Lock()
        self._configured = tuple(configured)
        self._persisted: tuple[str, ...] | None = None
        self._set_by: dict | None = None
        self.problem: str | None = None
        self._listeners: list[Callable[[tuple[str, ...]], None]] = []
        self._load()

    @property
    def current(self) -> tuple[str, ...]:
        """The groups in force: the persisted set when there is one, else the configuration's."""
        with self._lock:
            return self._persisted if self._persisted is not None else self._configured

    def __contains__(self, group: object) -> bool:
        return group in self.current

    @property
    def source(self) -> str:
        """``"command"`` (a ``groups.set`` persisted them) or ``"config"`` (``device.groups``)."""
        return "command" if self._persisted is not None else "config"

    def on_change(self, listener: Callable[[tuple[str, ...]], None]) -> None:
        """Calls ``listener(groups)`` after every change of the groups in force."""
        self._listeners.append(listener)

    def status(self) -> dict:
        """For ``status`` and the ``groups.set`` reply: the groups, their source, who set them, a file problem."""
        with self._lock:
            return {"groups": list(self._persisted if self._persisted is not None else self._configured),
                    "source": "command" if self._persisted is not None else "config",
                    "config": list(self._configured), "set_by": self._set_by, "problem": self.problem}

    def set(self, groups: Iterable[str], by: str | None = None) -> dict:
        """Makes ``groups`` the board's groups, persisted before they are in force.

        Raises:
            ValueError: Not a valid list of groups (:func:`groups_problem`); nothing changed.
            OSError: The file could not be written; nothing changed.
        """
        groups = list(groups) if isinstance(groups, (list, tuple)) else groups
        problem = groups_problem(groups)
        if problem is not None:
            raise ValueError(problem)
        new = tuple(groups)
        stamp = {"by": by, "at": self._now()}
        if self.path is not None:
            doc = {"format": _FORMAT, "groups": list(new), "set_by": stamp}
            write_atomic(self.path, json.dumps(doc, separators=(",", ":")).encode("utf-8"))
        with self._lock:
            before = self._current_locked()
            self._persisted, self._set_by, self.problem = new, stamp, None
        self._changed(before)
        return self.status()

    def reset(self, by: str | None = None) -> dict:
        """Drops the persisted set: the configuration's groups are in force again.

        Raises:
            OSError: The file could not be removed; nothing changed.
        """
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        with self._lock:
            before = self._current_locked()
            self._persisted, self._set_by = None, {"by": by, "at": self._now(), "reset": True}
        self._changed(before)
        return self.status()

    def use_config(self, configured: Iterable[str]) -> None:
        """The configuration's list after a reload; in force only while no ``groups.set`` overrides it."""
        with self._lock:
            before = self._current_locked()
            self._configured = tuple(configured)
        self._changed(before)

    def _current_locked(self) -> tuple[str, ...]:
        return self._persisted if self._persisted is not None else self._configured

    def _changed(self, before: tuple[str, ...]) -> None:
        now = self.current
        if now == before:
            return
        log.info("groups: %s (from %s)", ", ".join(now) or "none", self.source)
        for listener in list(self._listeners):
            try:
                listener(now)
            except Exception:  # a listener's bug must not undo a change already persisted
                log.exception("groups: a change listener failed")

    def _now(self) -> float | None:
        return self._clock.time() if self._clock is not None else None

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            self.problem = (f"groups file {self.path}: cannot read it ({short_error(exc)}); device.groups is in "
                            f"force")
            log.warning("groups: %s", self.problem)
            return
        try:
            self._persisted, self._set_by = parse_groups_file(raw)
        except ValueError as exc:
            moved = set_aside(self.path, self._now() or 0.0)
            self.problem = f"groups file {self.path}: corrupt ({exc}); {moved}; device.groups is in force"
            log.warning("groups: %s", self.problem)


def parse_groups_file(raw: bytes) -> tuple[tuple[str, ...], dict | None]:
    """``(groups, set_by)`` of a groups file.

    Raises:
        ValueError: Not what :meth:`Groups.set` writes; the message says what is wrong.
    """
    doc = parse_versioned(raw, _FORMAT)
    problem = groups_problem(doc.get("groups"))
    if problem is not None:
        raise ValueError(f"'groups': {problem}")
    set_by = doc.get("set_by")
    return tuple(doc["groups"]), set_by if isinstance(set_by, dict) else None


def _show(value: object) -> str:
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."
