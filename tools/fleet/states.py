"""Every board's retained state, as a fleet tool sees it: read once (with a marker that says the view is complete)
or followed live.

1. :class:`StateReader` connects, subscribes to ``fieldnode/v1/+/state``, then subscribes to and publishes a
   marker on a topic of its own (``fieldnode/v1/_fleet/marker/<client id>``). mosquitto sends a subscription's
   retained messages before it handles the client's next packet, so when the marker comes back every retained
   state has come before it (on a broker cluster this is a good heuristic, not a guarantee; the deadline bounds
   the wait either way).
2. :class:`FleetView` keeps one entry per board and applies the session rule
   (:func:`device.link.wire.state_supersedes`): a ``lost`` or ``offline`` from an older session than the newest
   ``online`` seen is ignored. A retained state that is not a state (not JSON, a wrong shape) is ``unreadable``,
   named with what is wrong; an empty one (a cleared retained message) removes the board.
3. An ``offline`` or ``lost`` state carries no summary but the board's groups (models, update state...): the view
   keeps the last ``online`` it saw of the board, and :func:`load_known` / :func:`save_known` keep them in a file between runs (``--known``),
   so a member of a group that is offline now is still known as one.

A board is named by its topic level (``fieldnode/v1/<id>/state``): boards with another ``link.prefix`` are not seen.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import paho.mqtt.client as mqtt

from device.clock import SYSTEM_CLOCK, Clock
from device.errors import UsageError
from device.link import wire
from device.link.errors import ConnectError, LinkError, NoReply, SubscribeError
from device.link.mqttclient import Endpoint, new_client
from device.link.session import REPLY_MAX_PACKET, reason
from device.statefile import write_atomic

log = logging.getLogger(__name__)

STATE_FILTER = f"{wire.TOPIC_ROOT}/+/state"
FLEET_ROOT = f"{wire.TOPIC_ROOT}/_fleet"  # the tools' own topics: markers and reply topics
SUMMARY_FIELDS = ("version", "models", "variant", "update", "level", "faults", "groups")
KEEPALIVE_S = 30
_KNOWN_FORMAT = 1


def device_of(topic: str) -> str | None:
    """The board id of a ``fieldnode/v1/<id>/state`` topic, else None."""
    levels = topic.split("/")
    if len(levels) == 4 and f"{levels[0]}/{levels[1]}" == wire.TOPIC_ROOT and levels[3] == "state" and levels[2]:
        return levels[2]
    return None


def parse_state(payload: bytes) -> dict:
    """A retained state as the contract describes it (docs/fleet.md, the fleet summary).

    Raises:
        ValueError: Not a JSON object, or a field of the wrong type; the message names it.
    """
    doc = wire.parse_object(payload)
    if doc.get("state") not in wire.STATES:
        raise ValueError(f"'state': expected one of {', '.join(wire.STATES)}, got {_show(doc.get('state'))}")
    for name, kinds, what in (("session", int, "an integer"), ("time", (int, float), "a number"),
                              ("version", str, "a string"), ("variant", str, "a string"), ("level", str, "a string"),
                              ("models", dict, "an object"), ("update", dict, "an object"),
                              ("faults", list, "a list"), ("groups", list, "a list")):
        value = doc.get(name)
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise ValueError(f"'{name}': expected {what}, got {_show(value)}")
    for name in ("faults", "groups"):
        if any(not isinstance(v, str) for v in doc.get(name) or ()):
            raise ValueError(f"'{name}': expected a list of strings, got {_show(doc[name])}")
    if any(not isinstance(v, dict) for v in (doc.get("models") or {}).values()):
        raise ValueError(f"'models': expected an object of objects, got {_show(doc['models'])}")
    return doc


@dataclass
class Board:
    """One board in the view: its retained state that counts, and the last ``online`` seen of it (the summary)."""

    device: str
    doc: dict
    online: dict | None = None

    @property
    def state(self) -> str:
        return self.doc["state"]

    @property
    def last_seen(self) -> float | None:
        """When the state was published; for a ``lost`` (which says no time), the last ``online``'s."""
        t = self.doc.get("time")
        if t is None and self.online is not None:
            t = self.online.get("time")
        return t

    def get(self, name: str) -> object:
        """A summary field: from the state itself when online, else from the last ``online`` seen."""
        src = self.doc if self.state == "online" else (self.online or {})
        return src.get(name)

    @property
    def groups(self) -> list[str]:
        """The board's groups: an ``offline`` or ``lost`` state says them too (its groups when it connected)."""
        if "groups" in self.doc:
            return list(self.doc["groups"] or [])
        return list(self.get("groups") or [])

    def models(self) -> list[tuple[str, str | None]]:
        """``[(model name, version)]`` of the summary."""
        models = self.get("models") or {}
        return [(name, m.get("version") if isinstance(m.get("version"), str) else None)
                for name, m in sorted(models.items())]

    def as_json(self) -> dict:
        out = {"device": self.device, "state": self.state, "session": self.doc.get("session"),
               "time": self.doc.get("time"), "last_seen": self.last_seen}
        out.update({name: self.get(name) for name in SUMMARY_FIELDS})
        out["groups"] = self.groups
        out["summary_from"] = "state" if self.state == "online" else ("last_online" if self.online else None)
        return out


