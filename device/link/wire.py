"""The wire contract between a board and its operators, in one module that both sides import.

The board's link (:mod:`device.link.client`, :mod:`device.link.commands`) and ``fieldnode send``
(:mod:`tools.send`) take from here, and nowhere else:

* the topic tree of one board (:class:`Topics`, default prefix ``fieldnode/v1/<device id>``) and the rules for a
  topic level, a prefix and a reply topic the board will publish to (:meth:`Topics.reply_topic_problem`);
* request ids (:data:`REQUEST_ID_RE`) and the request object ``{"request_id", "args"}``;
* JSON: the compact encoding of every payload (:func:`encode`), the strict decoding of what comes from the network
  (:func:`parse_object`), and the canonical JSON that envelope signatures cover (:func:`canonical_json`);
* group topics (:class:`GroupTopics`, ``fieldnode/v1/group/<group>/cmd/<name>``), the rule for a group name
  (:data:`GROUP_PATTERN`, at most :data:`MAX_GROUPS` per board) and the envelope target of a group
  (``group:<group>``, :func:`group_target`);
* replies: ``{"ok": true, "cmd", "request_id", "device", "result"}`` or ``{"ok": false, "cmd", "request_id",
  "device", "error": {"code", "message", ...}}`` (``device``: the board that answered, so that the replies to a
  group command on one Response Topic tell their boards apart), built by :func:`ok_reply` / :func:`error_reply`
  and checked by :func:`parse_reply`;
* the retained state's session rule (:func:`state_supersedes`): a ``lost`` or ``offline`` from an older session
  never replaces a newer ``online``.

docs/mqtt.md describes the same contract for people and for other languages.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any, Callable

from device.link.errors import BrokerUrlError, EnvelopeMalformed, ReplyMalformed

TOPIC_ROOT = "fieldnode/v1"
REQUEST_FIELDS = ("request_id", "args")
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}\Z")
REQUEST_ID_RULE = "1-64 characters from A-Z, a-z, 0-9, '.', '_', ':' and '-'"
# Longest reply topic the board publishes to (UTF-8 bytes). ``fieldnode send`` uses <prefix>/reply/<23 chars>;
# the cap keeps a hostile Response Topic from costing memory on every reply.
MAX_REPLY_TOPIC_BYTES = 512
# The levels right under a board's prefix that it publishes or subscribes to itself; a reply never goes there.
BOARD_LEVELS = ("state", "telemetry", "events", "results", "cmd")
# Group commands: fieldnode/v1/group/<group>/cmd/<name>. A group is one topic level of this pattern; a board is in
# at most MAX_GROUPS of them (each is one more subscription the broker keeps for it).
GROUP_ROOT = f"{TOPIC_ROOT}/group"
GROUP_PATTERN = r"[A-Za-z0-9_-]{1,64}"
GROUP_RULE = "1-64 characters from A-Z, a-z, 0-9, '_' and '-'"
GROUP_RE = re.compile(GROUP_PATTERN + r"\Z")
MAX_GROUPS = 32
GROUP_TARGET_PREFIX = "group:"  # an envelope's "device" field for a group: "group:<group>"
# The states of <prefix>/state; "online" is the only one a connected board publishes.
STATES = ("online", "offline", "lost")


def default_prefix(device_id: str) -> str:
    """The default topic prefix of a device: ``fieldnode/v1/<device_id>``."""
    return f"{TOPIC_ROOT}/{device_id}"


def topic_problem(value: object, *, one_level: bool) -> str | None:
    """Why ``value`` cannot be a topic level (``one_level``) or a topic prefix, or None when it can.

    A level or prefix is non-empty UTF-8 without the wildcards ``+`` and ``#``, NUL or empty levels; one level has no
    ``/``; a prefix does not start with ``$`` (reserved for the broker).
    """
    if not isinstance(value, str) or not value:
        return "expected a non-empty name"
    bad = sorted(set(value) & set("+#\x00" + ("/" if one_level else "")))
    if bad:
        return f"must not contain {', '.join(map(repr, bad))} (MQTT wildcards and level separators)"
    if "" in value.split("/"):
        return "has an empty level ('//', or '/' at either end)"
    if not one_level and value.startswith("$"):
        return "topics starting with '$' are reserved for the broker"
    try:
        value.encode("utf-8")  # argv holds undecodable bytes as lone surrogates
    except UnicodeEncodeError as exc:
        return f"not valid UTF-8 ({exc.reason})"
    return None


class Topics:
    """The topic names of one board under ``prefix``.

    Raises:
        BrokerUrlError: The prefix breaks :func:`topic_problem` (empty, an empty level, a wildcard, NUL, ``$``).
    """

    def __init__(self, prefix: str):
        problem = topic_problem(prefix, one_level=False)
        if problem is not None:
            raise BrokerUrlError(f"topic prefix {prefix!r}: {problem}; expected levels like fieldnode/v1/pump-07")
        self.prefix = prefix
        self.state = f"{prefix}/state"
        self.telemetry = f"{prefix}/telemetry"
        self.events = f"{prefix}/events"
        self.reply = f"{prefix}/reply"
        self.cmd_filter = f"{prefix}/cmd/+"
        self._cmd = f"{prefix}/cmd/"
        self._own = tuple(f"{prefix}/{level}" for level in BOARD_LEVELS)

    def results(self, model: str) -> str:
        if topic_problem(model, one_level=True) is not None:
            raise ValueError(f"model name {model!r} cannot be a topic level")
        return f"{self.prefix}/results/{model}"

    def command(self, name: str) -> str:
        """The topic a command is published to: ``<prefix>/cmd/<name>``."""
        return self._cmd + name

    def reply_for(self, client_id: str) -> str:
        """A requester's own MQTT 5 reply topic: ``<prefix>/reply/<client id>``."""
        return f"{self.reply}/{client_id}"

    def command_name(self, topic: str) -> str | None:
        """The command name of a ``<prefix>/cmd/<name>`` topic, else None."""
        if topic.startswith(self._cmd):
            name = topic[len(self._cmd):]
            return name if name and "/" not in name else None
        return None

    def reply_topic_problem(self, topic: object) -> str | None:
        """Why the board will not publish a reply to ``topic`` (an MQTT 5 Response Topic), or None.

        Refused: not a string, empty, a wildcard or NUL, longer than :data:`MAX_REPLY_TOPIC_BYTES`, a ``$`` topic,
        this board's own topics (state, telemetry, events, results, commands), and the same levels of any board
        under :data:`TOPIC_ROOT`. ``<prefix>/reply`` and anything under it, or any other topic, is fine.
        """
        if not isinstance(topic, str) or not topic:
            return "empty"
        if "+" in topic or "#" in topic or "\x00" in topic:
            return "contains a wildcard or NUL"
        try:
            size = len(topic.encode("utf-8"))
        except UnicodeEncodeError:
            return "not valid UTF-8"
        if size > MAX_REPLY_TOPIC_BYTES:
            return f"longer than {MAX_REPLY_TOPIC_BYTES} bytes"
        if topic.startswith("$"):
            return "a '$' topic is the broker's"
        if any(topic == own or topic.startswith(own + "/") for own in self._own):
            return "one of this board's own topics"
        levels = topic.split("/")
        if topic.startswith(TOPIC_ROOT + "/") and len(levels) > 3 and levels[3] in BOARD_LEVELS:
            return "a board's own topic"
        if topic.startswith(GROUP_ROOT + "/") and len(levels) > 4 and levels[4] == "cmd":
            return "a group's command topic"
        return None


