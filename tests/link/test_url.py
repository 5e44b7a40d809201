"""Broker URLs and TLS files: parsing, canonical form, checks before connecting, paho's tls_set wrapped."""

from __future__ import annotations

import os
import ssl

import paho.mqtt.client as mqtt
import pytest

from device.link.errors import BrokerUrlError
from device.link.url import BrokerUrl, TlsFiles, apply_tls, check_tls, parse_broker_url, tls_problem


@pytest.mark.parametrize(
    "text, scheme, host, port, canonical",
    [
        ("mqtt://localhost", "mqtt", "localhost", 1883, "mqtt://localhost:1883"),
        ("mqtts://broker.example.com", "mqtts", "broker.example.com", 8883, "mqtts://broker.example.com:8883"),
        ("mqtt://127.0.0.1:1884", "mqtt", "127.0.0.1", 1884, "mqtt://127.0.0.1:1884"),
        ("MQTTS://Broker.Example.COM:65535", "mqtts", "broker.example.com", 65535,
         "mqtts://broker.example.com:65535"),
        ("mqtt://[::1]", "mqtt", "::1", 1883, "mqtt://[::1]:1883"),
        ("mqtts://[2001:DB8:0:0::1]:8884", "mqtts", "2001:db8::1", 8884, "mqtts://[2001:db8::1]:8884"),
        ("mqtt://[fe80::1%25eth0]:1", "mqtt", "fe80::1%eth0", 1, "mqtt://[fe80::1%25eth0]:1"),
        ("mqtt://gateway_01.site-3.lan:01883", "mqtt", "gateway_01.site-3.lan", 1883,
         "mqtt://gateway_01.site-3.lan:1883"),
    ],
)
def test_parse_valid_urls(text: str, scheme: str, host: str, port: int, canonical: str) -> None:
    url = parse_broker_url(text)

    assert (url.scheme, url.host, url.port) == (scheme, host, port)
    assert url.tls is (scheme == "mqtts")
    assert str(url) == canonical
    assert parse_broker_url(str(url)) == url  # the canonical form parses back to the same value


@pytest.mark.parametrize(
    "text, problem",
    [
        ("localhost:1883", "no scheme"),
        ("tcp://localhost:1883", "unsupported scheme 'tcp'"),
        ("ws://localhost", "unsupported scheme 'ws'"),
        ("mqtt://host/fieldnode", "a path ('/fieldnode')"),
        ("mqtt://host:1883/", "a path ('/')"),
        ("mqtt://host?clean=1", "a query ('?clean=1')"),
        ("mqtt://host#x", "a fragment ('#x')"),
        ("mqtt://", "empty host"),
        ("mqtt://:1883", "empty host"),
        ("mqtt://host:", "empty port"),
        ("mqtt://host:http", "port 'http' is not a number"),
        ("mqtt://host:-1", "port '-1' is not a number"),
        ("mqtt://host:0", "port 0 is out of range 1-65535"),
        ("mqtt://host:65536", "port 65536 is out of range 1-65535"),
        ("mqtt://host:123456", "is not a number"),
        ("mqtt://::1", "must be written in brackets"),
        ("mqtt://[::1", "without a closing ']'"),
        ("mqtt://[::1]1883", "unexpected '1883' after the IPv6 address"),
        ("mqtt://[nope]", "'nope' is not an IPv6 address"),
        ("mqtt://300.1.1.1", "'300.1.1.1' is not an IPv4 address"),
        ("mqtt://a..b", "not a valid host name"),
        ("mqtt://-gw", "not a valid host name"),
        ("mqtt://gw .lan", "whitespace or control characters"),
        (" mqtt://gw", "whitespace or control characters"),
    ],
)
def test_parse_rejects_with_the_problem_and_the_expected_form(text: str, problem: str) -> None:
    with pytest.raises(BrokerUrlError) as err:
        parse_broker_url(text)

    assert problem in str(err.value)
    assert "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]" in str(err.value)
    assert err.value.code == "broker_url_invalid"