@dataclass(frozen=True)
class Change:
    """What one message did to the view: ``before`` and ``after`` are states (``unreadable``, ``gone``, None);
    ``fields`` the summary fields an ``online`` after an ``online`` changed, ``{name: (old, new)}``."""

    device: str
    before: str | None
    after: str
    ignored: bool = False
    session: int | None = None
    detail: str | None = None
    fields: dict = field(default_factory=dict)
    new_session: bool = True


@dataclass
class FleetView:
    """The boards as their retained states say. Not thread-safe: :class:`StateReader` calls it under its lock."""

    boards: dict[str, Board] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)
    known: dict[str, dict] = field(default_factory=dict)  # device -> last online seen before (load_known)

    def apply(self, topic: str, payload: bytes) -> Change | None:
        """Takes one message from a state topic into the view; None when the topic is no board's state."""
        device = device_of(topic)
        if device is None:
            return None
        old = self.boards.get(device)
        before = old.state if old else ("unreadable" if device in self.unreadable else None)
        if not payload:
            self.boards.pop(device, None)
            self.unreadable.pop(device, None)
            return Change(device, before, "gone")
        try:
            doc = parse_state(payload)
        except ValueError as exc:
            self.boards.pop(device, None)
            self.unreadable[device] = str(exc)
            return Change(device, before, "unreadable", detail=str(exc))
        session = doc.get("session")
        if old is not None and not wire.state_supersedes(doc, old.doc):
            return Change(device, before, doc["state"], ignored=True, session=session,
                          detail=f"session {session} is older than the online of session {old.doc.get('session')}")
        if doc["state"] == "online":
            online = doc
        else:
            online = old.online if old is not None else self.known.get(device)
        changed: dict = {}
        same_session = old is not None and old.doc.get("session") == session
        if old is not None and old.state == "online" and doc["state"] == "online":
            changed = {f: (old.doc.get(f), doc.get(f)) for f in SUMMARY_FIELDS if old.doc.get(f) != doc.get(f)}
        self.boards[device] = Board(device, doc, online)
        self.unreadable.pop(device, None)
        return Change(device, before, doc["state"], session=session, fields=changed, new_session=not same_session)

    def members(self, group: str) -> list[str]:
        """The boards whose (last known) groups include ``group``, sorted."""
        return sorted(d for d, b in self.boards.items() if group in b.groups)


def load_known(path: str) -> dict[str, dict]:
    """The last ``online`` states a fleet tool saw, from ``--known`` (a missing file is an empty one).

    Raises:
        UsageError: The file cannot be read or is not what :func:`save_known` writes (named, with why).
    """
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsageError(f"--known {path}: cannot read it ({reason(exc)})") from exc
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise UsageError(f"--known {path}: not JSON ({exc}); remove it to start afresh") from None
    boards = doc.get("boards") if isinstance(doc, dict) and doc.get("format") == _KNOWN_FORMAT else None
    if not isinstance(boards, dict) or any(not isinstance(v, dict) for v in boards.values()):
        raise UsageError(f"--known {path}: expected {{\"format\": {_KNOWN_FORMAT}, \"boards\": {{id: state}}}}; "
                         f"remove it to start afresh")
    return boards


def save_known(path: str, view: FleetView) -> None:
    """Writes the last ``online`` of every board the view knows (and the boards it knew before), atomically.

    Raises:
        OSError: The file cannot be written.
    """
    boards = dict(view.known)
    boards.update({d: b.online for d, b in view.boards.items() if b.online is not None})
    write_atomic(path, json.dumps({"format": _KNOWN_FORMAT, "boards": boards}, sort_keys=True).encode("utf-8"))


