"""Proves the broker fixtures: a real mosquitto (plain, TLS, ACL by certificate identity) and real paho clients.

The ACL tests also record how mosquitto 2.0.x enforces the ACL, which the MQTT link has to live with:
subscriptions outside a device's prefix are granted, but nothing is delivered through them; a denied publish
is dropped, and only an MQTT 5 QoS 1 publisher learns of it (PUBACK 0x87).
"""

from __future__ import annotations

import os
import ssl

import paho.mqtt.client as mqtt
import pytest

from tests.link.broker import Broker, BrokerNotFound
from tests.link.conftest import ConnectFailed

ROOT = "fieldnode/v1"
NOT_AUTHORIZED = 0x87
PROTOCOLS = pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311], ids=["mqtt5", "mqtt311"])


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _connect_line(broker: Broker, client_id: str) -> str:
    """mosquitto's "New client connected ... as ID (pN, cN, kN, u'USERNAME')." line for ``client_id``."""
    needle = f" as {client_id} ("
    text = broker.wait_for_log(needle)
    return next(line for line in text.splitlines() if needle in line)


def _sync(marker_from, subscriber, topic: str) -> None:
    """Publishes a marker that ``subscriber`` can read and waits for it.

    mosquitto handles packets in order on one thread and a subscriber's queue is FIFO: once the marker
    (sent after an earlier publish was acknowledged) has arrived, anything that earlier publish was going to
    deliver to ``subscriber`` has arrived too. This turns "nothing was delivered" into a wait on an event.
    """
    assert marker_from.publish(topic, b"marker", qos=1) == 0
    subscriber.wait_for_messages(1, topic=topic)


# -- plain --------------------------------------------------------------------------------------------------


def test_plain_round_trip_qos1(broker: Broker, mqtt_client) -> None:
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    sub = mqtt_client(broker)
    pub = mqtt_client(broker)
    assert sub.subscribe(f"{ROOT}/dev-a/#", qos=1)[0].value == 1

    assert pub.publish(f"{ROOT}/dev-a/tele", b"21.5", qos=1) == 0

    (msg,) = sub.wait_for_messages(1)
    assert (msg.topic, msg.payload, msg.qos) == (f"{ROOT}/dev-a/tele", b"21.5", 1)


@pytest.mark.parametrize("outage", ["stop", "kill"])
def test_restart_keeps_url_and_clients_reconnect(broker: Broker, mqtt_client, outage: str) -> None:
    url, old_pid = broker.url, broker.pid
    client = mqtt_client(broker)

    getattr(broker, outage)()
    assert not broker.running and _pid_gone(old_pid)
    assert client.wait_disconnected().is_failure  # the broker went away; the client did not ask to leave

    broker.start()
    assert broker.url == url and broker.pid != old_pid
    client.wait_connected(2)  # paho's own reconnect loop, to the same host and port
    # The broker restarted without persistence: the session is new, so subscribe again.
    client.subscribe(f"{ROOT}/dev-a/#")
    assert mqtt_client(broker).publish(f"{ROOT}/dev-a/after", b"back", qos=1) == 0
    assert client.wait_for_messages(1)[0].payload == b"back"


def test_stop_is_idempotent_and_leaves_no_process(tmp_path) -> None:
    with Broker(tmp_path) as b:
        pid = b.pid
        assert b.running
    assert not b.running and _pid_gone(pid)
    b.stop()  # already stopped: no error
    assert "mosquitto version" in b.log_text()


