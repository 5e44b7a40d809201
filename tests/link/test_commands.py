"""The command registry and dispatcher, driven through ``Dispatcher.handle`` with raw payload bytes.

Real objects throughout: a real Verifier on a trust directory of freshly generated Ed25519 keys, envelopes
signed with ``sign_envelope``, and a SimClock for the de-duplication window, the token bucket and expiry.
Every refusal checks the reply's code and that its message names the problem.
"""

from __future__ import annotations

import json
import threading

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from device.errors import FieldnodeError
from device.link.commands import (RETRIABLE_CODES, Arg, CallContext, Dispatcher, ErrorCode, Registry, Reply,
                                  check_args, register_builtin)
from device.link.envelope import TrustStore, Verifier, sign_envelope
from device.link.errors import BadArgs, BadReplyTopic, CommandError, LinkError
from drivers.sim.clock import SimClock
from tests.waiting import eventually

DEVICE = "pump-07"


class PumpJammed(FieldnodeError):
    """A handler's own error with its own code."""

    code = "pump_jammed"


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def clock():
    return SimClock()


@pytest.fixture
def calls():
    """Every handler call as ``(cmd, args, ctx)``."""
    return []


@pytest.fixture
def registry(calls, clock):
    reg = Registry()
    register_builtin(reg, version="1.2.3", clock=clock)

    @reg.command("echo", args=(Arg("text", str, required=True, doc="what to echo"),
                               Arg("times", int, default=1, minimum=1, maximum=5)))
    def echo(args, ctx):
        """Echoes its text."""
        calls.append(("echo", args, ctx))
        return {"text": args["text"] * args["times"]}

    def tune(args, ctx):
        calls.append(("tune", args, ctx))
        return args

    reg.register("tune", tune, doc="every argument type", args=(
        Arg("threads", int, minimum=1, maximum=64), Arg("ratio", float, minimum=0, maximum=1),
        Arg("mode", str, choices=("full", "lite")), Arg("enabled", bool), Arg("tags", list),
        Arg("opts", dict), Arg("level", (int, str)), Arg("gain", float, default=2)))

    def variant(args, ctx):
        calls.append(("variant", args, ctx))
        return {"variant": args["variant"], "by": ctx.signer}

    reg.register("variant", variant, privileged=True, doc="sets the model variant",
                 args=(Arg("variant", str, required=True, choices=("full", "lite")),))

    def boom(args, ctx):
        calls.append(("boom", args, ctx))
        kind = args["kind"]
        if kind == "fieldnode":
            raise PumpJammed("pump 2 is jammed")
        if kind == "value":
            raise ValueError("window must be a power of two")
        if kind == "type":
            raise TypeError("gain needs a number")
        if kind == "runtime":
            raise RuntimeError("secret internal detail /opt/x.py line 3")
        if kind == "exit":
            raise SystemExit(3)
        if kind == "unjsonable":
            return {"when": object()}
        if kind == "nan":
            return float("nan")
        return "\ud800"  # a lone surrogate, as json.loads makes from "\\ud800"

    reg.register("boom", boom, args=(Arg("kind", str, required=True),))
    return reg


