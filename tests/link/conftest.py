"""Broker fixtures for the MQTT-link tests: a session PKI, real mosquitto brokers (plain, TLS, ACL) and a
factory of connected paho clients (:class:`MqttTestClient`) that record what they see. A missing mosquitto
fails the test loudly; it never skips."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.link.broker import Broker, BrokerNotFound
from tests.link.certs import Pki, make_pki

DEVICE_IDS = ("dev-a", "dev-b")
OPERATOR_ID = "operator"


# -- clients ----------------------------------------------------------------------------------------------


class ConnectFailed(Exception):
    """A test client could not connect; carries what was observed.

    Attributes:
        reason_code: CONNACK or DISCONNECT reason code, if the broker got that far.
        error: The exception ``connect()`` raised (e.g. ``ssl.SSLError``), if any.
        log: paho's log lines for the attempt (socket and TLS errors show up here).
    """

    def __init__(self, message: str, *, reason_code: object = None, error: Optional[BaseException] = None,
                 log: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.error = error
        self.log = list(log)


@dataclass(frozen=True)
class Received:
    """One message as a subscriber saw it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    properties: Optional[Properties]


_FROM_IDENTITY = object()
_ids = itertools.count(1)


class MqttTestClient:
    """A real paho client (``.client``) on a test broker, with callbacks that record everything.

    Connects with VERSION2 callbacks; runs the network loop in paho's thread, which also reconnects after an
    outage (quickly: ``reconnect_delay``). Every wait takes a timeout and fails with the broker log.

    Args:
        broker: The broker to connect to.
        identity: Certificate CN for TLS brokers (``pki.client(identity)``); also the client id prefix.
        client_id: Explicit client id; by default ``<identity or "client">-<n>``, unique per process.
        protocol: ``mqtt.MQTTv5`` or ``mqtt.MQTTv311``.
        cert: ``(cert, key)`` to present instead of the identity's; None for no client certificate.
        keepalive: Keepalive seconds.
        reconnect_delay: ``(min, max)`` seconds between paho's reconnect attempts.
    """

    def __init__(self, broker: Broker, identity: Optional[str] = None, *, client_id: Optional[str] = None,
                 protocol: int = mqtt.MQTTv5, cert: object = _FROM_IDENTITY, keepalive: int = 10,
                 reconnect_delay: Tuple[float, float] = (0.1, 1.0)) -> None:
        self.broker = broker
        self.identity = identity
        self.client_id = client_id or f"{identity or 'client'}-{next(_ids)}"
        self.protocol = protocol
        self.keepalive = keepalive
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=protocol,
            **({} if protocol == mqtt.MQTTv5 else {"clean_session": True}),
        )
        self.client.reconnect_delay_set(*reconnect_delay)
        if broker.tls:
            assert broker.pki is not None
            if cert is _FROM_IDENTITY:
                if identity is None:
                    raise ValueError("a TLS broker needs an identity (or cert=...)")
                cert = broker.pki.client(identity)
            certfile, keyfile = cert if cert is not None else (None, None)  # type: ignore[misc]
            self.client.tls_set(ca_certs=str(broker.pki.ca), certfile=certfile and str(certfile),
                                keyfile=keyfile and str(keyfile))
        self._cond = threading.Condition()
        self.connects = 0
        self.connacks: List[ReasonCode] = []
        self.disconnects: List[ReasonCode] = []
        self.log: List[str] = []
        self._messages: List[Received] = []
        self._subacks: Dict[int, List[ReasonCode]] = {}
        self._pubacks: Dict[int, ReasonCode] = {}
        self._loop_running = False
        c = self.client
        c.on_connect, c.on_disconnect, c.on_message = self._on_connect, self._on_disconnect, self._on_message
        c.on_subscribe, c.on_publish, c.on_log = self._on_subscribe, self._on_publish, self._on_log

    # Callbacks run in paho's thread; they only record and notify (an exception would kill the thread).
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            self.connacks.append(reason_code)
            if not reason_code.is_failure:
                self.connects += 1
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            self.disconnects.append(reason_code)
            self._cond.notify_all()

    def _on_message(self, client, userdata, message) -> None:
        received = Received(message.topic, bytes(message.payload), message.qos, bool(message.retain),
                            getattr(message, "properties", None))
        with self._cond:
            self._messages.append(received)
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        with self._cond:
            self._subacks[mid] = list(reason_code_list)
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            self._pubacks[mid] = reason_code
            self._cond.notify_all()

    def _on_log(self, client, userdata, level, buf) -> None:
        with self._cond:
            self.log.append(buf)

    def _wait(self, predicate: Callable[[], object], timeout: float, what: str):
        with self._cond:
            result = self._cond.wait_for(predicate, timeout)
        if not result:
            raise AssertionError(f"{self.client_id}: {what} within {timeout}s\n"
                                 f"paho log: {self.log[-10:]}\n{self.broker.log_tail()}")
        return result

    def connect(self, timeout: float = 10.0, *, clean_start: bool = True) -> ReasonCode:
        """Connects and waits for a successful CONNACK.

        Returns:
            The CONNACK reason code.

        Raises:
            ConnectFailed: The socket/TLS layer raised, the broker refused, or it dropped the connection.
        """
        with self._cond:
            seen_acks, seen_drops = len(self.connacks), len(self.disconnects)
        kwargs = {"clean_start": clean_start} if self.protocol == mqtt.MQTTv5 else {}
        try:
            self.client.connect(self.broker.host, self.broker.port, self.keepalive, **kwargs)
        except OSError as exc:  # includes ssl.SSLError and ConnectionRefusedError
            raise ConnectFailed(f"{self.client_id}: connect raised {exc!r}", error=exc, log=self.log) from exc
        self.client.loop_start()
        self._loop_running = True
        with self._cond:
            self._cond.wait_for(lambda: len(self.connacks) > seen_acks or len(self.disconnects) > seen_drops,
                                timeout)
            ack = self.connacks[seen_acks] if len(self.connacks) > seen_acks else None
            drop = self.disconnects[seen_drops] if len(self.disconnects) > seen_drops else None
        if ack is not None and not ack.is_failure:
            return ack
        self.close()  # stop paho's reconnect loop on a refused client
        raise ConnectFailed(f"{self.client_id}: CONNACK {ack}, disconnect {drop}, paho log {self.log[-5:]}",
                            reason_code=ack if ack is not None else drop, log=self.log)

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0) -> List[ReasonCode]:
        """Subscribes and waits for the SUBACK.

        Returns:
            The SUBACK reason codes (granted QoS 0-2, or a failure such as 0x87 Not authorized).
        """
        rc, mid = self.client.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe({topic!r}) returned {rc}"
        self._wait(lambda: mid in self._subacks, timeout, f"no SUBACK for {topic!r}")
        return self._subacks[mid]

    def publish(self, topic: str, payload: Union[bytes, str] = b"", qos: int = 1, *, retain: bool = False,
                properties: Optional[Properties] = None, timeout: float = 10.0) -> ReasonCode:
        """Publishes and waits until paho reports it done (PUBACK/PUBCOMP for QoS > 0, written for QoS 0).

        Returns:
            The reason code paho passed to ``on_publish`` (MQTT 5 carries the broker's PUBACK reason).
        """
        info = self.client.publish(topic, payload, qos, retain=retain, properties=properties)
        self._wait(lambda: info.mid in self._pubacks, timeout, f"publish to {topic!r} not acknowledged")
        return self._pubacks[info.mid]

    def messages(self, topic: Optional[str] = None) -> List[Received]:
        """A snapshot of received messages, optionally only those matching the filter ``topic``."""
        with self._cond:
            return [m for m in self._messages if topic is None or mqtt.topic_matches_sub(topic, m.topic)]

    def wait_for_messages(self, count: int, timeout: float = 10.0, *, topic: Optional[str] = None
                          ) -> List[Received]:
        """Waits until at least ``count`` messages (matching ``topic``) arrived; returns all of them."""
        def enough() -> Optional[List[Received]]:
            got = [m for m in self._messages if topic is None or mqtt.topic_matches_sub(topic, m.topic)]
            return got if len(got) >= count else None
        return self._wait(enough, timeout, f"fewer than {count} messages on {topic or '#'}")

    def wait_connected(self, count: int = 1, timeout: float = 10.0) -> None:
        """Waits until the client has had ``count`` successful connections (reconnects included)."""
        self._wait(lambda: self.connects >= count, timeout, f"not connected {count} time(s)")

    def wait_disconnected(self, count: int = 1, timeout: float = 10.0) -> ReasonCode:
        """Waits until ``count`` disconnects were seen; returns the last reason code."""
        self._wait(lambda: len(self.disconnects) >= count, timeout, f"not disconnected {count} time(s)")
        return self.disconnects[-1]

    def close(self) -> None:
        """Disconnects cleanly (if connected) and stops paho's thread. Safe to call twice."""
        self.client.disconnect()
        if self._loop_running:
            self.client.loop_stop()
            self._loop_running = False


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """CA, server certificate and client certificates for ``dev-a``, ``dev-b`` and ``operator``
    (``pki.client(name)`` issues more on demand; ``pki.untrusted_client(name)`` one from a foreign CA)."""
    return make_pki(tmp_path_factory.mktemp("pki"), clients=(*DEVICE_IDS, OPERATOR_ID))


