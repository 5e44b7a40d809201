"""``fieldnode send`` against a real mosquitto, with a responder written here that plays the agent's side of
the command contract (MQTT 5 Response Topic + Correlation Data; MQTT 3.1.1 ``<prefix>/reply`` + request_id)."""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
from typing import Callable, Dict, Iterator, List, Optional

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tools import send
from device.link.envelope import TrustStore, Verifier
from device.link.errors import BadInput, ConnectError, EnvelopeError
from tests.link.broker import Broker, free_port
from tests.link.conftest import run_broker

PREFIX = "fieldnode/v1/dev-a"
PROTOCOLS = pytest.mark.parametrize("protocol", ["5", "3.1.1"], ids=["mqtt5", "mqtt311"])
_PAHO = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}


class Responder:
    """The agent's side, reduced to the contract: takes ``<prefix>/cmd/<CMD>`` and replies.

    Commands: ``echo`` (ok, result = the request's args), ``fail`` (error reply), ``garbage`` (a reply that is not
    JSON). With a ``verifier`` every payload must be a signed envelope (refusals become error replies with the
    envelope error's code). ``decoy`` first sends a reply meant for someone else. Everything seen is recorded;
    the callback catches everything so paho's thread survives, and :attr:`errors` must stay empty.
    """

    def __init__(self, make_client: Callable, broker: Broker, protocol: str = "5", *, identity: Optional[str] = None,
                 verifier: Optional[Verifier] = None, decoy: bool = False) -> None:
        self.protocol = _PAHO[protocol]
        self.verifier = verifier
        self.decoy = decoy
        self.requests: List[dict] = []
        self.replies: List[dict] = []
        self.errors: List[str] = []
        self.test_client = make_client(broker, identity if broker.tls else None, protocol=self.protocol,
                                       connect=False)
        self.test_client.client.on_message = self._on_message
        self.test_client.connect()
        self.test_client.subscribe(f"{PREFIX}/cmd/#")

    def _on_message(self, client, userdata, message) -> None:
        try:
            self._handle(client, message)
        except Exception as exc:  # noqa: BLE001 - an exception would kill paho's thread
            self.errors.append(repr(exc))

    def _handle(self, client, message) -> None:
        cmd = message.topic[len(f"{PREFIX}/cmd/"):]
        payload = json.loads(message.payload)
        props = getattr(message, "properties", None)
        self.requests.append({"topic": message.topic, "payload": payload,
                              "response_topic": getattr(props, "ResponseTopic", None),
                              "correlation": getattr(props, "CorrelationData", None),
                              "expiry": getattr(props, "MessageExpiryInterval", None)})
        rid = payload["request_id"]
        args = payload["args"]
        reply: Dict[str, object] = {"ok": True, "cmd": cmd, "request_id": rid, "result": {"args": args}}
        if self.verifier is not None:
            try:
                verified = self.verifier.verify(payload, cmd)
                reply["result"] = {"args": verified.args, "key": verified.key_name}
            except EnvelopeError as exc:
                reply = {"ok": False, "cmd": cmd, "request_id": rid, "error": {"code": exc.code, "message": str(exc)}}
        elif cmd == "fail":
            reply = {"ok": False, "cmd": cmd, "request_id": rid,
                     "error": {"code": "sensor_fault", "message": "accelerometer does not answer"}}
        if self.decoy:
            self._reply(client, message, {**reply, "request_id": "someone-else", "result": "not yours"},
                        correlation=b"someone-else")
        body = b"\x00 not json" if cmd == "garbage" else json.dumps(reply).encode()
        self._reply(client, message, reply, body=body)

    def _reply(self, client, message, reply: dict, *, body: Optional[bytes] = None,
               correlation: Optional[bytes] = None) -> None:
        body = json.dumps(reply).encode() if body is None else body
        if self.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation or message.properties.CorrelationData
            info = client.publish(message.properties.ResponseTopic, body, qos=1, properties=props)
        else:
            info = client.publish(f"{PREFIX}/reply", body, qos=1)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        self.replies.append(reply)


