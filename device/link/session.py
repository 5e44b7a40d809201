"""One command and its reply over MQTT: the session that ``fieldnode send``, ``diag``'s broker check and the
operator's tools use.

1. :func:`build_request` checks the input and makes the payload: ``{"request_id", "args"}``, or the signed
   envelope (:func:`device.link.envelope.sign_envelope`) plus ``request_id``.
2. :func:`send` subscribes to the reply topic (waiting for the SUBACK), publishes to ``<prefix>/cmd/<CMD>`` at
   QoS 1 and waits. MQTT 5: Response Topic ``<prefix>/reply/<client id>`` and Correlation Data = request id,
   which the reply carries back. MQTT 3.1.1: the first reply on ``<prefix>/reply`` with our ``request_id``.

Topics, request ids, the JSON encoding and the reply shape come from the wire contract (:mod:`device.link.wire`),
which the board's link imports too. The client comes from :mod:`device.link.mqttclient` (TLS, credentials, and under
MQTT 5 a Maximum Packet Size of :data:`REPLY_MAX_PACKET`, so no reply can make the sender read more). The command
line is :mod:`tools.send`.
"""

from __future__ import annotations

import logging
import math
import secrets
import ssl
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device.clock import SYSTEM_CLOCK, Clock
from device.link import envelope, wire
from device.link.errors import (BadInput, ConnectError, LinkError, NoReply,
                                PublishError, ReplyMalformed, SubscribeError)
from device.link.mqttclient import PROTOCOLS, Endpoint, new_client
from device.link.url import BrokerUrl, TlsFiles

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ed25519

log = logging.getLogger(__name__)

__all__ = ["PROTOCOLS", "Request", "Session", "build_request", "send"]
KEEPALIVE_S = 30
REPLY_MAX_PACKET = 1024 * 1024  # a board's largest reply (diag's, status) is a few tens of kB
_VERSIONS = {mqtt.MQTTv5: "5", mqtt.MQTTv311: "3.1.1"}


@dataclass(frozen=True)
class Request:
    """A command ready to publish.

    Attributes:
        topic: The command topic, ``<prefix>/cmd/<CMD>``.
        payload: The JSON object to publish.
        request_id: The id the reply must carry (JSON field and MQTT 5 Correlation Data).
        prefix: The device's topic prefix.
    """

    topic: str
    payload: dict
    request_id: str
    prefix: str


def build_request(device: str, cmd: str, args: dict, *, prefix: str | None = None, request_id: str | None = None,
                  private_key: ed25519.Ed25519PrivateKey | None = None, ttl_s: float = 60.0) -> Request:
    """Checks the input and builds the request.

    Args:
        device: The target device id (one topic level).
        cmd: The command name (one topic level).
        args: The command's arguments.
        prefix: Topic prefix; default ``fieldnode/v1/<device>``.
        request_id: Default ``send-<12 hex digits>``.
        private_key: An Ed25519 private key to sign with, or None for an unsigned request.
        ttl_s: Lifetime of a signed envelope.

    Returns:
        The request.

    Raises:
        BadInput: A device id, command or prefix with MQTT wildcards, '/' where one level is expected, or
            empty levels; args not a JSON object or not representable as JSON; a bad request id.
        EnvelopeError: Signing refused the input (e.g. ttl_s).
    """
    check_topic("device id", device, one_level=True)
    check_topic("command", cmd, one_level=True)
    prefix = wire.default_prefix(device) if prefix is None else prefix
    check_topic("--prefix", prefix, one_level=False)
    if not isinstance(args, dict):
        raise BadInput(f"--args: expected a JSON object like '{{\"variant\": \"lite\"}}', got {type(args).__name__}")
    rid = wire.new_request_id() if request_id is None else request_id
    problem = wire.request_id_problem(rid)
    if problem is not None:
        raise BadInput(f"--request-id {rid!r}: {problem}")
    if private_key is None:
        payload = wire.request(rid, args)
    else:
        payload = envelope.sign_envelope(private_key, device=device, cmd=cmd, args=args, ttl_s=ttl_s)
        payload["request_id"] = rid
    encode(payload)  # fail here, as bad input, rather than half-way through sending
    return Request(topic=wire.Topics(prefix).command(cmd), payload=payload, request_id=rid, prefix=prefix)


