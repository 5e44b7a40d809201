"""Operators are not locked out by a flood: a verified signed command has its own rate bucket, its own lane into
the command thread and its own room for the reply, so a flood of unsigned, badly signed or replayed commands
(which drains the shared bucket, fills the shared queue and spends the refusal budget) cannot starve it. Through
the real dispatcher, channel and link against a real mosquitto, and the dispatcher alone with a frozen clock."""

from __future__ import annotations

import base64
import json
import threading

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device.link.channel import CommandChannel
from device.link.client import Link
from device.link.commands import Arg, CallContext, Dispatcher, Registry, register_builtin
from device.link.envelope import TrustStore, Verifier, sign_envelope
from device.link.errors import BadSignature, EnvelopeReplayed, RateLimited
from device.link.spool.spool import Spool
from device.link.wire import Topics
from tests.link.conftest import run_broker
from tests.link.test_link_commands import PREFIX, REFUSAL_BURST, FrozenClock
from tests.waiting import eventually

DEV = "dev-a"
SIGNED = 10


def registry() -> Registry:
    reg = Registry()
    register_builtin(reg, version="test")

    def whoami(args: dict, ctx: CallContext) -> dict:
        """Privileged: says who signed it."""
        return {"signer": ctx.signer, "n": args.get("n")}

    reg.register("whoami", whoami, privileged=True, args=(Arg("n", int),))
    return reg