def test_missing_mosquitto_fails_with_the_remedy(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("tests.link.broker.shutil.which", lambda *args, **kwargs: None)
    with pytest.raises(BrokerNotFound, match="sudo apt-get install -y mosquitto"):
        Broker(tmp_path)


# -- TLS ----------------------------------------------------------------------------------------------------


@PROTOCOLS
def test_tls_with_a_good_client_certificate(tls_broker: Broker, mqtt_client, protocol: int) -> None:
    assert tls_broker.url == f"mqtts://127.0.0.1:{tls_broker.port}"
    client = mqtt_client(tls_broker, "dev-a", protocol=protocol)
    client.subscribe(f"{ROOT}/dev-a/#")

    assert client.publish(f"{ROOT}/dev-a/tele", b"x", qos=1) == 0

    assert client.wait_for_messages(1)[0].payload == b"x"
    assert _connect_line(tls_broker, client.client_id).endswith("u'dev-a').")  # the CN is the username


@pytest.mark.parametrize(
    "cert, broker_says",
    [
        ("none", "peer did not return a certificate"),
        ("untrusted", "certificate verify failed"),
    ],
)
@PROTOCOLS
def test_tls_refuses_missing_or_untrusted_certificate(
    tls_broker: Broker, pki, mqtt_client, cert: str, broker_says: str, protocol: int
) -> None:
    pair = None if cert == "none" else pki.untrusted_client("dev-a")
    client = mqtt_client(tls_broker, "dev-a", cert=pair, protocol=protocol, connect=False)

    with pytest.raises(ConnectFailed) as failed:
        client.connect()

    # TLS 1.3: the client's handshake completes and connect() returns; the broker then rejects the
    # certificate and the first read fails with an SSL alert or EOF. No CONNACK ever arrives.
    assert client.connacks == []
    if failed.value.error is not None:  # TLS 1.2 would fail inside connect() instead
        assert isinstance(failed.value.error, ssl.SSLError)
    else:
        assert failed.value.reason_code.is_failure
        assert any("failed to receive on socket" in line for line in failed.value.log), failed.value.log
    tls_broker.wait_for_log(broker_says)
    assert f" as {client.client_id} (" not in tls_broker.log_text()  # never became an MQTT client


def test_client_supplied_username_does_not_override_certificate(tls_broker: Broker, mqtt_client) -> None:
    client = mqtt_client(tls_broker, "dev-a", client_id="operator", connect=False)
    client.client.username_pw_set("operator")

    client.connect()

    assert _connect_line(tls_broker, "operator").endswith("u'dev-a').")


# -- ACL by certificate identity ------------------------------------------------------------------------------


@PROTOCOLS
def test_acl_device_uses_its_own_prefix(acl_broker: Broker, mqtt_client, protocol: int) -> None:
    dev_a = mqtt_client(acl_broker, "dev-a", protocol=protocol)
    assert dev_a.subscribe(f"{ROOT}/dev-a/#")[0].value == 1

    assert dev_a.publish(f"{ROOT}/dev-a/tele", b"ok", qos=1) == 0

    assert dev_a.wait_for_messages(1)[0].topic == f"{ROOT}/dev-a/tele"


@PROTOCOLS
def test_acl_subscription_to_another_device_delivers_nothing(acl_broker: Broker, mqtt_client, protocol) -> None:
    dev_a = mqtt_client(acl_broker, "dev-a", protocol=protocol)
    dev_b = mqtt_client(acl_broker, "dev-b", protocol=protocol)
    operator = mqtt_client(acl_broker, "operator", protocol=protocol)
    dev_a.subscribe(f"{ROOT}/dev-a/#")
    dev_b.subscribe(f"{ROOT}/dev-b/#")

    (granted,) = dev_a.subscribe(f"{ROOT}/dev-b/#", qos=1)
    # mosquitto 2.0.11 grants it (QoS 1, also under MQTT 5) and filters at delivery instead; a broker that
    # checks subscriptions answers 0x87 Not authorized. Either way, nothing may arrive through it.
    assert granted.value in (1, NOT_AUTHORIZED), granted

    assert dev_b.publish(f"{ROOT}/dev-b/tele", b"secret", qos=1) == 0
    dev_b.wait_for_messages(1, topic=f"{ROOT}/dev-b/tele")  # it really was published
    _sync(operator, dev_a, f"{ROOT}/dev-a/marker")

    assert dev_a.messages(f"{ROOT}/dev-b/#") == []


@PROTOCOLS
def test_acl_publish_into_another_device_is_dropped(acl_broker: Broker, mqtt_client, protocol: int) -> None:
    dev_a = mqtt_client(acl_broker, "dev-a", protocol=protocol)
    dev_b = mqtt_client(acl_broker, "dev-b", protocol=protocol)
    dev_b.subscribe(f"{ROOT}/dev-b/#")

    puback = dev_a.publish(f"{ROOT}/dev-b/cmd/reboot", b"evil", qos=1)

    # MQTT 5: PUBACK 0x87 Not authorized. MQTT 3.1.1 has no way to say so: a plain PUBACK, message dropped.
    assert puback.value == (NOT_AUTHORIZED if protocol == mqtt.MQTTv5 else 0), puback
    acl_broker.wait_for_log(f"Denied PUBLISH from {dev_a.client_id}")
    _sync(dev_b, dev_b, f"{ROOT}/dev-b/marker")
    assert dev_b.messages(f"{ROOT}/dev-b/cmd/#") == []


def test_acl_binds_to_certificate_not_client_id(acl_broker: Broker, mqtt_client) -> None:
    # dev-a's certificate, but claiming dev-b's client id: %u (the CN) still says dev-a.
    spoofer = mqtt_client(acl_broker, "dev-a", client_id="dev-b")
    dev_b = mqtt_client(acl_broker, "dev-b", client_id="dev-b-real")
    dev_b.subscribe(f"{ROOT}/dev-b/#")

    assert spoofer.publish(f"{ROOT}/dev-b/cmd/reboot", b"evil", qos=1).value == NOT_AUTHORIZED
    _sync(dev_b, dev_b, f"{ROOT}/dev-b/marker")
    assert dev_b.messages(f"{ROOT}/dev-b/cmd/#") == []


def test_acl_operator_commands_any_device_and_reads_replies(acl_broker: Broker, mqtt_client) -> None:
    operator = mqtt_client(acl_broker, "operator")
    devices = {d: mqtt_client(acl_broker, d) for d in ("dev-a", "dev-b")}
    assert operator.subscribe(f"{ROOT}/+/reply/#")[0].value == 1
    for device_id, device in devices.items():
        device.subscribe(f"{ROOT}/{device_id}/cmd/#")

    for device_id in devices:
        assert operator.publish(f"{ROOT}/{device_id}/cmd/status", b"?", qos=1) == 0
    for device_id, device in devices.items():
        (cmd,) = device.wait_for_messages(1, topic=f"{ROOT}/{device_id}/cmd/#")
        assert cmd.payload == b"?"
        assert device.publish(f"{ROOT}/{device_id}/reply/status", device_id.encode(), qos=1) == 0

    replies = operator.wait_for_messages(2)
    assert sorted((m.topic, m.payload) for m in replies) == [
        (f"{ROOT}/dev-a/reply/status", b"dev-a"),
        (f"{ROOT}/dev-b/reply/status", b"dev-b"),
    ]