def _run(capsys, *argv: str) -> tuple:
    """Runs ``fieldnode send`` in-process with the CLI's own parser setup; returns (exit code, stdout, stderr)."""
    parser = argparse.ArgumentParser(prog="fieldnode send")
    send.add_arguments(parser)
    code = send.run(parser.parse_args(list(argv)))
    out, err = capsys.readouterr()
    return code, out, err


def _tls_args(pki, identity: Optional[str] = "operator") -> List[str]:
    args = ["--ca", str(pki.ca)]
    if identity is not None:
        cert, key = pki.client(identity)
        args += ["--cert", str(cert), "--key", str(key)]
    return args


def _closed_url() -> str:
    return f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there: connecting would be refused (exit 4)


# -- replies ---------------------------------------------------------------------------------------------------


@PROTOCOLS
def test_ok_reply(broker: Broker, mqtt_client, capsys, protocol: str) -> None:
    responder = Responder(mqtt_client, broker, protocol)

    code, out, err = _run(capsys, "--broker", broker.url, "--device", "dev-a", "echo", "--args",
                          '{"variant": "lite", "n": 3}', "--mqtt", protocol, "--request-id", "r-17")

    assert (code, err) == (0, "")
    assert out.startswith("ok: {\n")
    assert json.loads(out[len("ok: "):]) == {"args": {"variant": "lite", "n": 3}}
    (request,) = responder.requests
    assert request["topic"] == f"{PREFIX}/cmd/echo"
    assert request["payload"] == {"request_id": "r-17", "args": {"variant": "lite", "n": 3}}
    if protocol == "5":
        assert request["response_topic"].startswith(f"{PREFIX}/reply/fn-send-")
        assert request["correlation"] == b"r-17"
        assert request["expiry"] == 10  # the command expires with the sender's patience
    else:
        assert request["response_topic"] is None and request["correlation"] is None
    assert responder.errors == []


def test_default_request_id_is_random(broker: Broker, mqtt_client, capsys) -> None:
    responder = Responder(mqtt_client, broker)

    for _ in range(2):
        assert _run(capsys, "--broker", broker.url, "--device", "dev-a", "echo")[0] == 0

    rids = [r["payload"]["request_id"] for r in responder.requests]
    assert len(set(rids)) == 2
    assert all(rid.startswith("send-") and len(rid) == len("send-") + 12 for rid in rids)
    assert [r["correlation"] for r in responder.requests] == [rid.encode() for rid in rids]


@PROTOCOLS
def test_error_reply_exits_1(broker: Broker, mqtt_client, capsys, protocol: str) -> None:
    Responder(mqtt_client, broker, protocol)

    code, out, err = _run(capsys, "--broker", broker.url, "--device", "dev-a", "fail", "--mqtt", protocol)

    assert (code, out, err) == (1, "error sensor_fault: accelerometer does not answer\n", "")


@pytest.mark.parametrize("cmd, exit_code", [("echo", 0), ("fail", 1)])
def test_json_output_is_exactly_the_reply(broker: Broker, mqtt_client, capsys, cmd: str, exit_code: int) -> None:
    responder = Responder(mqtt_client, broker)

    code, out, err = _run(capsys, "--broker", broker.url, "--device", "dev-a", cmd, "--args", '{"a": [1, 2]}',
                          "--json")

    assert (code, err) == (exit_code, "")
    assert out.endswith("\n") and out.count("\n") == 1
    assert json.loads(out) == responder.replies[-1]


@PROTOCOLS
def test_replies_for_someone_else_are_ignored(broker: Broker, mqtt_client, capsys, protocol: str) -> None:
    # The decoy is published first by the same client at QoS 1, so it reaches the sender first.
    responder = Responder(mqtt_client, broker, protocol, decoy=True)

    code, out, err = _run(capsys, "--broker", broker.url, "--device", "dev-a", "echo", "--args", '{"x": 1}',
                          "--mqtt", protocol, "--json")

    assert (code, err) == (0, "")
    assert responder.replies[0]["result"] == "not yours"  # the decoy really was sent
    assert json.loads(out) == responder.replies[1]
    assert json.loads(out)["result"] == {"args": {"x": 1}}