class StateReader:
    """One MQTT connection that reads the retained states into a :class:`FleetView`; paho's thread records, the
    caller waits (and, with ``--watch``, takes the changes from :meth:`changes`).

    Args:
        endpoint: The broker and the login.
        view: Where the states go.
        clock: Time source of deadlines.
        on_other: Called (in paho's thread, under the lock) with every message that is neither a state nor the
            marker (``send --group``'s replies).
    """

    def __init__(self, endpoint: Endpoint, view: FleetView, *, clock: Clock = SYSTEM_CLOCK,
                 on_other: Callable[[mqtt.MQTTMessage], None] | None = None) -> None:
        self.endpoint, self.view, self.clock, self.on_other = endpoint, view, clock, on_other
        self.client_id = f"fn-fleet-{secrets.token_hex(6)}"
        self.marker_topic = f"{FLEET_ROOT}/marker/{self.client_id}"
        self.reply_topic = f"{FLEET_ROOT}/reply/{self.client_id}"
        self._token = secrets.token_hex(8).encode("ascii")
        self.cond = threading.Condition()
        self.complete = False
        self.replay_is_news = False  # a watcher that connected again: what the replay changes is printed too
        self.connack: object = None
        self.dropped: object = None
        self.error: str | None = None
        self._subacks: dict[int, list] = {}
        self._changes: list[Change] = []
        self._loop = False
        self.client = c = new_client(endpoint, self.client_id, max_packet=REPLY_MAX_PACKET)
        c.on_connect = self._guard(lambda _c, _u, _f, rc, _p: self._set("connack", rc))
        c.on_disconnect = self._guard(lambda _c, _u, _f, rc, _p: self._set("dropped", rc))
        c.on_subscribe = self._guard(self._on_subscribe)
        c.on_message = self._guard(self._on_message)

    def connect(self, deadline: float) -> None:
        """Connects, by ``deadline`` (``clock.monotonic()``).

        Raises:
            ConnectError: Unreachable, refused, TLS failed, or no CONNACK in time.
        """
        url = self.endpoint.url
        try:
            self.client.connect_timeout = max(self._left(deadline), 0.01)
            self.client.open(KEEPALIVE_S)
        except (OSError, ValueError) as exc:
            raise ConnectError(f"could not connect to {url}: {reason(exc)}") from exc
        self.client.loop_start()
        self._loop = True
        self.wait_for(lambda: self.connack is not None or self.dropped is not None, deadline)
        if self.connack is None:
            raise ConnectError(f"could not connect to {url}: " + (f"disconnected before CONNACK ({self.dropped})"
                                                                   if self.dropped is not None else "no CONNACK in time"))
        if getattr(self.connack, "is_failure", False):
            raise ConnectError(f"could not connect to {url}: the broker refused the connection ({self.connack})")

    def subscribe(self, topic: str, deadline: float) -> None:
        """Subscribes and waits for the SUBACK.

        Raises:
            SubscribeError: Refused. ConnectError: The connection dropped. NoReply: No SUBACK by the deadline.
        """
        rc, mid = self.client.subscribe(topic, qos=1)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise SubscribeError(f"subscribe to {topic}: {mqtt.error_string(rc)}")
        self.wait_for(lambda: mid in self._subacks or self.dropped is not None, deadline)
        if mid not in self._subacks:
            if self.dropped is not None:
                raise ConnectError(f"connection to {self.endpoint.url} lost while subscribing ({self.dropped})")
            raise NoReply(f"the broker did not acknowledge the subscription to {topic} in time")
        failed = [r for r in self._subacks[mid] if r.is_failure]
        if failed:
            raise SubscribeError(f"the broker refused the subscription to {topic} ({failed[0]})")

    def replay(self, deadline: float) -> bool:
        """Subscribes to every state and waits for the marker; True when it came (the view is complete), False
        when the deadline passed first (the view holds what came)."""
        self.subscribe(STATE_FILTER, deadline)
        self.subscribe(self.marker_topic, deadline)
        self.client.publish(self.marker_topic, self._token, qos=1)
        self.wait_for(lambda: self.complete or self.dropped is not None, deadline)
        if not self.complete and self.dropped is not None:
            raise ConnectError(f"connection to {self.endpoint.url} lost while reading the states ({self.dropped})")
        return self.complete

    def changes(self, timeout: float | None) -> list[Change]:
        """The changes since the last call, waiting up to ``timeout`` seconds (None: until one comes) for one.

        Raises:
            ConnectError: The connection dropped. LinkError: A callback failed (a defect; logged).
        """
        with self.cond:
            self.cond.wait_for(lambda: self._changes or self.dropped is not None or self.error, timeout)
            got, self._changes = self._changes, []
            if not got and self.dropped is not None:
                raise ConnectError(f"connection to {self.endpoint.url} lost ({self.dropped})")
            if not got and self.error is not None:
                raise LinkError(f"internal error while following the states: {self.error}")
            return got

    def publish(self, topic: str, payload: bytes, properties: object = None) -> mqtt.MQTTMessageInfo:
        """Publishes at QoS 1 on this connection."""
        return self.client.publish(topic, payload, qos=1, properties=properties)

    def close(self) -> None:
        self.client.disconnect()
        if self._loop:
            self.client.loop_stop()

    def _left(self, deadline: float) -> float:
        return max(deadline - self.clock.monotonic(), 0.0)

    def wait_for(self, predicate: Callable[[], object], deadline: float) -> None:
        """Waits until ``predicate()`` (called under the lock) holds or ``deadline`` passes."""
        with self.cond:
            while not predicate():
                left = self._left(deadline)
                if left <= 0:
                    return
                self.cond.wait(min(left, 0.5))  # the clock may be a test's: look again now and then

    def _set(self, name: str, value: object) -> None:
        with self.cond:
            setattr(self, name, value)
            self.cond.notify_all()

    def _on_subscribe(self, _c: object, _u: object, mid: int, rcs: list, _p: object) -> None:
        with self.cond:
            self._subacks[mid] = list(rcs)
            self.cond.notify_all()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            if msg.topic == self.marker_topic:
                self.complete = self.complete or bytes(msg.payload) == self._token
            elif device_of(msg.topic) is not None:
                change = self.view.apply(msg.topic, bytes(msg.payload))
                if change is not None and (self.complete or self.replay_is_news):
                    self._changes.append(change)
            elif self.on_other is not None:
                self.on_other(msg)
            self.cond.notify_all()

    def _guard(self, fn: Callable[..., object]) -> Callable[..., None]:
        def callback(*args: object) -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - an exception would end paho's thread and leave us waiting
                log.exception("fleet: error in a paho callback")
                with self.cond:
                    self.error = self.error or repr(exc)
                    self.cond.notify_all()
        return callback


