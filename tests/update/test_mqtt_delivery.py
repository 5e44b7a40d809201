"""Update delivery over MQTT against a real mosquitto and real ``fieldnode repo serve`` processes: a board refreshes,
fetches its grant and downloads a release (resuming from an offset across a broker restart); a missing file is a
404 that ends python-tuf's root walk; paths out of the repository and foreign response topics are refused; two
servers on one shared subscription share the requests."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from tuf.api.exceptions import DownloadHTTPError

from device.update import client as client_mod
from device.clock import SystemClock
from device.update.mqttfetch import (DEFAULT_ROOT, MqttFetcher, MqttSource, MqttTransport, MqttTransportError,
                                     repository_path, split_repository_url)
from tests.link.conftest import MqttTestClient, run_broker
from tests.update.reposim import World
from tools.repo.serve import read_chunk

ROOT = pathlib.Path(__file__).resolve().parents[2]


class Serve:
    """``fieldnode repo serve`` in a subprocess (the real CLI), ready once its shared subscription is in place."""

    def __init__(self, repo_dir: str, url: str, *extra: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "repo", "serve", repo_dir, "--broker", url,
                                      "--json", *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert self._ready.wait(15), f"repo serve did not subscribe: {self.lines}"

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if "serving " in line:
                self._ready.set()

    def wait_serving(self, count: int, timeout: float = 15) -> None:
        """Waits until the server has subscribed ``count`` times (after a broker restart, say)."""
        deadline = threading.Event()
        for _ in range(int(timeout / 0.05)):
            if sum("serving " in line for line in self.lines) >= count:
                return
            deadline.wait(0.05)
        raise AssertionError(f"repo serve not re-subscribed: {self.lines}")

    def stop(self) -> dict:
        """SIGTERM; returns its ``--json`` totals."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=15)
        self._reader.join(5)
        assert self.proc.returncode == 0, (self.proc.returncode, out, self.lines)
        return json.loads(out)


@pytest.fixture
def broker(tmp_path_factory):
    """A real mosquitto (plain, anonymous) on ``broker.url``."""
    yield from run_broker(tmp_path_factory, "plain", None)


@pytest.fixture
def world(tmp_path, capsys):
    return World(tmp_path, capsys)


@pytest.fixture
def servers():
    made: list = []

    def start(*args: str) -> Serve:
        made.append(Serve(*args))
        return made[-1]

    yield start
    for s in made:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(10)


@pytest.fixture
def transports():
    made: list = []

    def make(url: str, **kw) -> MqttTransport:
        kw.setdefault("timeout_s", 5.0)
        made.append(MqttTransport(url, **kw))
        made[-1].start()
        return made[-1]

    yield make
    for t in made:
        t.close()


def board(world: World, transport: MqttTransport, base: str, chunk: int):
    return world.client(base=base, fetcher=MqttFetcher(transport, chunk), source=MqttSource(transport, chunk))


def test_a_board_refreshes_fetches_its_grant_and_resumes_a_download_across_a_broker_restart(
        world, broker, servers, transports, tmp_path):
    server = servers(world.path, broker.url)
    transport = transports(broker.url, identity="board-a")
    base = f"{broker.url}/{DEFAULT_ROOT}/"
    repo = board(world, transport, base, 16 * 1024)
    repo.refresh()  # the root walk ends at 2.root.json: a 404 over MQTT
    assert ("metadata/2.root.json", 0) in transport.history
    release = repo.release(World.PATH)
    key = repo.fetch_release_key(release, "board-a", [world.board[0]])
    with pytest.raises(client_mod.UpdateError) as info:
        repo.fetch_release_key(release, "board-z", [world.board[0]])
    assert info.value.code == "not_granted"

    restarted: list = []
    asked = len(transport.history)

    def outage() -> None:
        # The next request is in flight while the server is frozen: the broker restart loses it for certain.
        for _ in range(400):
            if len(transport.history) > asked + 1:
                break
            threading.Event().wait(0.01)
        broker.restart()
        os.kill(server.proc.pid, signal.SIGCONT)

    def progress(done: int, total: int) -> None:
        if not restarted:  # after the first chunk is on disk
            restarted.append(done)
            os.kill(server.proc.pid, signal.SIGSTOP)
            threading.Thread(target=outage, daemon=True).start()

    cipher = repo.download(release, str(tmp_path / "staging"), progress=progress)
    out = tmp_path / "model.tflite"
    repo.decrypt_verified(cipher, key, str(out), release)
    assert out.read_bytes() == world.model
    offsets = [o for p, o in transport.history if p.startswith("targets/models/")]
    assert restarted and restarted[0] == 16 * 1024 and offsets[0] == 0
    assert 0 not in offsets[1:] and offsets[1] == offsets[2] == restarted[0]  # the lost request asked again,
    assert offsets == sorted(offsets)  # from the first chunk's end, never from 0
    assert release.target.length > 3 * 16 * 1024 and broker.starts == 2
    server.wait_serving(2)
    assert server.stop()["status"]["200"] >= len(offsets)