def test_malformed_reply_exits_1(broker: Broker, mqtt_client, capsys) -> None:
    Responder(mqtt_client, broker)

    code, out, err = _run(capsys, "--broker", broker.url, "--device", "dev-a", "garbage")

    assert (code, out) == (1, "")
    assert f"malformed reply on {PREFIX}/reply/fn-send-" in err
    assert "not JSON" in err and "\\x00 not json" in err  # the control character is shown escaped


@PROTOCOLS
def test_no_reply_times_out_naming_the_topic(broker: Broker, capsys, protocol: str) -> None:
    code, out, err = _run(capsys, "--broker", broker.url, "--device", "dev-a", "status", "--timeout", "1",
                          "--mqtt", protocol)

    assert (code, out) == (3, "")
    topic = f"{PREFIX}/reply/fn-send-" if protocol == "5" else f"{PREFIX}/reply "
    assert f"no reply within 1 s on {topic}" in err
    assert f"{PREFIX}/cmd/status" in err


# -- signed commands ---------------------------------------------------------------------------------------------


def _key_pair(directory, name: str):
    """Writes ``NAME.key`` (private, 0600) and ``trust/NAME.pub``; returns the private key path."""
    private = ed25519.Ed25519PrivateKey.generate()
    key_path = directory / f"{name}.key"
    key_path.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    key_path.chmod(0o600)
    trust = directory / "trust"
    trust.mkdir(exist_ok=True)
    (trust / f"{name}.pub").write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path


def test_signed_envelope_verifies(broker: Broker, mqtt_client, capsys, tmp_path) -> None:
    key = _key_pair(tmp_path, "alice")
    verifier = Verifier(TrustStore(str(tmp_path / "trust")), device_id="dev-a")
    responder = Responder(mqtt_client, broker, verifier=verifier)

    code, out, err = _run(capsys, "--broker", broker.url, "--device", "dev-a", "variant", "--args",
                          '{"variant": "lite"}', "--sign", str(key), "--ttl", "30", "--json")

    assert (code, err) == (0, "")
    assert json.loads(out)["result"] == {"args": {"variant": "lite"}, "key": "alice"}
    assert verifier.counters["accepted"] == 1
    payload = responder.requests[0]["payload"]
    assert set(payload) == {"args", "cmd", "device", "expires", "key", "nonce", "sig", "request_id"}
    assert (payload["device"], payload["cmd"]) == ("dev-a", "variant")
    assert payload["request_id"].startswith("send-")


def test_signed_with_an_untrusted_key_is_refused_by_the_board(broker: Broker, mqtt_client, capsys, tmp_path) -> None:
    _key_pair(tmp_path, "alice")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mallory = _key_pair(elsewhere, "mallory")  # its .pub lands in elsewhere/trust, which the board never reads
    verifier = Verifier(TrustStore(str(tmp_path / "trust")), device_id="dev-a")
    Responder(mqtt_client, broker, verifier=verifier)

    code, out, err = _run(capsys, "--broker", broker.url, "--device", "dev-a", "reboot", "--sign", str(mallory))

    assert (code, err) == (1, "")
    assert out.startswith("error unknown_key: key ")
    assert verifier.counters["refused_unknown_key"] == 1


# -- bad input: exit 2 before any connection (a closed port would otherwise give exit 4) ---------------------


