"""The one MQTT client factory and the one password reader (:mod:`device.link.mqttclient`): the password file read
the same way by the agent's link, ``fieldnode send`` and the update delivery (a password with a trailing space,
against a real mosquitto with a password file), bad password files refused naming the file, and the Maximum
Packet Size every client announces honoured by a real broker."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import threading
from typing import Iterator

import pytest

from device import config
from device.agent.agent import Agent
from device.link.mqttclient import Endpoint, new_client
from device.link.url import MAX_PASSWORD_BYTES, PasswordFileError, read_password
from tests.link.broker import Broker
from tests.link.conftest import run_broker
from tools import send

USER, PASSWORD = "dev-a", "s3cret "  # the trailing space is part of the password


# -- the reader -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, password", [
    (b"s3cret\n", "s3cret"),
    (b"s3cret\r\n", "s3cret"),
    (b"s3cret", "s3cret"),
    (b"s3cret \n", "s3cret "),  # spaces are the password's
    (b" s3cret", " s3cret"),
    (b"s3cret\n\n", "s3cret\n"),  # exactly one line ending goes
    (b"s3cret\r", "s3cret\r"),
    ("pässwörd\n".encode(), "pässwörd"),
    (b"\n", ""),
])
def test_exactly_one_trailing_line_ending_is_not_part_of_the_password(tmp_path, content, password):
    path = tmp_path / "pw"
    path.write_bytes(content)
    assert read_password(path) == password


@pytest.mark.parametrize("case, words", [
    ("missing", "cannot read it"),
    ("latin1", "not UTF-8 text"),
    ("huge", f"larger than {MAX_PASSWORD_BYTES} bytes"),
    ("fifo", "not a regular file"),
    ("directory", "Is a directory"),
])
def test_a_password_file_that_cannot_be_used_is_refused_naming_it(tmp_path, case, words):
    path = tmp_path / "pw"
    if case == "latin1":
        path.write_bytes("pässwörd".encode("latin-1"))
    elif case == "huge":
        path.write_bytes(b"x" * (MAX_PASSWORD_BYTES + 1))
    elif case == "fifo":
        os.mkfifo(path)  # never hangs: opened without blocking, then refused
    elif case == "directory":
        path.mkdir()
    with pytest.raises(PasswordFileError) as info:
        read_password(path)
    assert str(info.value).startswith(f"password file {path}: ") and words in str(info.value)
    assert info.value.code == PasswordFileError.code and info.value.path == str(path)


def test_a_password_of_the_largest_size_is_read(tmp_path):
    path = tmp_path / "pw"
    path.write_bytes(b"y" * MAX_PASSWORD_BYTES)
    assert read_password(path) == "y" * MAX_PASSWORD_BYTES


# -- against a real broker with a password file -------------------------------------------------------------------


@pytest.fixture
def password_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A plain mosquitto that requires a login: ``dev-a`` with the password ``"s3cret "``."""
    tool = shutil.which("mosquitto_passwd") or shutil.which("mosquitto_passwd", path="/usr/bin:/usr/sbin")
    if tool is None:
        pytest.fail("mosquitto_passwd not found; install mosquitto (it ships the tool)", pytrace=False)
    workdir = tmp_path_factory.mktemp("broker-passwd")
    passwd = workdir / "passwd"
    subprocess.run([tool, "-c", "-b", str(passwd), USER, PASSWORD], check=True, capture_output=True)
    passwd.chmod(0o600)
    yield from run_broker(tmp_path_factory, "plain", None, workdir=workdir,
                          extra_config=["allow_anonymous false", f"password_file {passwd}"])


def _agent_config(tmp_path, broker: Broker, password_file) -> str:
    trust = tmp_path / "trust"
    trust.mkdir(exist_ok=True)
    path = tmp_path / "fieldnode.toml"
    path.write_text("\n".join([
        "[device]", f'id = "{USER}"', f'state_dir = "{tmp_path / "state"}"',
        "[runtime]", 'isolation = "inline"', 'delegate = "cpu"',
        "[drivers]", 'virtual_board = "rpi4"',
        "[link]", f'broker = "{broker.url}"', f'trust_dir = "{trust}"', "backoff_min_s = 0.05",
        "backoff_max_s = 0.5", f'username = "{USER}"', f'password_file = "{password_file}"',
    ]) + "\n")
    return str(path)


