"""The wire contract (device.link.wire): one module for the topic tree, request ids, JSON and the reply shape,
imported by the board's link and by ``fieldnode send`` alike."""

from __future__ import annotations

import pytest

from device.link import commands, envelope, errors, wire
from device.link import session
from device.link.commands import Dispatcher, Registry, register_builtin
from device.link.errors import BrokerUrlError, ReplyMalformed

T = wire.Topics("fieldnode/v1/dev-a")


@pytest.mark.parametrize("topic, problem", [
    ("x/#", "wildcard"),
    ("#", "wildcard"),
    ("a/+/b", "wildcard"),
    ("a\x00b", "NUL"),
    ("", "empty"),
    (None, "empty"),
    (b"ops/replies", "empty"),  # not a string
    ("r" * (wire.MAX_REPLY_TOPIC_BYTES + 1), "longer than"),
    ("é" * (wire.MAX_REPLY_TOPIC_BYTES // 2 + 1), "longer than"),  # counted in UTF-8 bytes
    ("\ud800", "UTF-8"),
    ("$SYS/broker/x", "'$' topic"),
    ("fieldnode/v1/dev-a/state", "own topics"),
    ("fieldnode/v1/dev-a/telemetry", "own topics"),
    ("fieldnode/v1/dev-a/events", "own topics"),
    ("fieldnode/v1/dev-a/results/vibration", "own topics"),
    ("fieldnode/v1/dev-a/cmd/ping", "own topics"),  # a reply published as a command: a loop
    ("fieldnode/v1/dev-a/cmd", "own topics"),
    ("fieldnode/v1/dev-b/results/vibration", "a board's own topic"),
    ("fieldnode/v1/dev-b/cmd/reboot", "a board's own topic"),
])
def test_reply_topics_the_board_refuses(topic, problem):
    assert problem in T.reply_topic_problem(topic)


@pytest.mark.parametrize("topic", ["fieldnode/v1/dev-a/reply", "fieldnode/v1/dev-a/reply/fn-send-0a1b2c3d4e5f",
                                   "fieldnode/v1/dev-b/reply/x", "ops/replies/42", "fieldnode/v1/dev-a/statex",
                                   "r" * wire.MAX_REPLY_TOPIC_BYTES, "x"])
def test_reply_topics_the_board_accepts(topic):
    assert T.reply_topic_problem(topic) is None


def test_a_custom_prefix_protects_its_own_tree():
    t = wire.Topics("plant3/pumps/p7")
    assert "own topics" in t.reply_topic_problem("plant3/pumps/p7/results/vibration")
    assert t.reply_topic_problem("plant3/pumps/p7/reply/ops") is None


@pytest.mark.parametrize("prefix, problem", [("a/#", "must not contain '#'"), ("/lead", "empty level"),
                                             ("a//b", "empty level"), ("", "non-empty"), ("$SYS/x", "reserved")])
def test_a_bad_prefix_is_refused_by_the_link_and_by_send_alike(prefix, problem):
    with pytest.raises(BrokerUrlError, match=problem):
        wire.Topics(prefix)
    with pytest.raises(errors.BadInput, match=problem):
        session.build_request("dev-a", "ping", {}, prefix=prefix)


def test_the_topic_tree():
    assert wire.default_prefix("d") == "fieldnode/v1/d"
    assert T.command("ping") == "fieldnode/v1/dev-a/cmd/ping" and T.command_name(T.command("ping")) == "ping"
    assert T.reply_for("fn-send-1") == "fieldnode/v1/dev-a/reply/fn-send-1"


@pytest.mark.parametrize("rid, valid", [("r-17", True), ("a" * 64, True), ("A.b_c:d-9", True), ("a" * 65, False),
                                        ("", False), ("has space", False), ("a/b", False), (17, False)])
def test_send_and_the_board_accept_the_same_request_ids(rid, valid):
    dispatcher = Dispatcher(_registry())
    reply = dispatcher.handle("ping", wire.encode({"request_id": rid}))
    assert reply.ok is valid
    if valid:
        assert session.build_request("dev-a", "ping", {}, request_id=rid).payload == wire.request(rid, {})
    else:
        assert reply.code == "bad_request"
        with pytest.raises(errors.BadInput, match="--request-id"):
            session.build_request("dev-a", "ping", {}, request_id=rid)


def test_the_boards_replies_parse_with_the_contract():
    dispatcher = Dispatcher(_registry())
    ok = wire.parse_reply(dispatcher.handle("ping", b'{"request_id": "r1"}').body)
    assert ok["ok"] and ok["cmd"] == "ping" and ok["request_id"] == "r1" and ok["result"]["pong"] is True
    err = wire.parse_reply(dispatcher.handle("nope", b'{"request_id": "r2"}').body)
    assert err == wire.error_reply("nope", "r2", "unknown_command", err["error"]["message"])


@pytest.mark.parametrize("raw, problem", [(b"\xff", "not JSON"), (b"[1]", "expected a JSON object"),
                                          (b'{"ok": 1}', "'ok' is missing"), (b'{"ok": NaN}', "NaN is not JSON"),
                                          (b'{"ok": false, "error": {"code": 1}}', "'code' and 'message'")])
def test_parse_reply_names_what_is_wrong(raw, problem):
    with pytest.raises(ReplyMalformed, match=problem):
        wire.parse_reply(raw)


def test_one_copy_of_each_part():
    """send, the dispatcher and the envelope take these from the contract instead of keeping their own."""
    assert commands.REQUEST_ID_RE is wire.REQUEST_ID_RE and commands.REQUEST_FIELDS is wire.REQUEST_FIELDS
    assert envelope.canonical_json is wire.canonical_json
    for name in ("TOPIC_ROOT", "_REQUEST_ID_RE", "_reply_problem"):
        assert not hasattr(session, name), name
    for name in ("BadInput", "SubscribeError", "NoReply", "ReplyMalformed"):
        assert getattr(session, name) is getattr(errors, name)  # the classes live in the family's module
        assert issubclass(getattr(errors, name), errors.LinkError)


def test_encode_strict_refuses_a_lone_surrogate():
    assert wire.encode({"a": "\ud800"}) == b'{"a":"\\ud800"}'
    with pytest.raises(UnicodeEncodeError):
        wire.encode({"a": "\ud800"}, strict=True)


def _registry() -> Registry:
    registry = Registry()
    register_builtin(registry, version="test")
    return registry