def test_missing_files_are_404_and_paths_out_of_the_repository_are_refused(
        world, broker, servers, transports, request):
    servers(world.path, broker.url)
    transport = transports(broker.url)
    fetcher = MqttFetcher(transport)
    with pytest.raises(DownloadHTTPError) as info:
        list(fetcher._fetch(f"{broker.url}/{DEFAULT_ROOT}/metadata/9.root.json"))
    assert info.value.status_code == 404
    with pytest.raises(DownloadHTTPError) as info:  # another topic root, or a path that escapes: never asked
        repository_path(f"{broker.url}/other/metadata/1.root.json", DEFAULT_ROOT)
    assert info.value.status_code == 404
    assert len(b"".join(fetcher._fetch("metadata/1.root.json"))) == os.path.getsize(world.file("metadata/1.root.json"))
    status, size, data = transport.request("metadata/1.root.json", 10**9)
    assert (status, size) == (416, os.path.getsize(world.file("metadata/1.root.json")))

    # A symbolic link out of the public directories points at nothing a board may read.
    os.symlink(os.path.join(world.path, "keys", "online"), world.file("targets/keys"))
    os.symlink(world.file("metadata/1.root.json"), world.file("grants/root-link"))
    online = os.listdir(os.path.join(world.path, "keys", "online"))
    assert transport.request(f"targets/keys/{online[0]}")[0] == 404
    assert transport.request("grants/root-link")[0] == 404
    with pytest.raises(ValueError):
        transport.request("metadata/../keys/online/" + online[0])

    # Raw requests, as a hostile client sends them: '..' and absolute paths are 400; an answer never goes to a
    # topic outside <root>/resp/.
    raw = MqttTestClient(broker)
    raw.connect()
    request.addfinalizer(raw.close)
    raw.subscribe(f"{DEFAULT_ROOT}/resp/raw")
    raw.subscribe("fieldnode/v1/dev-a/#")

    def ask(payload: bytes, topic: str = f"{DEFAULT_ROOT}/resp/raw") -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic, props.CorrelationData = topic, payload[:16] or b"x"
        raw.publish(f"{DEFAULT_ROOT}/req", payload, properties=props)

    ask(json.dumps({"path": "metadata/1.root.json"}).encode(), "fieldnode/v1/dev-a/cmd")
    for path in ("metadata/../keys/online", "/etc/passwd", "keys/online", "metadata/", ""):
        ask(json.dumps({"path": path, "offset": 0, "length": 10}).encode())
    ask(b"not json")
    answers = raw.wait_for_messages(6, topic=f"{DEFAULT_ROOT}/resp/raw")
    statuses = [dict(m.properties.UserProperty)["status"] for m in answers]
    assert statuses == ["400"] * 6 and not raw.messages("fieldnode/v1/dev-a/#")
    assert all(m.payload and b"AGE-SECRET" not in m.payload for m in answers)


def test_read_chunk_bounds_each_answer(tmp_path):
    repo = tmp_path / "r"
    (repo / "targets").mkdir(parents=True)
    (repo / "targets" / "big").write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    status, size, data = read_chunk(str(repo), "targets/big", 1000, 10**9)
    assert (status, size, len(data)) == (200, 2 * 1024 * 1024, 1024 * 1024) and data[:3] == bytes([232, 233, 234])
    assert read_chunk(str(repo), "targets/big", 2 * 1024 * 1024, 10)[:3] == (200, 2 * 1024 * 1024, b"")
    for offset, length in ((-1, 10), (True, 10), ("0", 10), (0, 0), (0, 1.5)):
        assert read_chunk(str(repo), "targets/big", offset, length)[0] == 400, (offset, length)
    os.mkfifo(repo / "targets" / "fifo")
    assert read_chunk(str(repo), "targets/fifo", 0, 10)[0] == 404  # never hangs on a FIFO