class GroupTopics:
    """The command topics of groups: ``fieldnode/v1/group/<group>/cmd/<name>`` (whatever a board's prefix)."""

    @staticmethod
    def cmd_filter(group: str) -> str:
        """What a member subscribes to: ``fieldnode/v1/group/<group>/cmd/+``.

        Raises:
            ValueError: ``group`` is not a group name (:data:`GROUP_PATTERN`).
        """
        if not isinstance(group, str) or not GROUP_RE.match(group):
            raise ValueError(f"group {group!r}: expected {GROUP_RULE}")
        return f"{GROUP_ROOT}/{group}/cmd/+"

    @staticmethod
    def command(group: str, name: str) -> str:
        """The topic an operator publishes a group command to: ``fieldnode/v1/group/<group>/cmd/<name>``."""
        return f"{GROUP_ROOT}/{group}/cmd/{name}"

    @staticmethod
    def parse(topic: str) -> tuple[str, str] | None:
        """``(group, command name)`` of a group command topic, else None."""
        if not topic.startswith(GROUP_ROOT + "/"):
            return None
        levels = topic[len(GROUP_ROOT) + 1:].split("/")
        if len(levels) != 3 or levels[1] != "cmd" or not GROUP_RE.match(levels[0]) or not levels[2]:
            return None
        return levels[0], levels[2]


def group_target(group: str) -> str:
    """The ``device`` field of an envelope bound to ``group``: ``group:<group>``."""
    return GROUP_TARGET_PREFIX + group


def state_supersedes(new: dict, old: dict) -> bool:
    """Whether retained state ``new`` should replace ``old`` in a consumer's view of one board (the session rule).

    Each connection of a board has a session number (``session``, one higher at every connect), carried by its
    ``online`` and by the last will (``lost``) and ``offline`` of the same connection. A ``lost`` or ``offline``
    whose session is older than an ``online`` already seen is late news of an old connection: it does not replace
    it. Anything else replaces what came before (a message without a session, from an older agent, counts as
    session 0).
    """
    if new.get("state") == "online" or old.get("state") != "online":
        return True
    return _session(new) >= _session(old)


def _session(doc: dict) -> int:
    value = doc.get("session")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def new_request_id() -> str:
    """A random request id: ``send-<12 hex digits>``."""
    return f"send-{secrets.token_hex(6)}"