@pytest.mark.parametrize(
    "extra, problem",
    [
        (["--args", "{not json"], "--args: not valid JSON"),
        (["--args", "[1, 2]"], "--args: expected a JSON object"),
        (["--args", '"text"'], "--args: expected a JSON object"),
        (["--args", '{"x": NaN}'], "--args: not valid JSON"),
        (["--device", "dev/a"], "device id 'dev/a': must not contain '/'"),
        (["--device", "dev-+"], "device id 'dev-+': must not contain '+'"),
        (["--device", "#"], "device id '#': must not contain '#'"),
        (["--device", ""], "device id '': expected a non-empty name"),
        (["--prefix", "fieldnode/v1/#"], "--prefix 'fieldnode/v1/#': must not contain '#'"),
        (["--prefix", "fieldnode//dev-a"], "--prefix 'fieldnode//dev-a': has an empty level"),
        (["--prefix", "$SYS/dev-a"], "reserved for the broker"),
        (["--prefix", "/fieldnode/dev-a"], "has an empty level"),
        (["--request-id", "has space"], "--request-id 'has space'"),
        (["--request-id", "a/b"], "--request-id 'a/b': expected 1-64 characters"),
        (["--sign", "/nonexistent/alice.key"], "key file /nonexistent/alice.key: cannot read it"),
        (["--ca", "ca.pem"], "TLS files given for a plain mqtt:// URL"),
        (["--password-file", "pw"], "--password-file needs --username"),
        (["--username", "ops", "--password-file", "/nonexistent/pw"], "--password-file /nonexistent/pw: cannot read"),
    ],
)
def test_bad_input_exits_2(capsys, extra: List[str], problem: str) -> None:
    device = [] if "--device" in extra else ["--device", "dev-a"]
    argv = ["--broker", _closed_url(), *device, "status", *extra]

    code, out, err = _run(capsys, *argv)

    assert (code, out) == (2, "")
    assert err.startswith("fieldnode send: ") and problem in err, err


def test_bad_command_name_exits_2(capsys) -> None:
    code, _, err = _run(capsys, "--broker", _closed_url(), "--device", "dev-a", "cmd/sub")

    assert code == 2 and "command 'cmd/sub': must not contain '/'" in err


@pytest.mark.parametrize("url", ["tcp://127.0.0.1:1883", "mqtt://127.0.0.1:1883/x", "mqtt://ops:pw@127.0.0.1",
                                 "mqtt://127.0.0.1:99999", "mqtt://"])
def test_bad_url_exits_2(capsys, url: str) -> None:
    code, out, err = _run(capsys, "--broker", url, "--device", "dev-a", "status")

    assert (code, out) == (2, "")
    assert "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]" in err
    assert ":pw@" not in err


def test_mqtts_without_a_ca_exits_2(capsys) -> None:
    code, _, err = _run(capsys, "--broker", "mqtts://127.0.0.1:1", "--device", "dev-a", "status")

    assert code == 2 and "no CA file is given" in err


# -- connection failures: exit 4 ------------------------------------------------------------------------------


def test_unreachable_broker_exits_4(capsys) -> None:
    url = _closed_url()

    code, out, err = _run(capsys, "--broker", url, "--device", "dev-a", "status", "--timeout", "5")

    assert (code, out) == (4, "")
    assert err == f"fieldnode send: error [{ConnectError.code}]: could not connect to {url}: Connection refused\n"


def test_a_listener_that_never_answers_exits_4(capsys) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)  # the kernel completes the TCP handshake; nobody ever speaks MQTT
        url = f"mqtt://127.0.0.1:{server.getsockname()[1]}"

        code, out, err = _run(capsys, "--broker", url, "--device", "dev-a", "status", "--timeout", "1")

    assert (code, out) == (4, "")
    assert err == f"fieldnode send: error [{ConnectError.code}]: could not connect to {url}: no CONNACK within 1 s\n"


@pytest.mark.parametrize("mode", ["tls", "acl"])
def test_tls_with_the_operator_certificate(request, pki, mqtt_client, capsys, mode: str) -> None:
    broker: Broker = request.getfixturevalue(f"{mode}_broker")  # acl: dev-a may only use its own prefix
    responder = Responder(mqtt_client, broker, identity="dev-a")

    code, out, err = _run(capsys, "--broker", broker.url, "--device", "dev-a", "echo", *_tls_args(pki))

    assert (code, err) == (0, "")
    assert json.loads(out[len("ok: "):]) == {"args": {}}
    assert responder.errors == [] and len(responder.requests) == 1
    connected = [line for line in broker.log_text().splitlines() if " as fn-send-" in line]
    assert len(connected) == 1 and connected[0].endswith("u'operator').")  # the certificate is the identity