def test_two_servers_on_one_shared_subscription_share_the_requests(world, broker, servers, transports):
    a, b = servers(world.path, broker.url), servers(world.path, broker.url)
    transport = transports(broker.url)
    for i in range(40):
        assert transport.request("metadata/1.root.json", i, 100)[0] == 200
    counts = [a.stop()["requests"], b.stop()["requests"]]
    assert sum(counts) == 40 and min(counts) > 0, counts


def test_serve_refuses_what_is_not_a_repository_and_a_bad_broker(tmp_path, capsys):
    from tools.cli import main

    assert main(["repo", "serve", str(tmp_path), "--broker", "mqtt://127.0.0.1:1", "--json"]) == 1
    error = json.loads(capsys.readouterr().out.splitlines()[0])["error"]
    assert error["code"] == "repository_error" and "not a fieldnode repository" in error["message"], error
    (tmp_path / "w").mkdir()
    world = World(tmp_path / "w", capsys)
    capsys.readouterr()
    for argv, words in ((["--broker", "http://127.0.0.1"], "unsupported scheme"),
                        (["--broker", "mqtt://127.0.0.1", "--ca", "x"], "TLS files given for a plain mqtt://"),
                        (["--broker", "mqtt://127.0.0.1", "--group", "a/b"], "--group 'a/b'"),
                        (["--broker", "mqtt://127.0.0.1", "--root", "#"], "--root '#'")):
        assert main(["repo", "serve", world.path, *argv, "--json"]) == 1, argv
        error = json.loads(capsys.readouterr().out.splitlines()[0])["error"]
        assert error["code"] == "repository_error" and words in error["message"], (argv, error)


def test_repository_urls_name_a_broker_and_a_topic_root():
    broker_url, root = split_repository_url("mqtts://Updates.example:8884/fleet/a/repo/")
    assert (str(broker_url), root) == ("mqtts://updates.example:8884", "fleet/a/repo")
    assert split_repository_url("mqtt://h")[1] == DEFAULT_ROOT
    from device.link.errors import BrokerUrlError

    for bad in ("http://h/x", "mqtt://h/a/+/b", "mqtt://h/$SYS", "mqtt://u:p@h/x"):
        with pytest.raises(BrokerUrlError):
            split_repository_url(bad)
    assert repository_path("mqtt://h/fieldnode/v1/repo/targets/a%20b", DEFAULT_ROOT) == "targets/a b"


def test_transport_for_takes_the_broker_root_and_credentials_from_the_board_config(world, broker, servers,
                                                                                   tmp_path):
    from device import config
    from device.link.errors import BrokerUrlError
    from device.update.mqttfetch import transport_for

    cfg = config.loads(f'[device]\nid = "board-a"\n[update]\ntimeout_s = 4\n[link]\nusername = "u"\n'
                       f'password_file = "{tmp_path / "pw"}"\n')
    with pytest.raises(BrokerUrlError, match="password file"):
        transport_for(f"{broker.url}/fleet/repo", cfg)
    (tmp_path / "pw").write_text("secret\n")
    servers(world.path, broker.url, "--root", "fleet/repo")
    with transport_for(f"{broker.url}/fleet/repo", cfg) as transport:
        assert (transport.root, transport.timeout_s) == ("fleet/repo", 4.0)
        assert transport.response_topic.startswith("fleet/repo/resp/board-a/")
        status, size, data = transport.request("metadata/1.root.json")
        assert status == 200 and data == pathlib.Path(world.file("metadata/1.root.json")).read_bytes()
    with pytest.raises(BrokerUrlError, match="TLS"):  # TLS files of the link for a plain URL
        transport_for(broker.url, config.loads(f'[link]\nca_file = "{tmp_path / "pw"}"\n'))


def test_an_mqtt_repository_is_read_through_the_mqtt_transport_only(tmp_path):
    """From the config: an mqtt(s):// repository gets the MQTT fetcher and source (never the HTTP ones), and a
    Repository given an mqtt:// location without them refuses rather than guessing."""
    import os

    from device import config
    from device.update import age
    from device.update.errors import DownloadError
    from device.update.install import Installer

    with pytest.raises(DownloadError, match="MQTT fetcher"):
        client_mod.Repository(str(tmp_path / "md"), root=b"{}", metadata_url="mqtt://h/r/metadata/",
                              targets_url="mqtt://h/r/targets/", grants_url="mqtt://h/r/grants/")
    root = tmp_path / "root.json"
    root.write_bytes(b"{}")  # parsed by the first refresh, not here
    identity, _recipient = age.generate_identity()
    ident = tmp_path / "board.age"
    ident.write_text(identity + "\n")
    os.chmod(ident, 0o600)
    cfg = config.loads(f'[device]\nid = "b1"\nstate_dir = "{tmp_path / "state"}"\n[update]\nroot_file = "{root}"\n'
                       f'repository = "mqtt://127.0.0.1:1883/fieldnode/v1/repo"\nidentity_file = "{ident}"\n')
    inst = Installer.from_config(cfg)
    assert isinstance(inst.repo.fetcher, MqttFetcher)
    assert isinstance(inst.repo._sources["targets"], MqttSource) and isinstance(inst.repo._sources["grants"], MqttSource)