def send(url: BrokerUrl, request: Request, *, tls: TlsFiles = TlsFiles(), protocol: int | str = mqtt.MQTTv5,
         timeout_s: float = 10.0, username: str | None = None, password: str | None = None,
         deadline: float | None = None, clock: Clock = SYSTEM_CLOCK) -> dict:
    """Publishes one request and waits for its reply, all within ``timeout_s`` (or by ``deadline``).

    Args:
        url: The broker.
        request: From :func:`build_request`.
        tls: TLS files for ``mqtts://`` (checked with :func:`check_tls` first).
        protocol: ``mqtt.MQTTv5`` or ``mqtt.MQTTv311`` (or ``"5"``, ``"3.1.1"``).
        timeout_s: Overall time limit: connect, subscribe, publish and reply. (Only a host name lookup that
            hangs in the system resolver can take longer.)
        username: MQTT username, or None.
        password: MQTT password (:func:`device.link.url.read_password`), or None.
        deadline: When to give up, on ``clock.monotonic()``; default ``timeout_s`` from now. :func:`run` starts
            it with the command, so reading files and signing count too.
        clock: Time source of the deadline (a seam for tests).

    Returns:
        The reply: a JSON object with ``ok`` and ``result`` or ``error``.

    Raises:
        BrokerUrlError: TLS files do not fit the URL or cannot be loaded.
        ConnectError: Unreachable, TLS or authentication refused, or the connection dropped.
        SubscribeError: The broker refused the reply subscription.
        PublishError: paho or (MQTT 5) the broker refused the publish.
        NoReply: Nothing came back in time.
        ReplyMalformed: The reply to this request broke the contract.
    """
    endpoint = Endpoint(url, tls, username, password if username is not None else None,
                        _VERSIONS.get(protocol, protocol))  # checks the TLS files first
    session = Session(endpoint, request, timeout_s, clock.monotonic() + timeout_s if deadline is None
                      else deadline, clock)
    try:
        session.connect(missing_cert=url.tls and not tls.cert)
        session.subscribe()
        return session.exchange()
    finally:
        session.close()