@PROTOCOLS
def test_tls_without_a_client_certificate_exits_4(tls_broker: Broker, pki, capsys, protocol: str) -> None:
    code, out, err = _run(capsys, "--broker", tls_broker.url, "--device", "dev-a", "status", "--mqtt", protocol,
                          *_tls_args(pki, identity=None))

    assert (code, out) == (4, "")
    assert err.startswith(f"fieldnode send: error [{ConnectError.code}]: could not connect to {tls_broker.url}: ")
    # TLS 1.3: the handshake completes, then mosquitto drops us; TLS 1.2 would fail inside connect().
    assert "disconnected before CONNACK" in err or "SSL" in err, err
    tls_broker.wait_for_log("peer did not return a certificate")


def test_tls_with_a_mismatched_key_exits_2(tls_broker: Broker, pki, capsys) -> None:
    cert, _ = pki.client("operator")
    _, other_key = pki.client("dev-b")

    code, _, err = _run(capsys, "--broker", tls_broker.url, "--device", "dev-a", "status", "--ca", str(pki.ca),
                        "--cert", str(cert), "--key", str(other_key))

    assert code == 2 and f"client key {other_key} does not match client certificate {cert}" in err


def test_acl_refuses_another_devices_identity_exit_4(acl_broker: Broker, pki, capsys) -> None:
    # dev-b's certificate may not publish into dev-a's prefix: MQTT 5 hears PUBACK 0x87 and stops at once.
    code, out, err = _run(capsys, "--broker", acl_broker.url, "--device", "dev-a", "reboot", "--timeout", "30",
                          *_tls_args(pki, identity="dev-b"))

    assert (code, out) == (4, "")
    assert f"the broker refused the publish to {PREFIX}/cmd/reboot (Not authorized)" in err
    acl_broker.wait_for_log("Denied PUBLISH")


# -- username and password --------------------------------------------------------------------------------------


@pytest.fixture
def password_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A plain mosquitto with a password file: user ``ops``, password ``s3cret``."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.fail("mosquitto_passwd not found; install mosquitto (it ships the tool)", pytrace=False)
    workdir = tmp_path_factory.mktemp("broker-passwd")
    passwd = workdir / "passwd"
    subprocess.run([tool, "-c", "-b", str(passwd), "ops", "s3cret"], check=True, capture_output=True)
    passwd.chmod(0o600)
    yield from run_broker(tmp_path_factory, "plain", None, workdir=workdir,
                          extra_config=[f"password_file {passwd}"])


@PROTOCOLS
def test_username_and_password_file(password_broker: Broker, mqtt_client, capsys, tmp_path, protocol: str) -> None:
    Responder(mqtt_client, password_broker, protocol)
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("s3cret\n")  # the editor's newline is not part of the password
    bad.write_text("guess")
    common = ["--broker", password_broker.url, "--device", "dev-a", "echo", "--mqtt", protocol,
              "--username", "ops"]

    ok_code, ok_out, ok_err = _run(capsys, *common, "--password-file", str(good))
    bad_code, bad_out, bad_err = _run(capsys, *common, "--password-file", str(bad))

    assert (ok_code, ok_out) == (0, 'ok: {\n  "args": {}\n}\n')
    assert "warning: the password goes unencrypted" in ok_err
    assert (bad_code, bad_out) == (4, "")
    assert "the broker refused the connection (" in bad_err


# -- --json: a failure of the sender is a JSON object too ---------------------------------------------------------


@pytest.mark.parametrize("case, exit_code, code", [
    ("timeout", 3, "no_reply"),
    ("unreachable", 4, "connect_failed"),
    ("bad_input", 2, "bad_input"),
])
def test_json_failures_print_an_error_object(broker: Broker, capsys, case: str, exit_code: int, code: str) -> None:
    url = _closed_url() if case == "unreachable" else broker.url
    extra = ["--args", "[1]"] if case == "bad_input" else []
    code_, out, err = _run(capsys, "--broker", url, "--device", "dev-a", "status", "--timeout", "1", "--json",
                           "--request-id", "r-9", *extra)

    assert code_ == exit_code
    assert out.endswith("\n") and out.count("\n") == 1
    doc = json.loads(out)
    assert doc == {"ok": False, "cmd": "status", "request_id": "r-9",
                   "error": {"code": code, "message": doc["error"]["message"]}}
    # the same words for people, on stderr, the way every command says an error
    assert err == f"fieldnode send: error [{doc['error']['code']}]: {doc['error']['message']}\n"


