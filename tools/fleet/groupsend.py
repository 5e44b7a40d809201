"""``fieldnode send --group G CMD``: one signed command to every member of a group, and who answered, failed or is
missing.

1. Reads the retained states the way ``fleet status`` does (:func:`tools.fleet.states.read_fleet`, with
   ``--known`` if given). The expected boards are those whose groups include G; an offline or lost board's groups
   come from its last ``online`` (in this view, or in the ``--known`` file).
2. Signs one envelope bound to ``group:G`` (:func:`device.link.envelope.sign_envelope`) and publishes it once to
   ``fieldnode/v1/group/G/cmd/CMD`` at QoS 1, with the MQTT 5 Response Topic (``fieldnode/v1/_fleet/reply/<client
   id>``), Correlation Data (the request id) and Message Expiry Interval (the envelope's TTL).
3. Collects the replies (each names its ``device``) until every expected board that was online has answered, or
   the deadline. A board that was offline or lost cannot get the command (boards connect with Clean Start, so no
   broker keeps it for them): it is missing at once, without a wait for it.

Exit codes (:class:`device.errors.Exit`): 0 every expected board answered ok; 3 someone is missing at the deadline
(this wins over failures: the JSON says both); 1 someone answered with an error (or a malformed reply); 2 bad input
(no ``--sign``, a bad group name, no board's state lists the group); 4 could not connect.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device.clock import SYSTEM_CLOCK, Clock
from device.cliargs import print_error
from device.errors import ConfigError, Exit, FieldnodeError, UsageError
from device.link import envelope, wire
from device.link.errors import (BadInput, BrokerUrlError, ConnectError, EnvelopeError, PublishError,
                                ReplyMalformed, SubscribeError)
from device.link.session import check_topic, encode, printable
from device.link.mqttclient import Endpoint
from tools.fleet.states import StateReader, ceil_s, load_known, read_fleet, save_known, when


def run_group(args: argparse.Namespace, endpoint: Endpoint, *, deadline: float, clock: Clock = SYSTEM_CLOCK,
              out: TextIO | None = None) -> int:
    """Sends ``args.cmd`` to group ``args.group`` and reports every member's answer.

    Args:
        args: The parsed ``send`` options (``--group`` given).
        endpoint: The broker and the login, from ``send``'s connection options.
        deadline: When to give up, on ``clock.monotonic()`` (``--timeout`` from the start of the command).
        clock: Time source of the deadline.
        out: Where the table or JSON goes (default stdout).

    Returns:
        An :class:`~device.errors.Exit` code (see the module docstring).
    """
    out = out or sys.stdout
    try:
        payload, rid = _envelope(args)
        known = load_known(args.known) if args.known else {}
    except (BadInput, EnvelopeError, UsageError) as exc:
        return _fail(args, exc)
    replies: list[mqtt.MQTTMessage] = []
    try:
        reader, complete = read_fleet(endpoint, deadline=deadline, known=known, clock=clock,
                                      on_other=replies.append)
    except FieldnodeError as exc:
        return _fail(args, exc)
    try:
        with reader.cond:
            expected = reader.view.members(args.group)
            online = [d for d in expected if reader.view.boards[d].state == "online"]
            away = {d: reader.view.boards[d] for d in expected if d not in online}
        if not expected:
            raise UsageError(f"no board's retained state lists group {args.group!r} (see fieldnode fleet status; "
                             f"--known FILE remembers the groups of boards that are offline)")
        reader.subscribe(reader.reply_topic, deadline)
        _publish(reader, args, payload, rid)
        collected: dict[str, dict] = {}

        def answered() -> bool:
            _take(replies, rid, collected)
            return all(d in collected for d in online) or reader.dropped is not None

        reader.wait_for(answered, deadline)
        with reader.cond:
            _take(replies, rid, collected)
        if args.known:
            save_known(args.known, reader.view)
    except FieldnodeError as exc:
        return _fail(args, exc)
    finally:
        reader.close()
    doc = _result(args, rid, expected, collected, complete)
    if args.json:
        print(json.dumps(doc, ensure_ascii=True), file=out, flush=True)
    else:
        for line in _table(doc, away):
            print(line, file=out, flush=True)
    if doc["missing"]:
        return Exit.TIMEOUT
    return Exit.FAILED if doc["errors"] else Exit.OK


def _envelope(args: argparse.Namespace) -> tuple[dict, str]:
    """The signed envelope bound to ``group:<group>`` (with its request id), after checking the input."""
    group = args.group
    if not wire.GROUP_RE.match(group):
        raise BadInput(f"--group {group!r}: expected {wire.GROUP_RULE}")
    if args.device is not None or args.prefix is not None:
        raise BadInput("--group sends to a group's topic: leave out --device and --prefix")
    if not args.sign:
        raise BadInput("--group needs --sign KEY: boards take only signed envelopes on a group's topic")
    if (args.mqtt or "5") != "5":
        raise BadInput("--group needs MQTT 5 (Response Topic and Correlation Data tell the replies apart)")
    check_topic("command", args.cmd, one_level=True)
    try:
        cmd_args = wire.loads(args.args)
    except (ValueError, RecursionError) as exc:
        raise BadInput(f"--args: not valid JSON ({exc})") from exc
    if not isinstance(cmd_args, dict):
        raise BadInput(f"--args: expected a JSON object like '{{\"variant\": \"lite\"}}', got {type(cmd_args).__name__}")
    rid = args.request_id or wire.new_request_id()
    problem = wire.request_id_problem(rid)
    if problem is not None:
        raise BadInput(f"--request-id {rid!r}: {problem}")
    key = envelope.load_private_key(args.sign)
    payload = envelope.sign_envelope(key, device=wire.group_target(group), cmd=args.cmd, args=cmd_args,
                                     ttl_s=args.ttl)
    payload["request_id"] = rid
    encode(payload)  # fails here, as bad input, rather than half-way through sending
    return payload, rid


def _publish(reader: StateReader, args: argparse.Namespace, payload: dict, rid: str) -> None:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reader.reply_topic
    props.CorrelationData = rid.encode("ascii")
    props.MessageExpiryInterval = ceil_s(args.ttl)  # no broker keeps it past the envelope's own expiry
    topic = wire.GroupTopics.command(args.group, args.cmd)
    try:
        info = reader.publish(topic, encode(payload), props)
    except (ValueError, TypeError) as exc:
        raise PublishError(f"publish to {topic}: {exc}") from exc
    if info.rc != mqtt.MQTT_ERR_SUCCESS:
        raise PublishError(f"publish to {topic}: {mqtt.error_string(info.rc)}")


def _take(messages: list[mqtt.MQTTMessage], rid: str, collected: dict[str, dict]) -> None:
    """Moves the replies to ``rid`` from ``messages`` (paho's thread appends) into ``collected``, by device; a
    malformed reply goes under ``?<n>`` with code ``malformed_reply``. Called under the reader's lock."""
    while messages:
        msg = messages.pop(0)
        props = getattr(msg, "properties", None)
        if getattr(props, "CorrelationData", None) != rid.encode("ascii"):
            continue  # another request's
        try:
            reply = wire.parse_reply(bytes(msg.payload))
            device = reply.get("device")
            if not isinstance(device, str) or not device:
                raise ReplyMalformed("the reply names no 'device'")
        except ReplyMalformed as exc:
            collected[f"?{len(collected) + 1}"] = wire.error_reply(None, rid, "malformed_reply", str(exc))
            continue
        collected.setdefault(device, reply)  # a second copy changes nothing


def _result(args: argparse.Namespace, rid: str, expected: list[str], collected: dict[str, dict],
            complete: bool) -> dict:
    errors: dict[str, list[str]] = {}
    for device, reply in sorted(collected.items()):
        if not reply["ok"]:
            errors.setdefault(reply["error"]["code"], []).append(device)
    return {"group": args.group, "cmd": args.cmd, "request_id": rid, "states_complete": complete,
            "expected": expected, "answered": [d for d in expected if d in collected],
            "errors": errors, "missing": [d for d in expected if d not in collected],
            "unexpected": sorted(d for d in collected if d not in expected),
            "replies": {d: collected[d] for d in sorted(collected)}}


def _table(doc: dict, away: dict) -> list[str]:
    n_ok = sum(1 for d in doc["answered"] if doc["replies"][d]["ok"])
    head = (f"group {doc['group']}, {doc['cmd']}: {len(doc['answered'])} of {len(doc['expected'])} expected "
            f"answered ({n_ok} ok, {len(doc['answered']) - n_ok} error), {len(doc['missing'])} missing")
    if doc["unexpected"]:
        head += f", {len(doc['unexpected'])} unexpected"
    lines = [head]
    for device, reply in doc["replies"].items():
        mark = " (unexpected)" if device in doc["unexpected"] else ""
        if reply["ok"]:
            lines.append(f"  {printable(device):20} ok{mark:14} {_short(reply.get('result'))}")
        else:
            err = reply["error"]
            lines.append(f"  {printable(device):20} {printable(err['code'])}{mark} {_short(err['message'])}")
    for device in doc["missing"]:
        board = away.get(device)
        why = f"{board.state}, last seen {when(board.last_seen)}" if board is not None else "no reply in time"
        lines.append(f"  {printable(device):20} missing        ({why})")
    if not doc["states_complete"]:
        lines.append("  (the retained states were not all read in time: the expected list may be short)")
    return lines


def _short(value: object, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=True, default=str)
    text = printable(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _fail(args: argparse.Namespace, exc: FieldnodeError) -> int:
    if isinstance(exc, (BadInput, BrokerUrlError, ConfigError, UsageError, EnvelopeError)):
        code = Exit.USAGE
    elif isinstance(exc, (ConnectError, SubscribeError, PublishError)):
        code = Exit.UNREACHABLE
    else:
        code = Exit.FAILED
    return print_error("send", exc, as_json=bool(args.json), exit_code=code)