def read_fleet(endpoint: Endpoint, *, deadline: float, known: dict[str, dict] | None = None,
               clock: Clock = SYSTEM_CLOCK, on_other: Callable[[mqtt.MQTTMessage], None] | None = None,
               view: FleetView | None = None) -> tuple[StateReader, bool]:
    """Connects and reads every retained state into a new :class:`FleetView` (seeded with ``known``), or into
    ``view`` (a watcher that connects again: what changed meanwhile comes as changes).

    Returns:
        ``(reader, complete)``: the connected reader (close it) and whether the marker came back by the deadline.

    Raises:
        ConnectError, SubscribeError: The broker could not be reached, or refused the subscription.
    """
    view = view if view is not None else FleetView(known=dict(known or {}))  # (known boards are not news)
    reader = StateReader(endpoint, view, clock=clock, on_other=on_other)
    reader.replay_is_news = bool(view.boards or view.unreadable)
    try:
        reader.connect(deadline)
        complete = reader.replay(deadline)
    except NoReply:
        complete = False
    except BaseException:
        reader.close()
        raise
    return reader, complete


def when(t: object) -> str:
    """A Unix time as UTC ``YYYY-MM-DD HH:MM:SSZ``, or ``unknown``."""
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        return "unknown"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(t))
    except (OverflowError, OSError, ValueError):
        return "unknown"


def _show(value: object) -> str:
    r = json.dumps(value) if isinstance(value, (bool, type(None))) else repr(value)
    return r if len(r) <= 40 else r[:37] + "..."


def ceil_s(seconds: float) -> int:
    """Whole seconds, at least 1 (a Message Expiry Interval)."""
    return max(1, math.ceil(seconds))