def test_a_trailing_space_password_logs_in_the_agents_link_and_send(password_broker, tmp_path, capsys):
    """The agent's link (built by the agent's wiring from its config) and ``fieldnode send`` read the same file the
    same way: ``"s3cret \\n"`` is the password ``"s3cret "`` for both, and the broker lets both in."""
    pw = tmp_path / "password"
    pw.write_text(PASSWORD + "\n")  # as an editor saves it
    conf = _agent_config(tmp_path, password_broker, pw)
    agent = Agent(config.load(conf))
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        assert agent.link.wait_connected(30), (agent.link.last_error, password_broker.log_tail())

        parser = argparse.ArgumentParser()
        parser.add_argument("--config")
        send.add_arguments(parser)
        code = send.run(parser.parse_args(["--config", conf, "ping", "--json", "--timeout", "20"]))
        out, err = capsys.readouterr()
        assert code == 0, (out, err, password_broker.log_tail())
        assert '"pong": true' in out
    finally:
        agent.stop()
        runner.join(30)
    assert "not authorised" not in password_broker.log_text().lower()


def test_a_wrong_password_is_refused_by_the_same_broker(password_broker, tmp_path):
    """The broker really checks the password: without the trailing space it refuses (so the test above proves the
    space was sent)."""
    from device.link.errors import ConnectError
    from device.link.session import build_request, send as send_one
    from device.link.url import parse_broker_url

    request = build_request(USER, "ping", {})
    with pytest.raises(ConnectError, match="refused the connection"):
        send_one(parse_broker_url(password_broker.url), request, username=USER, password=PASSWORD.strip(),
                 timeout_s=10)


def test_the_update_transport_reads_the_password_file_as_the_link_does(password_broker, tmp_path):
    from device.update.mqttfetch import transport_for

    pw = tmp_path / "password"
    pw.write_bytes((PASSWORD + "\r\n").encode())
    cfg = config.loads(f'[device]\nid = "{USER}"\n[update]\ntimeout_s = 10\n[link]\nusername = "{USER}"\n'
                       f'password_file = "{pw}"\n')
    with transport_for(f"{password_broker.url}/fieldnode/v1/repo", cfg) as transport:
        assert transport.endpoint.password == PASSWORD
        transport.start()
        assert transport.wait_ready(15), password_broker.log_tail()


# -- Maximum Packet Size ----------------------------------------------------------------------------------------


def test_the_broker_does_not_send_a_factory_client_a_packet_over_its_limit(broker, mqtt_client):
    """A client from the factory announces its limit; the broker drops a larger message for it (and only for it)
    and delivers the smaller one behind it."""
    got: list[bytes] = []
    arrived = threading.Event()
    client = new_client(Endpoint(broker.url), "small-client", max_packet=2000)
    client.on_message = lambda c, u, m: (got.append(bytes(m.payload)), arrived.set())
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_connect = lambda c, u, f, rc, p: c.subscribe("t/#", qos=1)
    client.open(10)
    client.loop_start()
    try:
        assert subscribed.wait(10)
        other = mqtt_client(broker)
        other.subscribe("t/#")
        other.publish("t/big", b"B" * 5000)
        other.publish("t/small", b"s" * 100)
        assert arrived.wait(10)
        other.wait_for_messages(2, topic="t/#")  # the broker had both: only the limit kept one from our client
        assert got == [b"s" * 100]
    finally:
        client.disconnect()
        client.loop_stop()


def test_max_packet_must_be_a_packet_size(broker):
    for bad in (0, -1, True, 1 << 28, 1.5):
        with pytest.raises(ValueError, match="max_packet"):
            new_client(Endpoint(broker.url), "x", max_packet=bad)