def run_broker(tmp_path_factory: pytest.TempPathFactory, mode: str, pki: Pki | None, *, workdir=None,
               extra_config=()) -> Iterator[Broker]:
    """Starts a broker for a fixture and always stops it (kill() if a clean stop hangs)."""
    try:
        broker = Broker(workdir or tmp_path_factory.mktemp(f"broker-{mode}"), mode, pki=pki,
                        extra_config=extra_config)
    except BrokerNotFound as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        broker.start()
        yield broker
    finally:
        # Runs on failure too; kill() if a clean stop hangs so no mosquitto outlives the test.
        try:
            broker.stop()
        finally:
            broker.kill()


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A plain (anonymous, no TLS) mosquitto on ``broker.url`` == ``mqtt://127.0.0.1:PORT``."""
    yield from run_broker(tmp_path_factory, "plain", None)


@pytest.fixture
def tls_broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Broker]:
    """mosquitto over TLS that requires a client certificate from ``pki``; its CN is the username."""
    yield from run_broker(tmp_path_factory, "tls", pki)


@pytest.fixture
def acl_broker(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Broker]:
    """Like ``tls_broker`` plus the ACL: identity X may only use ``fieldnode/v1/X/#``; ``operator`` all of
    ``fieldnode/v1/#``."""
    yield from run_broker(tmp_path_factory, "acl", pki)


@pytest.fixture
def mqtt_client() -> Iterator:
    """Factory of connected paho clients: ``mqtt_client(broker, "dev-a", protocol=mqtt.MQTTv311, ...)``.

    Takes the :class:`MqttTestClient` arguments plus ``connect=True`` (False returns it unconnected, e.g.
    to call ``.connect()`` under ``pytest.raises(ConnectFailed)``). Every client is closed at teardown.
    """
    made: List[MqttTestClient] = []

    def make(broker: Broker, identity: str | None = None, *, connect: bool = True, **kwargs) -> MqttTestClient:
        client = MqttTestClient(broker, identity, **kwargs)
        made.append(client)
        if connect:
            client.connect()
        return client

    yield make
    for client in reversed(made):
        client.close()