@pytest.mark.parametrize("text", ["mqtt://ops:hunter2@broker:1883", "mqtts://ops:pa/ss@broker", "mqtt://hunter2@b"])
def test_credentials_in_the_url_are_refused_without_echoing_them(text: str) -> None:
    with pytest.raises(BrokerUrlError) as err:
        parse_broker_url(text)

    message = str(err.value)
    assert "credentials" in message
    assert "hunter2" not in message and "pa/ss" not in message and "ops" not in message
    assert "***@" in message


def test_parse_rejects_a_non_string() -> None:
    with pytest.raises(BrokerUrlError, match="expected a string, got NoneType"):
        parse_broker_url(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields, problem",
    [
        (("http", "h", 1), "scheme 'http'"),
        (("mqtt", "", 1), "host ''"),
        (("mqtt", "h", 0), "port 0"),
        (("mqtt", "h", True), "port True"),
    ],
)
def test_broker_url_validates_when_built_directly(fields: tuple, problem: str) -> None:
    with pytest.raises(BrokerUrlError, match=problem):
        BrokerUrl(*fields)


# -- TLS files ---------------------------------------------------------------------------------------------------


def test_check_tls_accepts_ca_only_and_ca_with_a_client_pair(pki) -> None:
    cert, key = pki.client("operator")
    url = "mqtts://127.0.0.1:8883"

    assert check_tls(url, TlsFiles(ca=str(pki.ca))) is None
    assert check_tls(parse_broker_url(url), TlsFiles(str(pki.ca), str(cert), str(key))) is None
    assert check_tls("mqtt://127.0.0.1", TlsFiles()) is None


def test_tls_files_accept_paths_and_none(pki) -> None:
    cert, key = pki.client("operator")

    files = TlsFiles(pki.ca, cert, key)  # pathlib paths, as the test PKI hands them out

    assert (files.ca, files.cert, files.key) == (str(pki.ca), str(cert), str(key))
    assert TlsFiles(None, None, None) == TlsFiles()  # type: ignore[arg-type]
    assert not TlsFiles().given() and files.given()
    assert check_tls("mqtts://broker", files) is None


def test_check_tls_mqtts_needs_a_ca() -> None:
    with pytest.raises(BrokerUrlError, match="uses TLS but no CA file is given"):
        check_tls("mqtts://broker", TlsFiles())


@pytest.mark.parametrize("which", ["cert", "key"])
def test_check_tls_needs_cert_and_key_together(pki, which: str) -> None:
    cert, key = pki.client("operator")
    tls = TlsFiles(ca=str(pki.ca), **{which: str(cert if which == "cert" else key)})

    with pytest.raises(BrokerUrlError) as err:
        check_tls("mqtts://broker", tls)

    missing = "key" if which == "cert" else "certificate"
    assert f"given without its {missing}" in str(err.value)


@pytest.mark.parametrize("role, label", [("ca", "CA file"), ("cert", "client certificate"), ("key", "client key")])
def test_check_tls_names_a_missing_file(pki, tmp_path, role: str, label: str) -> None:
    cert, key = pki.client("operator")
    files = {"ca": str(pki.ca), "cert": str(cert), "key": str(key)}
    files[role] = str(tmp_path / "missing.pem")

    with pytest.raises(BrokerUrlError) as err:
        check_tls("mqtts://broker", TlsFiles(**files))

    assert f"{label} {files[role]}: cannot read it" in str(err.value)


def test_check_tls_refuses_a_directory_and_a_fifo_without_hanging(tmp_path) -> None:
    fifo = tmp_path / "ca.pem"
    os.mkfifo(fifo)  # nobody writes to it: a blocking open would hang here

    with pytest.raises(BrokerUrlError) as not_regular:
        check_tls("mqtts://broker", TlsFiles(ca=str(fifo)))
    with pytest.raises(BrokerUrlError) as directory:
        check_tls("mqtts://broker", TlsFiles(ca=str(tmp_path)))

    assert str(not_regular.value) == f"CA file {fifo}: not a regular file"
    assert str(directory.value).startswith(f"CA file {tmp_path}: cannot read it")


def test_check_tls_refuses_tls_files_for_plain_mqtt(pki) -> None:
    with pytest.raises(BrokerUrlError) as err:
        check_tls("mqtt://broker:1883", TlsFiles(ca=str(pki.ca)))

    assert "TLS files given for a plain mqtt:// URL" in str(err.value)
    assert str(pki.ca) in str(err.value)