# -- --timeout covers the whole command --------------------------------------------------------------------------


class LateClock:
    """The real monotonic clock, except that every reading after the first is ``late`` seconds ahead: as if the
    command had spent that long (a slow disk, a key file, a loaded machine) before it started connecting."""

    def __init__(self, late: float) -> None:
        self.late, self.readings = late, 0

    def monotonic(self) -> float:
        import time

        self.readings += 1
        return time.monotonic() + (self.late if self.readings > 1 else 0.0)


def test_the_timeout_counts_from_the_start_of_the_command(broker: Broker, mqtt_client, capsys) -> None:
    """What is left of ``--timeout`` when the request goes out is what it may wait: the MQTT 5 Message Expiry
    Interval the broker forwards shows it (10 s given, 8.8 s already spent: at most 2 s left)."""
    watcher = mqtt_client(broker)
    watcher.subscribe(f"{PREFIX}/cmd/#")
    parser = argparse.ArgumentParser(prog="fieldnode send")
    send.add_arguments(parser)
    args = parser.parse_args(["--broker", broker.url, "--device", "dev-a", "status", "--timeout", "10"])

    code = send.run(args, clock=LateClock(8.8))

    out, err = capsys.readouterr()
    assert (code, out) == (3, "") and "no reply within 10 s" in err
    (request,) = watcher.wait_for_messages(1)
    assert 1 <= request.properties.MessageExpiryInterval <= 2


# -- on the board: no --broker, the board's config --------------------------------------------------------------


