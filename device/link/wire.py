"""The wire contract between a board and its operators, in one module that both sides import.

The board's link (:mod:`device.link.client`, :mod:`device.link.commands`) and ``fieldnode send``
(:mod:`tools.send`) take from here, and nowhere else:

* the topic tree of one board (:class:`Topics`, default prefix ``fieldnode/v1/<device id>``) and the rules for a
  topic level, a prefix and a reply topic the board will publish to (:meth:`Topics.reply_topic_problem`);
* request ids (:data:`REQUEST_ID_RE`) and the request object ``{"request_id", "args"}``;
* JSON: the compact encoding of every payload (:func:`encode`), the strict decoding of what comes from the network
  (:func:`parse_object`), and the canonical JSON that envelope signatures cover (:func:`canonical_json`);
* replies: ``{"ok": true, "cmd", "request_id", "result"}`` or ``{"ok": false, "cmd", "request_id", "error":
  {"code", "message", ...}}``, built by :func:`ok_reply` / :func:`error_reply` and checked by :func:`parse_reply`.

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
        return None


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


def ok_reply(cmd: str, request_id: str | None, result: Any) -> dict:
    """The reply of a command that ran: ``{"ok": true, "cmd", "request_id", "result"}``."""
    return {"ok": True, "cmd": cmd, "request_id": request_id, "result": result}


def error_reply(cmd: str | None, request_id: str | None, code: str, message: str, **extra: Any) -> dict:
    """An error reply: ``{"ok": false, "cmd", "request_id", "error": {"code", "message", **extra}}``.

    ``extra`` carries code-specific fields such as ``retry_after_s`` for ``rate_limited``.
    """
    return {"ok": False, "cmd": cmd, "request_id": request_id, "error": {"code": code, "message": message, **extra}}


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