def test_tls_problem_names_the_file_at_fault_without_anyones_flags(pki, tmp_path) -> None:
    # The config loader reports each role under its key (link.ca_file...), fieldnode send under its flags: the
    # message itself names neither.
    cert, key = pki.client("operator")
    missing = str(tmp_path / "missing.pem")
    cases = [
        ("mqtts://broker", TlsFiles(), "ca"),
        ("mqtts://broker", TlsFiles(ca=missing), "ca"),
        ("mqtts://broker", TlsFiles(ca=pki.ca, cert=cert), "key"),
        ("mqtts://broker", TlsFiles(ca=pki.ca, key=key), "cert"),
        ("mqtts://broker", TlsFiles(ca=pki.ca, cert=missing, key=key), "cert"),
        ("mqtts://broker", TlsFiles(ca=pki.ca, cert=cert, key=missing), "key"),
        ("mqtt://broker", TlsFiles(ca=pki.ca), "url"),
    ]
    for url, files, role in cases:
        found = tls_problem(url, files)
        assert found is not None and found[0] == role, (url, files, found)
        assert "--" not in found[1], found[1]
        with pytest.raises(BrokerUrlError) as err:
            check_tls(url, files)
        assert str(err.value) == found[1]
    assert tls_problem("mqtts://broker", TlsFiles(pki.ca, cert, key)) is None
    assert tls_problem("mqtt://broker", TlsFiles()) is None


def test_check_tls_refuses_an_encrypted_key(pki, tmp_path) -> None:
    from cryptography.hazmat.primitives import serialization

    cert, key = pki.client("operator")
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    encrypted = tmp_path / "operator-encrypted.key"
    encrypted.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.BestAvailableEncryption(b"secret")))

    with pytest.raises(BrokerUrlError, match="is encrypted"):
        check_tls("mqtts://broker", TlsFiles(str(pki.ca), str(cert), str(encrypted)))
    # apply_tls alone must not prompt for the passphrase on the terminal either.
    with pytest.raises(BrokerUrlError, match="is encrypted"):
        apply_tls(_client(), TlsFiles(str(pki.ca), str(cert), str(encrypted)))


# -- apply_tls -----------------------------------------------------------------------------------------------------


def _client() -> mqtt.Client:
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="url-test", protocol=mqtt.MQTTv5)


def test_apply_tls_configures_the_client(pki) -> None:
    cert, key = pki.client("operator")
    client = _client()

    apply_tls(client, TlsFiles(str(pki.ca), str(cert), str(key)))

    context = client._ssl_context  # paho keeps no public accessor; the context is what connect() uses
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert any(c.get("subject") == ((("commonName", "fieldnode test CA"),),) for c in context.get_ca_certs())


def test_apply_tls_names_a_key_that_does_not_match_its_certificate(pki) -> None:
    cert, _ = pki.client("operator")
    _, other_key = pki.client("dev-b")

    with pytest.raises(BrokerUrlError) as err:
        apply_tls(_client(), TlsFiles(str(pki.ca), str(cert), str(other_key)))

    assert f"client key {other_key} does not match client certificate {cert}" in str(err.value)
    assert isinstance(err.value.__cause__, ssl.SSLError)


def test_apply_tls_names_a_ca_file_that_is_not_a_certificate(pki) -> None:
    _, key = pki.client("operator")

    with pytest.raises(BrokerUrlError) as err:
        apply_tls(_client(), TlsFiles(ca=str(key)))  # a key where the CA belongs

    assert f"CA file {key}" in str(err.value)


def test_apply_tls_names_a_certificate_file_that_is_not_a_certificate(pki) -> None:
    _, key = pki.client("operator")

    with pytest.raises(BrokerUrlError) as err:
        apply_tls(_client(), TlsFiles(str(pki.ca), str(key), str(key)))

    assert f"client certificate {key}" in str(err.value)


def test_apply_tls_twice_is_an_error_not_a_crash(pki) -> None:
    client = _client()
    apply_tls(client, TlsFiles(ca=str(pki.ca)))

    with pytest.raises(BrokerUrlError, match="TLS setup failed") as err:
        apply_tls(client, TlsFiles(ca=str(pki.ca)))

    assert isinstance(err.value.__cause__, ValueError)