def _board_send(capsys, conf, *argv: str) -> tuple:
    """``fieldnode send --config CONF ...`` through the real command line entry; (exit code, stdout, stderr)."""
    from tools import cli

    code = cli.main(["send", "--config", str(conf), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _sign_csr(pki, csr_pem: bytes) -> bytes:
    """The fleet CA's part of provisioning: a client certificate for the board's request (its CN, its key)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    ca_key = pki.authority._key  # the test CA's key: this test plays the fleet CA
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(pki.authority.certificate.subject)
            .public_key(csr.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def board_link(tmp_path):
    """``board_link(cfg)``: the board's real link built from its config (as the agent wires it), with ``ping`` and a
    ``status`` command; stopped at teardown."""
    from device import config
    from device.link.client import Link
    from device.link.commands import Dispatcher, Registry, register_builtin
    from device.link.spool.spool import Spool

    made = []

    def make(cfg):
        registry = Registry()
        register_builtin(registry, version="test")
        registry.register("status", lambda args, ctx: {"state": "serving", "device": config.device_id(cfg)})
        spool = Spool(str(tmp_path / f"spool-{len(made)}.db"), commit_interval_s=0.02)
        spool.start()
        lc = cfg.link
        link = Link(lc.broker, config.device_id(cfg), spool, prefix=lc.prefix, protocol=lc.protocol, tls=lc.tls(),
                    backoff=(0.05, 0.5), dispatcher=Dispatcher(registry))
        made.append((link, spool))
        link.start()
        assert link.wait_connected(20)
        return link

    yield make
    for link, spool in made:
        link.stop()
        spool.close()


def test_a_provisioned_board_sends_status_with_only_its_config(acl_broker: Broker, pki, board_link, capsys, tmp_path):
    """The first-boot flow end to end: provision, the fleet CA signs the request, the certificate is installed at
    link.cert_file; then ``fieldnode send status`` on the board, with no flag but --config, reaches the board's own
    link through mutual TLS and the ACL, as the board's identity."""
    from device import config
    from tools import provision

    conf = tmp_path / "etc" / "fieldnode.toml"
    conf.parent.mkdir()
    conf.write_text(f'# pole 17\n[link]\nbroker = "{acl_broker.url}"\nca_file = "{pki.ca}"\n')
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    provision.add_arguments(parser)
    assert provision.run(parser.parse_args(["--config", str(conf), "--device-id", "pole-17", "--json"])) == 0
    done = json.loads(capsys.readouterr().out)
    with open(done["files"]["csr"], "rb") as fh:
        cert = _sign_csr(pki, fh.read())
    with open(done["files"]["certificate"], "wb") as fh:
        fh.write(cert)
    cfg = config.load(str(conf))
    assert [key for key, _ in config.agent_problems(cfg)] == ["drivers.sensor_url"]  # the link's files are all there
    board_link(cfg)

    code, out, err = _board_send(capsys, conf, "status")

    assert (code, err) == (0, "")
    assert out.splitlines()[0].startswith("device    pole-17 ")  # status is printed for people (tools.status.block)
    connected = [line for line in acl_broker.log_text().splitlines() if " as fn-send-" in line]
    assert len(connected) == 1 and connected[0].endswith("u'pole-17').")  # the provisioned certificate


@PROTOCOLS
def test_the_config_gives_what_no_flag_does(broker: Broker, mqtt_client, capsys, tmp_path, protocol: str) -> None:
    conf = tmp_path / "fieldnode.toml"
    conf.write_text(f'[device]\nid = "dev-a"\n[link]\nbroker = "{broker.url}"\nprotocol = "{protocol}"\n')
    responder = Responder(mqtt_client, broker, protocol)

    code, out, err = _board_send(capsys, conf, "echo", "--args", '{"n": 1}', "--json")

    assert (code, err) == (0, "")
    assert json.loads(out)["result"] == {"args": {"n": 1}}
    (request,) = responder.requests
    assert request["topic"] == f"{PREFIX}/cmd/echo"  # the device id and prefix of the config
    assert (request["response_topic"] is not None) == (protocol == "5")  # link.protocol


def test_flags_win_over_the_config(broker: Broker, mqtt_client, capsys, tmp_path) -> None:
    conf = tmp_path / "fieldnode.toml"
    conf.write_text(f'[device]\nid = "dev-b"\n[link]\nbroker = "{broker.url}"\nprotocol = "3.1.1"\n'
                    f'prefix = "elsewhere/dev-b"\n')
    responder = Responder(mqtt_client, broker, "5")

    code, out, err = _board_send(capsys, conf, "echo", "--device", "dev-a", "--prefix", PREFIX, "--mqtt", "5")

    assert (code, err) == (0, ""), err
    (request,) = responder.requests
    assert request["topic"] == f"{PREFIX}/cmd/echo" and request["response_topic"].startswith(f"{PREFIX}/reply/")


def test_with_broker_no_config_is_read(broker: Broker, mqtt_client, capsys, tmp_path) -> None:
    Responder(mqtt_client, broker)

    code, _, err = _board_send(capsys, tmp_path / "absent.toml", "--broker", broker.url, "--device", "dev-a", "echo")

    assert (code, err) == (0, "")  # an operator's laptop has no board config, and needs none


@pytest.mark.parametrize("text, problem", [
    ('[device]\nid = "dev-a"\n', "no --broker given, and link.broker is not set in {conf}: give --broker URL"),
    ('[link]\nbroker = "mqtts://127.0.0.1:1"\nca_file = "{tmp}/ca.pem"\n', "link.ca_file: CA file {tmp}/ca.pem: "
                                                                         "cannot read it (No such file or directory)"),
    ('[link]\nbroker = "mqtt://127.0.0.1:1"\nusername = "ops"\npassword_file = "{tmp}/pw"\n',
     "link.password_file {tmp}/pw: cannot read it"),
    ('[link]\nbroker = "mqtt://127.0.0.1:1"\nprefix = "a/#"\n', "{conf}: link.prefix: "),
])
def test_a_config_without_what_send_needs_exits_2(capsys, tmp_path, text: str, problem: str) -> None:
    conf = tmp_path / "fieldnode.toml"
    conf.write_text(text.format(tmp=tmp_path))

    code, out, err = _board_send(capsys, conf, "status", "--json")

    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert problem.format(conf=conf, tmp=tmp_path) in err, err
    doc = json.loads(out)
    assert doc["ok"] is False and doc["error"]["code"] in ("bad_input", "config_invalid")


def test_no_config_file_at_all_names_the_default_path(capsys, tmp_path, monkeypatch) -> None:
    from device import config

    monkeypatch.delenv("FIELDNODE_CONFIG", raising=False)
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "fieldnode.toml"))  # this machine's /etc stays out
    parser = argparse.ArgumentParser(prog="fieldnode send")
    send.add_arguments(parser)

    code = send.run(parser.parse_args(["status"]))

    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err == (f"fieldnode send: error [{BadInput.code}]: no --broker given, and there is no config file at "
                   f"{tmp_path}/fieldnode.toml: "
                   f"give --broker URL (and --device ID), or set link.broker in the board's config\n")