class ChunkServer:
    """A chunk server written here: answers every request with ``answer(request) -> bytes`` and status 200, whatever
    length was asked (a hostile or broken server, when the answer is large)."""

    def __init__(self, broker, answer, root: str = DEFAULT_ROOT) -> None:
        self.answer, self.requests, self.errors = answer, [], []
        self.test_client = MqttTestClient(broker, client_id=f"chunk-server-{os.getpid()}")
        self.test_client.client.on_message = self._on_message
        self.test_client.connect()
        self.test_client.subscribe(f"{root}/req")

    def _on_message(self, client, userdata, message) -> None:
        try:
            self.requests.append(json.loads(message.payload))
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = message.properties.CorrelationData
            data = self.answer(self.requests[-1])
            props.UserProperty = [("status", "200"), ("size", str(len(data)))]
            client.publish(message.properties.ResponseTopic, data, qos=1, properties=props)
        except Exception as exc:  # noqa: BLE001 - an exception would kill paho's thread
            self.errors.append(repr(exc))

    def close(self) -> None:
        self.test_client.close()


def test_an_answer_over_the_boards_limit_never_reaches_it_and_the_download_fails_in_time(broker, transports):
    """A hostile chunk server answers a 16 KiB request with 3 MiB. The board announced its Maximum Packet Size, so the
    broker drops the answer instead of sending it: the board never reads it, and the download fails with an error
    that says so within the transport's timeout (per request, times the retries)."""
    server = ChunkServer(broker, lambda request: b"\xee" * (3 * 1024 * 1024))
    transport = transports(broker.url, timeout_s=2.0, max_chunk=16 * 1024)
    try:
        with pytest.raises(MqttTransportError) as info:
            list(MqttSource(transport, 16 * 1024, retries=1).read("targets/models/m.tflite", 0))
        assert "dropped by the broker" in str(info.value) and str(transport.max_packet) in str(info.value)
        assert len(server.requests) == 2 and server.errors == []  # asked, retried once, then gave up
        assert all(r["length"] == 16 * 1024 for r in server.requests)
        broker.wait_for_log("(3145728 bytes)", count=2)  # the broker did receive both answers...
        assert transport.answers == 0  # ...and handed the board none of them
    finally:
        server.close()


def test_a_request_longer_than_the_limit_is_shortened_and_answered(broker, transports):
    server = ChunkServer(broker, lambda request: b"a" * request["length"])
    transport = transports(broker.url, max_chunk=1000)
    try:
        status, size, data = transport.request("metadata/1.root.json", 0, 10**6)
        assert (status, data) == (200, b"a" * 1000) and server.requests[0]["length"] == 1000
    finally:
        server.close()


class RecordingClock(SystemClock):
    """The real clock, recording every sleep asked of it."""

    def __init__(self) -> None:
        self.sleeps: list = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        super().sleep(seconds)


def test_the_transport_reconnects_with_a_fresh_client_after_a_backoff_on_its_clock(broker, transports):
    """The broker stops and starts again: the transport notices, waits its backoff on the clock seam (no paho
    reconnect delay, no time.sleep), connects with a new client and answers again."""
    server = ChunkServer(broker, lambda request: b"ok")
    clock = RecordingClock()
    transport = transports(broker.url, clock=clock, reconnect=(0.2, 0.4))
    try:
        assert transport.request("metadata/1.root.json")[2] == b"ok"
        first = transport.client
        broker.stop()
        for _ in range(500):
            if not transport.ready:
                break
            threading.Event().wait(0.02)
        assert not transport.ready
        broker.start()
        assert transport.wait_ready(20), broker.log_tail()
        server.test_client.wait_connected(2)  # the test's own server reconnects by paho's means
        server.test_client.subscribe(f"{DEFAULT_ROOT}/req")
        assert transport.request("metadata/1.root.json")[2] == b"ok"
        assert transport.connects == 2 and transport.client is not first  # a fresh client for the new connection
        assert clock.sleeps and sum(clock.sleeps) >= 0.1  # the backoff slept on the clock: at least half of 0.2 s
    finally:
        server.close()