def request_id_problem(value: object) -> str | None:
    """Why ``value`` is not a valid ``request_id``, or None."""
    if isinstance(value, str) and REQUEST_ID_RE.match(value):
        return None
    return f"expected {REQUEST_ID_RULE}"


def request(request_id: str, args: dict) -> dict:
    """An unsigned request object (a signed one is the envelope plus ``request_id``)."""
    return {"request_id": request_id, "args": args}


# -- JSON ---------------------------------------------------------------------------------------------------------


def encode(doc: Any, *, strict: bool = False, default: Callable[[Any], Any] | None = None) -> bytes:
    """Compact JSON as UTF-8; escaped ASCII when a string holds a lone surrogate (JSON allows the escape).

    Args:
        doc: The document.
        strict: Refuse a lone surrogate instead (``fieldnode send``: argv that is not UTF-8 is bad input).
        default: How to encode what JSON cannot (the board's own payloads pass ``str``, so a stray value in a
            status never costs a result).

    Raises:
        TypeError, ValueError, RecursionError: ``doc`` is not representable as JSON (NaN included); with
            ``strict``, UnicodeEncodeError (a ValueError) for a lone surrogate.
    """
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=default)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        if strict:
            raise
        return json.dumps(doc, separators=(",", ":"), allow_nan=False, default=default).encode("ascii")


def parse_object(raw: bytes) -> dict:
    """A payload from the network as a JSON object: UTF-8, strict JSON (no NaN or Infinity), an object.

    Raises:
        ValueError: Why it is not; the message is fit for an error reply.
    """
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"payload is not UTF-8 (invalid byte at offset {exc.start})") from None
    if not text.strip():
        raise ValueError("payload is empty; expected a JSON object")
    try:
        obj = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("payload is not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, an integer with too many digits
        raise ValueError(f"payload is not valid JSON ({_short(exc)})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"payload is {_kind(obj)}, expected a JSON object")
    return obj


def loads(text: str) -> Any:
    """``json.loads`` refusing NaN and Infinity (they are not JSON). Raises ValueError or RecursionError."""
    return json.loads(text, parse_constant=_refuse_constant)


def canonical_json(obj: Any) -> bytes:
    """The signed bytes of an envelope: ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False, allow_nan=False)`` encoded as UTF-8.

    Args:
        obj: A JSON-compatible value (the envelope without ``sig`` and ``request_id``).

    Returns:
        The canonical bytes.

    Raises:
        EnvelopeMalformed: NaN or infinity, a non-JSON type, unsortable keys, a lone surrogate, too deep.
    """
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise EnvelopeMalformed(f"not representable as canonical JSON ({_short(exc)})") from exc


# -- replies ------------------------------------------------------------------------------------------------------


def ok_reply(cmd: str, request_id: str | None, result: Any, device: str | None = None) -> dict:
    """The reply of a command that ran: ``{"ok": true, "cmd", "request_id", "device", "result"}`` (``device``, the
    board that answered, only when given)."""
    return {"ok": True, "cmd": cmd, "request_id": request_id, **_device(device), "result": result}


def error_reply(cmd: str | None, request_id: str | None, code: str, message: str, *, device: str | None = None,
                **extra: Any) -> dict:
    """An error reply: ``{"ok": false, "cmd", "request_id", "device", "error": {"code", "message", **extra}}``
    (``device`` only when given).

    ``extra`` carries code-specific fields such as ``retry_after_s`` for ``rate_limited``.
    """
    return {"ok": False, "cmd": cmd, "request_id": request_id, **_device(device),
            "error": {"code": code, "message": message, **extra}}


def _device(device: str | None) -> dict:
    return {} if device is None else {"device": device}


def reply_problem(doc: Any) -> str | None:
    """Why ``doc`` is not a reply as the contract describes it, or None."""
    if not isinstance(doc, dict):
        return f"expected a JSON object, got {type(doc).__name__}"
    if not isinstance(doc.get("ok"), bool):
        return "'ok' is missing or not true/false"
    if not doc["ok"]:
        err = doc.get("error")
        if not isinstance(err, dict) or not isinstance(err.get("code"), str) or not isinstance(err.get("message"), str):
            return "an error reply without an 'error' object of 'code' and 'message' strings"
    return None


def parse_reply(raw: bytes) -> dict:
    """A reply payload as the contract's JSON object.

    Raises:
        ReplyMalformed: Not UTF-8 JSON, or not the reply shape; the message says what is wrong.
    """
    try:
        doc = loads(bytes(raw).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ReplyMalformed(f"not JSON ({_short(exc)})") from None
    problem = reply_problem(doc)
    if problem is not None:
        raise ReplyMalformed(problem)
    return doc


_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _kind(value: Any) -> str:
    if value is None or isinstance(value, (dict, list)):
        return "null" if value is None else "an object" if isinstance(value, dict) else "an array"
    r = json.dumps(value) if isinstance(value, bool) else repr(value)
    return (r if len(r) <= 40 else r[:37] + "...") + f" ({_JSON_TYPES.get(type(value), type(value).__name__)})"


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."