@pytest.fixture
def ops_key():
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def verifier(tmp_path, ops_key, clock):
    trust = tmp_path / "trust"
    trust.mkdir(mode=0o755)
    (trust / "ops.pub").write_bytes(ops_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return Verifier(TrustStore(str(trust)), device_id=DEVICE, clock=clock)


@pytest.fixture
def dispatcher(registry, verifier, clock):
    return Dispatcher(registry, verifier=verifier, clock=clock)


@pytest.fixture
def sign(ops_key, clock):
    def make(cmd="variant", args=None, request_id=None, key=None, **kw):
        kw.setdefault("device", DEVICE)
        env = sign_envelope(key or ops_key, cmd=cmd, args={"variant": "lite"} if args is None else args,
                            clock=clock, **kw)
        if request_id is not None:
            env["request_id"] = request_id
        return env
    return make


def send(dispatcher: Dispatcher, name: str, payload) -> tuple[Reply, dict]:
    """Sends a payload (bytes as they are, anything else as JSON) and checks the reply's shape."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    reply = dispatcher.handle(name, raw)
    doc = json.loads(reply.body)
    compact = json.dumps(doc, separators=(",", ":"), ensure_ascii=False)
    # Compact UTF-8; escaped ASCII only when a lone surrogate cannot be UTF-8.
    assert reply.body == compact.encode("utf-8", "surrogatepass") or \
        reply.body == json.dumps(doc, separators=(",", ":")).encode("ascii")
    assert list(doc)[:3] == ["ok", "cmd", "request_id"]
    assert doc["ok"] is reply.ok and doc["cmd"] == reply.cmd == name and doc["request_id"] == reply.request_id
    if reply.ok:
        assert set(doc) == {"ok", "cmd", "request_id", "result"} and reply.code is None
    else:
        assert set(doc) == {"ok", "cmd", "request_id", "error"} and doc["error"]["code"] == reply.code
        assert set(doc["error"]) <= {"code", "message", "retry_after_s"} and doc["error"]["message"]
    return reply, doc


def refused(dispatcher: Dispatcher, name: str, payload, code: str, *fragments: str) -> dict:
    """Sends, expects refusal ``code``, and checks the message contains every fragment."""
    reply, doc = send(dispatcher, name, payload)
    assert (reply.ok, reply.code) == (False, code), doc
    for fragment in fragments:
        assert fragment in doc["error"]["message"], doc
    return doc


# --------------------------------------------------------------------------------------------- the basics


def test_success_reply_is_compact_json_in_contract_order(dispatcher, calls):
    reply = dispatcher.handle("echo", b'{"request_id": "r-1", "args": {"text": "hi", "times": 2}}')
    assert reply.body == b'{"ok":true,"cmd":"echo","request_id":"r-1","result":{"text":"hihi"}}'
    assert (reply.cmd, reply.request_id, reply.ok, reply.code, reply.cached) == ("echo", "r-1", True, None, False)
    (cmd, args, ctx), = calls
    assert args == {"text": "hi", "times": 2}
    assert ctx == CallContext(cmd="echo", request_id="r-1", signer=None, received_at=ctx.received_at)


def test_ping_builtin_reports_time_and_version(dispatcher, clock):
    clock.advance(42)
    reply, doc = send(dispatcher, "ping", {})
    assert doc["result"] == {"pong": True, "time": clock.time(), "version": "1.2.3"}
    assert doc["request_id"] is None


def test_request_id_and_args_are_optional(dispatcher, calls):
    _, doc = send(dispatcher, "tune", {})
    assert doc["result"] == {"gain": 2.0} and doc["request_id"] is None
    assert calls[0][2].request_id is None


def test_received_at_is_the_wall_clock_of_arrival(dispatcher, clock, calls):
    clock.advance(7.5)
    send(dispatcher, "echo", {"args": {"text": "x"}})
    assert calls[0][2].received_at == clock.time()


def test_non_ascii_is_sent_as_utf8(dispatcher):
    reply, doc = send(dispatcher, "echo", {"args": {"text": "größer"}})
    assert "größer".encode() in reply.body and doc["result"]["text"] == "größer"


# ---------------------------------------------------------------------------------------- malformed input


def test_payload_too_large_is_checked_first(dispatcher, calls):
    big = b"\xff" * 16385  # neither UTF-8 nor a known command: the size still wins
    doc = refused(dispatcher, "nope", big, "payload_too_large", "16385 bytes", "at most 16384")
    assert doc["request_id"] is None and not calls
    assert dispatcher.counters["payload_too_large"] == 1


def test_payload_at_the_limit_is_accepted(dispatcher):
    body = b'{"args": {"text": "x"}}'
    reply, _ = send(dispatcher, "echo", body + b" " * (16384 - len(body)))
    assert reply.ok


def test_payload_limit_is_configurable(registry, clock):
    d = Dispatcher(registry, clock=clock, max_payload=10)
    refused(d, "ping", b'{"args": {}}', "payload_too_large", "12 bytes", "at most 10")


def test_unknown_command_comes_before_json(dispatcher):
    doc = refused(dispatcher, "reboot", b"not json", "unknown_command", "'reboot'", "known: boom, echo, ping")
    assert doc["cmd"] == "reboot"


@pytest.mark.parametrize("payload, fragments", [
    (b'{"args": {"text": "\xff"}}', ("not UTF-8", "offset 19")),
    (b'{"args": ', ("not valid JSON",)),
    (b"", ("empty",)),
    (b"  \n", ("empty",)),
    (b'["ping"]', ("payload is an array", "expected a JSON object")),
    (b'"ping"', ("payload is 'ping' (string)", "expected a JSON object")),
    (b"4.5", ("payload is 4.5 (number)",)),
    (b"null", ("payload is null",)),
    (b'{"args": {"ratio": NaN}}', ("not valid JSON", "NaN is not JSON")),
    (b'{"args": {"ratio": -Infinity}}', ("-Infinity is not JSON",)),
    (b"[" * 100000 + b"]" * 100000, ("nested too deeply",)),
], ids=["not-utf8", "truncated", "empty", "blank", "array", "string", "number", "null", "nan", "infinity",
        "deep"])
def test_bad_json(registry, clock, payload, fragments, calls):
    d = Dispatcher(registry, clock=clock, max_payload=1 << 20)
    doc = refused(d, "tune", payload, "bad_json", *fragments)
    assert doc["request_id"] is None and not calls


@pytest.mark.parametrize("request_id, shown", [
    (17, "17 (integer)"), (None, "null"), ("", "'' (string)"), ("x" * 65, "'xxxxx"), ("has space", "'has space'"),
    ("größe", "'größe'"), ("a/b", "'a/b'"), (["r1"], "an array"), (True, "true (boolean)"),
], ids=["int", "null", "empty", "too-long", "space", "non-ascii", "slash", "array", "bool"])
def test_bad_request_id(dispatcher, request_id, shown, calls):
    doc = refused(dispatcher, "ping", {"request_id": request_id}, "bad_request", "request_id", "1-64", shown)
    assert doc["request_id"] is None and not calls


def test_request_id_alphabet_and_length_limit_are_accepted(dispatcher):
    rid = "A-z_0.9:" + "x" * 56
    reply, doc = send(dispatcher, "ping", {"request_id": rid})
    assert reply.ok and doc["request_id"] == rid


def test_unknown_field_is_named(dispatcher, calls):
    doc = refused(dispatcher, "ping", {"request_id": "r1", "argz": {}}, "bad_request",
                  "unknown field(s) 'argz'", "allowed: request_id, args")
    assert doc["request_id"] == "r1" and not calls


def test_half_built_envelope_hints_at_sig(dispatcher):
    refused(dispatcher, "variant", {"cmd": "variant", "args": {}, "nonce": "x" * 16}, "bad_request",
            "'cmd'", "'nonce'", "needs 'sig'")


@pytest.mark.parametrize("args, shown", [(["text"], "an array"), ("text", "'text' (string)"), (None, "null"),
                                         (3, "3 (integer)")])
def test_args_must_be_an_object(dispatcher, args, shown, calls):
    refused(dispatcher, "echo", {"args": args}, "bad_request", "args: expected a JSON object", shown)
    assert not calls


def test_bad_request_is_not_cached_and_does_not_shadow_a_later_good_request(dispatcher):
    refused(dispatcher, "echo", {"request_id": "r1", "argz": {}}, "bad_request", "argz")
    reply, _ = send(dispatcher, "echo", {"request_id": "r1", "args": {"text": "a"}})
    assert reply.ok and not reply.cached


# ---------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("cmd, args, fragments", [
    ("echo", {}, ("missing required argument 'text'", "a string")),
    ("echo", {"text": 5}, ("argument 'text'", "expected a string", "got 5 (integer)")),
    ("echo", {"text": "x", "times": "2"}, ("argument 'times'", "an integer from 1 to 5", "'2' (string)")),
    ("echo", {"text": "x", "times": True}, ("argument 'times'", "an integer", "true (boolean)")),
    ("echo", {"text": "x", "times": 2.0}, ("argument 'times'", "an integer", "2.0 (number)")),
    ("echo", {"text": "x", "times": 0}, ("argument 'times'", "from 1 to 5", "got 0")),
    ("echo", {"text": "x", "times": 6}, ("argument 'times'", "from 1 to 5", "got 6")),
    ("tune", {"ratio": 1.5}, ("argument 'ratio'", "a number from 0 to 1", "1.5")),
    ("tune", {"ratio": False}, ("argument 'ratio'", "a number", "false (boolean)")),
    ("tune", {"mode": "turbo"}, ("argument 'mode'", "one of 'full', 'lite'", "'turbo'")),
    ("tune", {"enabled": 1}, ("argument 'enabled'", "a boolean", "1 (integer)")),
    ("tune", {"tags": {"a": 1}}, ("argument 'tags'", "an array", "an object")),
    ("tune", {"opts": [1]}, ("argument 'opts'", "an object", "an array")),
    ("tune", {"level": 1.5}, ("argument 'level'", "an integer or a string", "1.5 (number)")),
    ("tune", {"gain": "x" * 80}, ("argument 'gain'", "'xxxx", "...")),
    ("echo", {"text": "x", "colour": "red", "size": 2}, ("unknown argument(s) 'colour', 'size'",
                                                          "known: text, times")),
    ("ping", {"x": 1}, ("unknown argument(s) 'x'", "takes no arguments")),
], ids=["missing", "wrong-type", "str-for-int", "bool-for-int", "float-for-int", "below-min", "above-max",
        "float-range", "bool-for-float", "choices", "int-for-bool", "array", "object", "union", "long-value",
        "unknown", "no-args"])
def test_bad_args(dispatcher, cmd, args, fragments, calls):
    doc = refused(dispatcher, cmd, {"request_id": "r1", "args": args}, "bad_args", *fragments)
    assert doc["request_id"] == "r1" and not calls


def test_valid_args_are_normalised_and_defaults_filled(dispatcher, calls):
    args = {"threads": 64, "ratio": 1, "mode": "lite", "enabled": False, "tags": ["a"], "opts": {"k": None},
            "level": "high"}
    reply, doc = send(dispatcher, "tune", {"args": args})
    assert reply.ok
    got = calls[0][1]
    assert got == {**args, "ratio": 1.0, "gain": 2.0}
    assert type(got["ratio"]) is float and type(got["gain"]) is float  # int accepted for float, passed as float
    _, doc = send(dispatcher, "tune", {"args": {"level": 3}})
    assert doc["result"]["level"] == 3


def test_check_args_directly():
    specs = (Arg("n", int, default=3), Arg("tags", list, default=["a"]))
    out = check_args(specs, {})
    out["tags"].append("mutated")
    assert check_args(specs, {}) == {"n": 3, "tags": ["a"]}  # a mutable default is copied per call
    with pytest.raises(BadArgs, match="argument 'n': expected an integer, got 'x'"):
        check_args(specs, {"n": "x"})


@pytest.mark.parametrize("kw, problem", [
    ({"name": "has space", "type": int}, "argument name"),
    ({"name": "x", "type": bytes}, "type must be"),
    ({"name": "x", "type": (int, set)}, "type must be"),
    ({"name": "x", "type": ()}, "type must be"),
    ({"name": "x", "type": "int"}, "type must be"),
    ({"name": "x", "type": str, "minimum": 0}, "minimum/maximum need"),
    ({"name": "x", "type": int, "required": True, "default": 1}, "cannot have a default"),
    ({"name": "x", "type": int, "default": 0, "minimum": 1}, "default 0 is not an integer >= 1"),
    ({"name": "x", "type": int, "default": True}, "default True"),
    ({"name": "x", "type": str, "choices": ("a", 1)}, "choice or default 1"),
    ({"name": "x", "type": str, "choices": ("a",), "default": "b"}, "default 'b' is not one of 'a'"),
])
def test_arg_definitions_are_checked(kw, problem):
    with pytest.raises(ValueError, match=problem):
        Arg(**kw)


def test_arg_bounds_are_described():
    assert Arg("x", float, maximum=2.5).expected() == "a number <= 2.5"
    assert Arg("x", int, minimum=0).expected() == "an integer >= 0"


# ---------------------------------------------------------------------------------------------- handlers


def test_handler_fieldnode_error_keeps_its_code(dispatcher):
    refused(dispatcher, "boom", {"args": {"kind": "fieldnode"}}, "pump_jammed", "pump 2 is jammed")
    assert dispatcher.counters["pump_jammed"] == 1


@pytest.mark.parametrize("kind, text", [("value", "window must be a power of two"), ("type", "gain needs a number")])
def test_handler_value_and_type_errors_are_bad_args(dispatcher, kind, text):
    refused(dispatcher, "boom", {"args": {"kind": kind}}, "bad_args", text)


@pytest.mark.parametrize("kind, exc_name", [("runtime", "RuntimeError"), ("exit", "SystemExit")])
def test_handler_crash_is_internal_with_type_only(dispatcher, caplog, kind, exc_name):
    doc = refused(dispatcher, "boom", {"args": {"kind": kind}}, "internal", "'boom'", exc_name)
    assert "secret" not in doc["error"]["message"] and "Traceback" not in doc["error"]["message"]
    record, = [r for r in caplog.records if r.name == "device.link.commands" and r.exc_info]
    assert record.exc_info[0].__name__ == exc_name


@pytest.mark.parametrize("kind, exc_name", [("unjsonable", "TypeError"), ("nan", "ValueError")])
def test_result_that_is_not_json_is_internal(dispatcher, kind, exc_name):
    refused(dispatcher, "boom", {"args": {"kind": kind}}, "internal", "not JSON", exc_name)


def test_lone_surrogate_in_a_result_still_gives_valid_json(dispatcher):
    reply, doc = send(dispatcher, "boom", {"args": {"kind": "surrogate"}})
    assert reply.ok and doc["result"] == "\ud800" and reply.body.isascii()


def test_dispatcher_never_raises_on_a_non_bytes_payload(dispatcher, caplog):
    reply = dispatcher.handle("ping", None)
    doc = json.loads(reply.body)
    assert (reply.ok, reply.code) == (False, "internal") and "TypeError" in doc["error"]["message"]
    assert any(r.exc_info for r in caplog.records)


def test_verifier_crash_is_internal_and_releases_the_request_id(dispatcher, verifier, sign, mocker, calls):
    mocker.patch.object(verifier, "verify", side_effect=RuntimeError("disk on fire"))
    refused(dispatcher, "variant", sign(request_id="r1"), "internal", "RuntimeError")
    mocker.stopall()
    reply, doc = send(dispatcher, "variant", sign(request_id="r1"))
    assert reply.ok and not reply.cached and doc["result"]["by"] == "ops"


# --------------------------------------------------------------------------------------- de-duplication


def test_duplicate_gets_the_cached_reply_byte_identical(dispatcher, calls):
    first = dispatcher.handle("echo", b'{"request_id": "r1", "args": {"text": "a"}}')
    again = dispatcher.handle("echo", b'{"request_id": "r1", "args": {"text": "other"}}')
    assert again.body == first.body and again.cached and not first.cached
    assert len(calls) == 1
    c = dispatcher.counters
    assert (c["requests"], c["ok"], c["duplicates"]) == (2, 1, 1)


def test_same_request_id_for_another_command_is_not_a_duplicate(dispatcher, calls):
    send(dispatcher, "echo", {"request_id": "r1", "args": {"text": "a"}})
    reply, _ = send(dispatcher, "ping", {"request_id": "r1"})
    assert reply.ok and not reply.cached and dispatcher.counters["duplicates"] == 0


def test_refusals_after_the_request_id_are_cached(dispatcher, calls):
    first = dispatcher.handle("echo", b'{"request_id": "r1", "args": {}}')
    again = dispatcher.handle("echo", b'{"request_id": "r1", "args": {"text": "now valid"}}')
    assert first.code == "bad_args" and again.body == first.body and again.cached and not calls


def test_handler_errors_are_cached_but_internal_is_retried(dispatcher, calls):
    a = dispatcher.handle("boom", b'{"request_id": "f", "args": {"kind": "fieldnode"}}')
    b = dispatcher.handle("boom", b'{"request_id": "f", "args": {"kind": "fieldnode"}}')
    assert b.cached and b.body == a.body and len(calls) == 1
    dispatcher.handle("boom", b'{"request_id": "i", "args": {"kind": "runtime"}}')
    c = dispatcher.handle("boom", b'{"request_id": "i", "args": {"kind": "runtime"}}')
    assert c.code == "internal" and not c.cached and len(calls) == 3
    assert RETRIABLE_CODES == {"rate_limited", "internal"}


def test_cache_entries_expire_after_the_window(registry, clock, calls):
    d = Dispatcher(registry, clock=clock, dedupe_window_s=300)
    payload = b'{"request_id": "r1", "args": {"text": "a"}}'
    d.handle("echo", payload)
    clock.advance(299.9)
    assert d.handle("echo", payload).cached and len(calls) == 1
    clock.advance(0.1)
    assert not d.handle("echo", payload).cached and len(calls) == 2


def test_window_zero_disables_de_duplication(registry, clock, calls):
    d = Dispatcher(registry, clock=clock, dedupe_window_s=0)
    for _ in range(2):
        assert not d.handle("echo", b'{"request_id": "r1", "args": {"text": "a"}}').cached
    assert len(calls) == 2


def test_oldest_entry_is_evicted_past_dedupe_max(registry, clock, calls):
    d = Dispatcher(registry, clock=clock, dedupe_max=2)
    for rid in ("r1", "r2", "r3"):
        d.handle("ping", json.dumps({"request_id": rid}).encode())
    assert d.handle("ping", b'{"request_id": "r3"}').cached
    assert d.handle("ping", b'{"request_id": "r2"}').cached
    assert not d.handle("ping", b'{"request_id": "r1"}').cached  # evicted, so run again (and cached anew)
    assert not d.handle("ping", b'{"request_id": "r2"}').cached  # r1's new entry pushed out the oldest, r2
    assert d.handle("ping", b'{"request_id": "r1"}').cached
    assert d.counters["duplicates"] == 3 and d.counters["ok"] == 5


def test_concurrent_duplicates_run_the_handler_once(registry, clock):
    entered, release, runs = threading.Event(), threading.Event(), []

    def slow(args, ctx):
        runs.append(ctx.request_id)
        entered.set()
        assert release.wait(30), "test never released the handler"
        return {"n": len(runs)}

    registry.register("slow", slow)
    d = Dispatcher(registry, clock=clock)
    replies: list[Reply] = []
    lock = threading.Lock()

    def call():
        r = d.handle("slow", b'{"request_id": "same"}')
        with lock:
            replies.append(r)

    threads = [threading.Thread(target=call) for _ in range(6)]
    threads[0].start()
    assert entered.wait(30)
    for t in threads[1:]:
        t.start()
    eventually(lambda: d._waiting == 5, timeout=10.0, what="five duplicates waiting")
    release.set()
    for t in threads:
        t.join(30)
    assert runs == ["same"] and len(replies) == 6
    assert len({r.body for r in replies}) == 1 and sum(not r.cached for r in replies) == 1
    assert d.counters["duplicates"] == 5 and d.counters["ok"] == 1


# ------------------------------------------------------------------------------------------ rate limiting


def test_rate_limit_burst_then_refill(registry, clock, calls):
    d = Dispatcher(registry, clock=clock, rate_burst=3, rate_per_s=2.0)
    for i in range(3):
        assert d.handle("ping", json.dumps({"request_id": f"r{i}"}).encode()).ok
    doc = refused(d, "ping", {"request_id": "r3"}, "rate_limited", "more than 3 commands", "retry in 0.5 s")
    assert doc["error"]["retry_after_s"] == 0.5 and doc["request_id"] == "r3"
    clock.advance(0.25)
    doc = refused(d, "ping", {"request_id": "r3"}, "rate_limited", "retry in 0.25 s")  # not cached: retriable
    assert doc["error"]["retry_after_s"] == 0.25
    clock.advance(0.25)
    reply, _ = send(d, "ping", {"request_id": "r3"})
    assert reply.ok and not reply.cached
    assert d.counters["rate_limited"] == 2


def test_rate_limit_defaults_are_20_and_5_per_s(dispatcher):
    for i in range(20):
        assert dispatcher.handle("ping", b"{}").ok
    doc = refused(dispatcher, "ping", {}, "rate_limited", "more than 20", "5/s")
    assert doc["error"]["retry_after_s"] == 0.2


def test_refill_is_capped_at_the_burst(registry, clock):
    d = Dispatcher(registry, clock=clock, rate_burst=2, rate_per_s=1)
    clock.advance(1000)
    assert d.handle("ping", b"{}").ok and d.handle("ping", b"{}").ok
    assert d.handle("ping", b"{}").code == "rate_limited"


def test_duplicates_and_malformed_payloads_use_no_token(registry, clock):
    d = Dispatcher(registry, clock=clock, rate_burst=1, rate_per_s=1)
    assert d.handle("ping", b'{"request_id": "r1"}').ok
    for _ in range(5):
        assert d.handle("ping", b'{"request_id": "r1"}').cached
        assert d.handle("ping", b"[]").code == "bad_json"
    assert d.handle("ping", b"{}").code == "rate_limited"


# ------------------------------------------------------------------------------------- privileged commands


def test_privileged_without_envelope_is_unauthorized(dispatcher, calls):
    refused(dispatcher, "variant", {"request_id": "r1", "args": {"variant": "lite"}}, "unauthorized",
            "'variant'", "needs a signed envelope")
    assert not calls


def test_privileged_without_verifier_is_unauthorized(registry, clock, sign, calls):
    d = Dispatcher(registry, clock=clock)
    refused(d, "variant", sign(), "unauthorized", "needs a signed envelope", "no verifier")
    refused(d, "variant", {"args": {"variant": "lite"}}, "unauthorized", "needs a signed envelope")
    refused(d, "echo", sign(cmd="echo", args={"text": "x"}), "unauthorized", "no verifier")
    assert not calls


def test_good_envelope_runs_with_the_signer(dispatcher, sign, calls):
    reply, doc = send(dispatcher, "variant", sign(request_id="r1"))
    assert doc["result"] == {"variant": "lite", "by": "ops"} and doc["request_id"] == "r1"
    (_, args, ctx), = calls
    assert args == {"variant": "lite"} and ctx.signer == "ops" and ctx.request_id == "r1"


def test_unprivileged_command_may_come_signed(dispatcher, sign, calls):
    reply, doc = send(dispatcher, "echo", sign(cmd="echo", args={"text": "hi"}))
    assert doc["result"] == {"text": "hi"} and calls[0][2].signer == "ops"
    env = sign(cmd="echo", args={"text": "hi"})
    env["args"]["text"] = "bye"
    refused(dispatcher, "echo", env, "bad_signature", "does not verify")


def test_tampered_envelope_is_bad_signature(dispatcher, sign, calls):
    env = sign(args={"variant": "lite"})
    env["args"] = {"variant": "full"}
    refused(dispatcher, "variant", env, "bad_signature", "signature does not verify")
    assert not calls


def test_replay_with_new_request_id_is_refused_but_same_id_gets_cached_success(dispatcher, sign, calls):
    env = sign(request_id="r1")
    first = dispatcher.handle("variant", json.dumps(env).encode())
    again = dispatcher.handle("variant", json.dumps(env).encode())
    assert first.ok and again.cached and again.body == first.body
    refused(dispatcher, "variant", {**env, "request_id": "r2"}, "replayed", "already used")
    del env["request_id"]
    refused(dispatcher, "variant", env, "replayed", "already used")
    assert len(calls) == 1


def test_expired_envelope(dispatcher, sign, clock):
    env = sign(ttl_s=10)
    clock.advance(10 + 30 + 1)  # past expiry plus the verifier's default skew
    refused(dispatcher, "variant", env, "expired", "expired")


def test_expiry_too_far_ahead(dispatcher, sign):
    refused(dispatcher, "variant", sign(ttl_s=3600), "expiry_too_far", "at most 600 s")


def test_envelope_for_another_device_or_command_is_wrong_target(dispatcher, sign):
    refused(dispatcher, "variant", sign(device="pump-08"), "wrong_target", "'pump-08'")
    refused(dispatcher, "variant", sign(cmd="echo", args={"text": "x"}), "wrong_target", "arrived as 'variant'")


def test_envelope_with_an_untrusted_key_is_unknown_key(dispatcher, sign):
    refused(dispatcher, "variant", sign(key=ed25519.Ed25519PrivateKey.generate()), "unknown_key",
            "not in the trust directory")


@pytest.mark.parametrize("change, fragment", [
    (lambda e: e.pop("nonce"), "missing field(s) nonce"),
    (lambda e: e.update(extra=1), "unknown field(s) 'extra'"),
    (lambda e: e.update(sig="!!"), "'sig'"),
], ids=["missing-field", "unknown-field", "bad-sig-encoding"])
def test_malformed_envelope(dispatcher, sign, change, fragment):
    env = sign()
    change(env)
    refused(dispatcher, "variant", env, "envelope_malformed", fragment)


def test_signed_args_are_still_validated(dispatcher, sign, calls):
    refused(dispatcher, "variant", sign(args={"variant": "turbo"}), "bad_args", "argument 'variant'",
            "one of 'full', 'lite'")
    refused(dispatcher, "variant", sign(args={"variant": "lite", "force": True}), "bad_args", "'force'")
    assert not calls


def test_envelope_request_id_is_checked(dispatcher, sign):
    refused(dispatcher, "variant", sign(request_id="bad id"), "bad_request", "request_id")


def test_refused_envelopes_are_counted(dispatcher, sign):
    env = sign()
    env["args"] = {"variant": "full"}
    dispatcher.handle("variant", json.dumps(env).encode())
    dispatcher.handle("variant", json.dumps(sign(device="x")).encode())
    c = dispatcher.counters
    assert c["bad_signature"] == 1 and c["wrong_target"] == 1 and c["ok"] == 0


# ----------------------------------------------------------------------------------- registry and counters


@pytest.mark.parametrize("name", ["Ping", "1ping", "", "a" * 65, "a b", "a/b", "a+b", "_x", "ping#"])
def test_bad_command_names_are_refused(name):
    with pytest.raises(ValueError, match="command name"):
        Registry().register(name, lambda a, c: None)


@pytest.mark.parametrize("name", ["update.install", "a", "a-b_c.d9", "a" * 64])
def test_good_command_names(name):
    reg = Registry()
    reg.register(name, lambda a, c: None)
    assert reg.get(name).name == name


def test_registry_refuses_duplicates_and_bad_handlers(registry):
    with pytest.raises(ValueError, match="'ping' is already registered"):
        registry.register("ping", lambda a, c: None)
    with pytest.raises(ValueError, match="not callable"):
        registry.register("x", "not a function")
    with pytest.raises(ValueError, match="unique names"):
        registry.register("x", lambda a, c: None, args=(Arg("a", int), Arg("a", str)))
    assert registry.get("x") is None and registry.get(["x"]) is None


def test_registry_starts_empty_and_describes_commands(registry):
    assert Registry().names() == [] and Registry().describe() == []
    assert registry.names() == ["boom", "echo", "ping", "tune", "variant"]
    desc = {d["name"]: d for d in registry.describe()}
    json.dumps(desc)  # JSON-able for `fieldnode send --help` and the docs
    assert desc["ping"] == {"name": "ping", "privileged": False, "local": True, "args": [],
                            "doc": "Liveness check: answers with the board's time and agent version."}
    assert desc["echo"]["doc"] == "Echoes its text."  # from the docstring
    assert desc["variant"]["privileged"] is True and desc["variant"]["doc"] == "sets the model variant"
    assert desc["echo"]["args"][1] == {"name": "times", "type": "integer", "required": False, "default": 1,
                                       "choices": [], "minimum": 1, "maximum": 5, "doc": ""}
    assert desc["echo"]["args"][0]["required"] is True and desc["echo"]["args"][0]["doc"] == "what to echo"
    level, = [a for a in desc["tune"]["args"] if a["name"] == "level"]
    assert level["type"] == "integer or string"


def test_decorator_returns_the_function(registry):
    @registry.command("noop")
    def noop(args, ctx):
        return None

    assert registry.get("noop").handler is noop and callable(noop)


def test_counters_cover_every_code_and_add_up(dispatcher, sign):
    assert {c.value for c in ErrorCode} <= set(dispatcher.counters)
    assert all(v == 0 for v in dispatcher.counters.values())
    dispatcher.handle("ping", b"{}")
    dispatcher.handle("ping", b'{"request_id": "a"}')
    dispatcher.handle("ping", b'{"request_id": "a"}')
    dispatcher.handle("nope", b"{}")
    dispatcher.handle("ping", b"[]")
    dispatcher.handle("boom", b'{"args": {"kind": "fieldnode"}}')
    c = dispatcher.counters
    assert (c["requests"], c["ok"], c["duplicates"], c["unknown_command"], c["bad_json"], c["pump_jammed"]) == \
        (6, 2, 1, 1, 1, 1)
    assert c["requests"] == sum(v for k, v in c.items() if k != "requests")


def test_error_codes_are_stable_strings():
    assert ErrorCode.BAD_JSON == "bad_json" and ErrorCode("internal") is ErrorCode.INTERNAL
    assert [c.value for c in ErrorCode] == [
        "payload_too_large", "unknown_command", "bad_json", "bad_request", "rate_limited", "envelope_malformed",
        "wrong_target", "unknown_key", "bad_signature", "expired", "expiry_too_far", "replayed", "unauthorized",
        "bad_args", "bad_reply_topic", "internal"]
    assert issubclass(BadArgs, CommandError) and issubclass(CommandError, LinkError)


@pytest.mark.parametrize("kw", [{"max_payload": 0}, {"dedupe_window_s": -1}, {"dedupe_max": -1},
                                {"rate_burst": 0}, {"rate_per_s": 0}])
def test_dispatcher_limits_are_checked(registry, kw):
    with pytest.raises(ValueError, match="need max_payload > 0"):
        Dispatcher(registry, **kw)


# ---------------------------------------------------------------- refused or ran: what the link may leave unanswered


@pytest.mark.parametrize("name, payload, code", [
    ("echo", b"x" * 20000, "payload_too_large"),
    ("nope", b'{"request_id": "r1"}', "unknown_command"),
    ("echo", b"[]", "bad_json"),
    ("echo", b'{"request_id": "a b"}', "bad_request"),
    ("variant", b'{"args": {"variant": "lite"}}', "unauthorized"),
    ("echo", b'{"args": {}}', "bad_args"),
])
def test_a_request_refused_before_its_handler_says_so(dispatcher, calls, name, payload, code):
    reply = dispatcher.handle(name, payload)
    assert (reply.code, reply.refused) == (code, True) and calls == []


def test_a_request_that_ran_is_not_refused_even_when_it_failed(dispatcher):
    assert not dispatcher.handle("echo", b'{"args": {"text": "a"}}').refused
    for _ in range(3):
        failed = dispatcher.handle("boom", b'{"args": {"kind": "fieldnode"}}')
        assert failed.code == "pump_jammed" and not failed.refused


def test_rate_limited_is_a_refusal(dispatcher):
    replies = [dispatcher.handle("ping", b"{}") for _ in range(dispatcher.rate_burst + 1)]
    assert [r.refused for r in replies] == [False] * dispatcher.rate_burst + [True]
    assert replies[-1].code == "rate_limited"


def test_unknown_command_echoes_a_valid_request_id(dispatcher):
    reply = dispatcher.handle("nope", b'{"request_id": "r-7"}')  # an MQTT 3.1.1 sender matches replies by it
    assert reply.code == "unknown_command" and json.loads(reply.body)["request_id"] == "r-7"


def test_refuse_shapes_and_counts_a_refusal_decided_by_the_link(dispatcher, calls):
    reply = dispatcher.refuse("ping", b'{"request_id": "r-3"}', BadReplyTopic("response topic 'x/#': wildcard"))
    doc = json.loads(reply.body)
    assert (reply.refused, reply.ok, reply.code) == (True, False, "bad_reply_topic") and calls == []
    assert doc == {"ok": False, "cmd": "ping", "request_id": "r-3",
                   "error": {"code": "bad_reply_topic", "message": "response topic 'x/#': wildcard"}}
    assert json.loads(dispatcher.refuse("ping", b"\xff", BadReplyTopic("x")).body)["request_id"] is None
    c = dispatcher.counters
    assert c["bad_reply_topic"] == 2 and c["requests"] == sum(v for k, v in c.items() if k != "requests")