@pytest.fixture
def keys(tmp_path):
    """(operator key, a key the board does not trust, the trust directory)."""
    operator, stranger = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    trust = tmp_path / "trust"
    trust.mkdir(mode=0o700)
    (trust / "operator.pub").write_bytes(operator.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return operator, stranger, str(trust)


def dispatcher(trust: str, clock) -> Dispatcher:
    verifier = Verifier(TrustStore(trust), device_id=DEV, clock=clock)
    return Dispatcher(registry(), verifier=verifier, clock=clock, rate_burst=20, rate_per_s=5.0)


def envelope(key, cmd: str = "whoami", args: dict | None = None, **extra) -> bytes:
    return json.dumps({**sign_envelope(key, device=DEV, cmd=cmd, args=args or {}, ttl_s=120), **extra}).encode()


def forged(operator) -> bytes:
    """The operator's key id, a signature that does not verify (its args changed after signing)."""
    doc = json.loads(envelope(operator, args={"n": 1}))
    doc["args"] = {"n": 2}
    return json.dumps(doc).encode()


def misshapen(operator) -> bytes:
    doc = json.loads(envelope(operator))
    doc["sig"] = base64.b64encode(b"x" * 64).decode()
    return json.dumps(doc).encode()


# -- the dispatcher alone ----------------------------------------------------------------------------------------


def test_a_drained_shared_bucket_does_not_refuse_a_verified_envelope(keys):
    operator, stranger, trust = keys
    d = dispatcher(trust, FrozenClock())
    for _ in range(20):
        assert d.handle("ping", b"{}").ok
    assert d.handle("ping", b"{}").code == RateLimited.code  # the shared bucket is empty, and never refills
    for payload in (envelope(stranger), forged(operator), misshapen(operator)) * 10:  # refused: no token used
        assert not d.handle("whoami", payload).ok
    for n in range(20):  # the verified envelopes' own bucket
        reply = d.handle("whoami", envelope(operator, args={"n": n}))
        assert reply.ok and json.loads(reply.body)["result"] == {"signer": "operator", "n": n}
    assert d.handle("whoami", envelope(operator)).code == RateLimited.code  # it has a burst too
    assert d.handle("ping", b"{}").code == RateLimited.code


def test_the_signed_lane_lets_in_an_authentic_envelope_once(keys):
    operator, stranger, trust = keys
    d = dispatcher(trust, FrozenClock())
    good = envelope(operator)
    assert d.signed_lane("whoami", good)
    assert not d.signed_lane("whoami", good)  # a replayed copy is not let in again
    for name, payload in (("whoami", envelope(stranger)), ("whoami", forged(operator)),
                          ("whoami", misshapen(operator)), ("ping", envelope(operator)),  # signed for whoami
                          ("nope", envelope(operator, cmd="nope")), ("whoami", b'{"sig": 1}'), ("whoami", b"[}"),
                          ("whoami", b"{}")):
        assert not d.signed_lane(name, payload), (name, payload[:60])
    assert d.handle("whoami", good).ok  # claiming used nothing up: it still verifies, once
    assert d.handle("whoami", good).code == EnvelopeReplayed.code
    assert not d.signed_lane("whoami", good)
    assert d.handle("whoami", forged(operator)).code == BadSignature.code


def test_a_full_shared_queue_does_not_keep_a_signed_command_out(keys):
    """The command thread is busy (not started here), the flood fills the shared queue: the operator's signed
    command still gets in, is served first, and its reply is queued outside the refusal budget."""
    operator, stranger, trust = keys
    d = dispatcher(trust, FrozenClock())
    ran = []
    channel = CommandChannel(d, Topics("fieldnode/v1/dev-a"), v5=False, queue_size=8, refusal_budget=(0, 0.0))
    flood = [("ping", b"{}"), ("whoami", envelope(stranger)), ("whoami", forged(operator))] * 20
    for name, payload in flood:
        channel.offer(name, payload, None, None)
    assert channel.status()["commands_dropped"] == len(flood) - 8  # the shared queue is full
    channel.offer("whoami", envelope(operator, args={"n": 7}), None, None)
    st = channel.status()
    assert (st["signed_received"], st["signed_queued"], st["signed_dropped"]) == (1, 1, 0)
    original = d.handle

    def recording(name, payload):
        reply = original(name, payload)
        ran.append((name, reply.ok, reply.code))
        return reply

    d.handle = recording  # to see the order; the dispatcher itself runs unchanged
    t = threading.Thread(target=channel.serve, name="link-cmd", daemon=True)
    t.start()
    channel.stop()
    t.join(30)
    assert not t.is_alive()
    assert ran[0] == ("whoami", True, None)  # the signed one first, although it came last
    assert len(ran) == 9
    # Replies queued: the signed command's and the few pings' that ran; a refusal budget of 0 answers no refusal.
    assert channel.status()["replies_queued"] == sum(ok for _, ok, _ in ran)


# -- the whole link against mosquitto ----------------------------------------------------------------------------


class Flood(threading.Thread):
    """Publishes unsigned pings and badly signed or replayed envelopes at QoS 1 as fast as the broker takes them."""

    def __init__(self, client, payloads: list[tuple[str, bytes]]) -> None:
        super().__init__(daemon=True)
        self.client, self.payloads, self.sent = client, payloads, 0
        self.stop = threading.Event()

    def run(self) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "ops/flood"
        while not self.stop.is_set() and self.sent < 200_000:
            name, payload = self.payloads[self.sent % len(self.payloads)]
            info = self.client.client.publish(f"{PREFIX}/cmd/{name}", payload, qos=1, properties=props)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                self.sent += 1
            else:  # paho's queue is full: let the broker catch up
                self.stop.wait(0.002)


@pytest.fixture
def deep_broker(tmp_path_factory):
    """A plain mosquitto that queues without limit for a connected client. With its default (1000 messages),
    the broker itself drops what arrives for a board that is behind, the operator's commands with the flood's:
    that loss is the broker's (an ACL that lets only operators publish commands is its remedy, docs/mqtt.md),
    and this test is about the board's own limits."""
    yield from run_broker(tmp_path_factory, "plain", None, extra_config=["max_queued_messages 0"])


def test_signed_commands_are_answered_through_a_flood(deep_broker, mqtt_client, keys, tmp_path):
    broker = deep_broker
    operator, stranger, trust = keys
    clock = FrozenClock()  # no bucket ever refills: what the flood drains stays drained
    d = dispatcher(trust, clock)
    spool = Spool(str(tmp_path / "spool.db"), commit_interval_s=0.02)
    spool.start()
    link = Link(broker.url, DEV, spool, backoff=(0.05, 0.5), dispatcher=d, clock=clock,
                refusal_budget=(REFUSAL_BURST, 1.0))
    link.start()
    replayed = envelope(operator, args={"n": -1})
    flood_client = mqtt_client(broker, connect=False)
    flood_client.client.max_queued_messages_set(500)
    flood_client.connect()
    flood = Flood(flood_client, [("ping", b"{}"), ("whoami", envelope(stranger)), ("ping", b"{}"),
                                 ("whoami", forged(operator)), ("whoami", replayed), ("whoami", b"{}")])
    watcher = mqtt_client(broker)
    watcher.subscribe("ops/signed/#")
    op = mqtt_client(broker)
    try:
        assert link.wait_connected(20)
        flood.start()
        received = lambda: link.status()["commands_received"] + link.status()["commands_dropped"]  # noqa: E731
        # The shared bucket is empty and the refusal budget spent long before: all that counts from here on
        eventually(lambda: received() >= 2000 and d.counters["rate_limited"] > 1000, what="the flood at the board")
        for n in range(SIGNED):
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = f"ops/signed/{n}"
            props.CorrelationData = b"%d" % n
            op.client.publish(f"{PREFIX}/cmd/whoami", envelope(operator, args={"n": n}), qos=1, properties=props)
        answers = watcher.wait_for_messages(SIGNED, timeout=60, topic="ops/signed/#")
        at_answers = received()
        eventually(lambda: received() >= at_answers + 500, what="the flood going on after the answers")
    finally:
        flood.stop.set()
        flood.join(30)
        st, counters = link.status(), d.counters
        link.stop()
        spool.close()
    docs = sorted((json.loads(m.payload) for m in answers), key=lambda doc: doc["result"]["n"])
    assert [doc["result"] for doc in docs] == [{"signer": "operator", "n": n} for n in range(SIGNED)]
    assert st["signed_received"] == SIGNED + 1 and st["signed_dropped"] == 0  # and the first replayed copy
    assert counters["rate_limited"] > 1000 and st["replies_dropped"] > 1000  # the flood was refused as before
    assert counters["ok"] <= 20 + SIGNED + 1  # 20 pings (the shared burst), the operator's, the replayed one
    assert (st["connects"], st["disconnects"]) == (1, 0)