def test_broker_without_device_exits_2(capsys) -> None:
    code, out, err = _run(capsys, "--broker", _closed_url(), "status")

    assert (code, out) == (2, "") and "--device ID is needed with --broker" in err


# -- status for people ---------------------------------------------------------------------------------------------


STATUS = {"device": "dev-a", "version": "0.1.0", "pid": 4242, "simulated": False, "serving": True, "results": 1200,
          "failures": 0, "runtime": {"model": "vibration", "variant": "full", "backend": "litert", "delegate": "xnnpack",
                                     "threads": 2, "latency": {"p50_ms": 0.41}},
          "governor": {"level": "balanced", "reason": "battery 50%"}, "sensor": {"state": "ok", "frames": 960},
          "link": {"broker": "mqtts://broker.example:8883", "connected": True, "inflight": 3},
          "spool": {"messages": 2, "bytes": 900}, "faults": {"sensor": {"problem": "crc \x1b[31merrors", "for_s": 5}}}


def _status_responder(mqtt_client, broker: Broker, reply: dict):
    """Answers ``status`` with ``reply`` (the board's side of the contract, MQTT 5)."""
    responder = mqtt_client(broker, connect=False)

    def on_message(client, userdata, message) -> None:
        rid = json.loads(message.payload)["request_id"]
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = message.properties.CorrelationData
        client.publish(message.properties.ResponseTopic, json.dumps({**reply, "cmd": "status", "request_id": rid}),
                       qos=1, properties=props)

    responder.client.on_message = on_message
    responder.connect()
    responder.subscribe(f"{PREFIX}/cmd/status")
    return responder


def test_status_is_printed_for_people(broker: Broker, mqtt_client, capsys) -> None:
    from tools.status import block

    _status_responder(mqtt_client, broker, {"ok": True, "result": STATUS})

    code, out, err = _run(capsys, "--broker", broker.url, "--device", "dev-a", "status")
    json_code, json_out, _ = _run(capsys, "--broker", broker.url, "--device", "dev-a", "status", "--json")

    assert (code, err) == (0, "")
    expected = [send.printable(line) for line in block(STATUS, 4242)]
    assert out.splitlines() == expected and not out.startswith("ok: ")
    assert out.splitlines()[0].startswith("device    dev-a (fieldnode 0.1.0, agent pid 4242): real board")
    assert "\x1b" not in out and "\\x1b[31m" in out  # a board's text never drives the terminal
    assert json_code == 0 and json.loads(json_out)["result"] == STATUS  # --json: the raw reply


def test_an_error_reply_to_status_is_printed_as_an_error(broker: Broker, mqtt_client, capsys) -> None:
    _status_responder(mqtt_client, broker, {"ok": False, "error": {"code": "sensor_fault", "message": "boom"}})

    code, out, err = _run(capsys, "--broker", broker.url, "--device", "dev-a", "status")

    assert (code, out, err) == (1, "error sensor_fault: boom\n", "")