class Session:
    """One request and its reply over one connection: paho's thread records into it, the caller waits.

    Callbacks only record and notify; each catches everything, because an exception would end paho's thread
    and leave the caller waiting for the timeout.

    Args:
        endpoint: The broker and the login (:class:`device.link.mqttclient.Endpoint`).
        request: From :func:`build_request`.
        timeout_s: The overall limit (for messages). deadline: When to give up, on ``clock.monotonic()``.
        clock: Time source of the deadline.

    Raises:
        BrokerUrlError: The TLS files do not load.
    """

    def __init__(self, endpoint: Endpoint, request: Request, timeout_s: float, deadline: float, clock: Clock) -> None:
        self.endpoint, self.url, self.request, self.timeout_s = endpoint, endpoint.url, request, timeout_s
        self.deadline, self.clock = deadline, clock
        self.v5 = endpoint.v5
        # At most 23 characters, the length every MQTT 3.1.1 broker must accept; random, so two operators (or
        # a rerun while the old session lingers) never take over each other's connection or reply topic.
        client_id = f"fn-send-{secrets.token_hex(6)}"
        topics = wire.Topics(request.prefix)
        self.reply_topic = topics.reply_for(client_id) if self.v5 else topics.reply
        # reconnect_on_failure=False: a refused or dropped connection is an answer, not something to retry.
        self.cond = threading.Condition()
        self.client = c = new_client(endpoint, client_id, max_packet=REPLY_MAX_PACKET, reconnect_on_failure=False)
        guard = self._guard  # VERSION2 signatures: (client, userdata, flags|mid, reason code(s), properties)
        c.on_connect = guard(lambda _c, _u, _f, rc, _p: self._record("connack", rc))
        c.on_disconnect = guard(lambda _c, _u, _f, rc, _p: self._record("dropped", rc))
        c.on_subscribe = guard(lambda _c, _u, mid, rcs, _p: self._record("subacks", list(rcs), mid))
        c.on_publish = guard(lambda _c, _u, mid, rc, _p: self._record("pubacks", rc, mid))
        c.on_message, c.on_log = guard(self._on_message), guard(self._on_log)
        self.loop_started = False
        self.connack = self.dropped = None
        self.subacks: dict[int, list] = {}
        self.pubacks: dict[int, Any] = {}
        self.reply: dict | None = None
        self.malformed: str | None = None
        self.callback_error: str | None = None
        self.first_error: str | None = None

    def connect(self, *, missing_cert: bool) -> None:
        url = self.url
        try:
            self.client.connect_timeout = max(self.remaining(), 0.01)  # TCP connect and TLS
            self.client.open(KEEPALIVE_S)
        except (OSError, ValueError) as exc:  # ssl.SSLError, refused, timed out, unresolvable
            raise ConnectError(f"could not connect to {url}: {reason(exc)}") from exc
        self.client.loop_start()
        self.loop_started = True
        self._wait(lambda: self.connack is not None or self.dropped is not None)
        if self.connack is None and self.dropped is not None:
            # mosquitto checks a client certificate after a TLS 1.3 handshake, so a refused (or missing)
            # certificate shows here, as a drop before the CONNACK, with the detail in paho's error log.
            hint = "; no client certificate was given, the broker may require one" if missing_cert else ""
            raise ConnectError(f"could not connect to {url}: disconnected before CONNACK ({self._drop()}){hint}")
        if self.connack is None:
            raise ConnectError(f"could not connect to {url}: no CONNACK within {self.timeout_s:g} s")
        if self.connack.is_failure:
            raise ConnectError(f"could not connect to {url}: the broker refused the connection ({self.connack})")

    def subscribe(self) -> None:
        topic = self.reply_topic
        try:
            rc, mid = self.client.subscribe(topic, qos=1)
        except ValueError as exc:
            raise SubscribeError(f"subscribe to {topic}: {exc}") from exc
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise SubscribeError(f"subscribe to {topic}: {mqtt.error_string(rc)}")
        self._wait(lambda: mid in self.subacks or self.dropped is not None)
        if mid not in self.subacks:
            if self.dropped is not None:
                raise ConnectError(f"connection to {self.url} lost while subscribing ({self._drop()})")
            raise NoReply(f"no reply within {self.timeout_s:g} s: the broker did not acknowledge the "
                          f"subscription to {topic}")
        failed = [rc for rc in self.subacks[mid] if rc.is_failure]
        if failed:
            raise SubscribeError(f"the broker refused the subscription to {topic} ({failed[0]})")

    def exchange(self) -> dict:
        request, props = self.request, None
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = request.request_id.encode("ascii")
            # Once the sender has given up, the command must not run later when an offline board reconnects.
            props.MessageExpiryInterval = max(1, math.ceil(self.remaining()))
        try:
            info = self.client.publish(request.topic, encode(request.payload), qos=1, properties=props)
        except (ValueError, TypeError) as exc:
            raise PublishError(f"publish to {request.topic}: {exc}") from exc
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise PublishError(f"publish to {request.topic}: {mqtt.error_string(info.rc)}")

        def refused() -> bool:
            return getattr(self.pubacks.get(info.mid), "is_failure", False)

        self._wait(lambda: self.reply is not None or self.malformed is not None or self.dropped is not None
                   or self.callback_error is not None or refused())
        if self.reply is not None:
            return self.reply
        if self.malformed is not None:
            raise ReplyMalformed(f"malformed reply on {self.reply_topic}: {self.malformed}")
        if self.callback_error is not None:
            raise LinkError(f"internal error while waiting for the reply: {self.callback_error}")
        if refused():
            raise PublishError(f"the broker refused the publish to {request.topic} ({self.pubacks[info.mid]})")
        if self.dropped is not None:
            raise ConnectError(f"connection to {self.url} lost while waiting for the reply ({self._drop()})")
        raise NoReply(f"no reply within {self.timeout_s:g} s on {self.reply_topic} (is the board online, and "
                      f"does it take commands on {request.topic}?)")

    def close(self) -> None:
        self.client.disconnect()  # sends DISCONNECT if connected; either way the network thread ends
        if self.loop_started:
            self.client.loop_stop()

    def remaining(self) -> float:
        """Seconds left until the deadline (never negative)."""
        return max(self.deadline - self.clock.monotonic(), 0.0)

    def _wait(self, predicate: Callable[[], object]) -> None:
        with self.cond:
            self.cond.wait_for(predicate, self.remaining())

    def _drop(self) -> str:
        return f"{self.dropped}" + (f"; {self.first_error}" if self.first_error else "")

    def _guard(self, fn: Callable[..., object]) -> Callable[..., None]:
        def callback(*args: object) -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - see the class docstring
                log.exception("send: error in a paho callback")
                with self.cond:
                    self.callback_error = self.callback_error or repr(exc)
                    self.cond.notify_all()
        return callback

    def _record(self, name: str, value: object, key: int | None = None) -> None:
        with self.cond:
            if key is None:
                setattr(self, name, value)
            else:
                getattr(self, name)[key] = value
            self.cond.notify_all()

    def _on_log(self, client: mqtt.Client, userdata: object, level: int, buf: str) -> None:
        log.debug("paho: %s", buf)
        if level == mqtt.MQTT_LOG_ERR:
            with self.cond:  # the first error is the cause; later ones are paho noticing the dead socket
                self.first_error = self.first_error or buf

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        # A retained message predates this request; with a reused --request-id it could look like our reply.
        if message.retain or message.topic != self.reply_topic:
            return
        rid = self.request.request_id
        if self.v5 and getattr(message.properties, "CorrelationData", None) != rid.encode("ascii"):
            log.debug("send: ignored a reply for another request on %s", message.topic)
            return
        try:
            doc = wire.loads(bytes(message.payload).decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            doc, problem = None, f"not JSON ({exc})"
        else:
            problem = wire.reply_problem(doc)
        if not self.v5 and (not isinstance(doc, dict) or doc.get("request_id") != rid):
            log.debug("send: ignored a reply for another request on %s", message.topic)  # a shared topic
            return
        with self.cond:
            if self.reply is None and self.malformed is None:  # the first answer counts
                if problem is None:
                    self.reply = doc
                else:
                    self.malformed = f"{problem}: {preview(message.payload)}"
                self.cond.notify_all()


def check_topic(what: str, value: object, *, one_level: bool) -> None:
    """A topic level (device id, command) or a prefix, by the wire contract's rule (:func:`wire.topic_problem`)."""
    problem = wire.topic_problem(value, one_level=one_level)
    if problem is not None:
        raise BadInput(f"{what} {value!r}: {problem}")


def encode(payload: dict) -> bytes:
    try:
        return wire.encode(payload, strict=True)
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise BadInput(f"--args: not representable as JSON ({exc})") from exc


def printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def preview(payload: bytes, limit: int = 200) -> str:
    text = bytes(payload[:limit]).decode("utf-8", "replace")
    return printable(text) + ("..." if len(payload) > limit else "")


def reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):  # SSL's text has the detail
        return exc.strerror
    return str(exc) or type(exc).__name__
