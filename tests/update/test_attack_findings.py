"""What did not hold when the update path was attacked (issue 16, part 2), each on real parts: repositories made
with ``fieldnode repo``, a real store, real files, FIFOs and device nodes, the project's HTTP server dropping the
connection, the ``fieldnode update`` command line.

Every refusal asserts its code (through its class), the active model byte-identical and the store lock free.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import threading
import time

import pytest

from device import config
from device.errors import ConfigError
from device.runtime.manifest import bundled_model_dir
from device.runtime.runtime import RuntimeSettings
from device.update import age
from device.update.client import Repository
from device.update.errors import DownloadError, MetadataError, RollbackError, SignatureError, StoreError, UnsafeFile
from device.update.fetch import HttpSource, download_target
from device.update.install import Installer, status
from device.update.store.store import ModelStore
from tests.update.httpserver import RangeServer
from tests.update.reposim import BoardClock, World, distinct_release, model_repo, resign_targets
from tests.update.test_install import installer, model_state

SHIPPED = bundled_model_dir()
LITE, VECTORS = (os.path.join(SHIPPED, n) for n in ("vibration_lite.tflite", "vibration_testvectors.npz"))


class Fleet:
    """v1: the shipped lite variant; v2: a lite of its own bytes; v3: v1's bytes again under a higher number (what a
    targets key holder can sign). All for rpi4, granted to board-a."""

    def __init__(self, path: str, work: str) -> None:
        self.path = path
        self.identity, recipient = age.generate_identity()
        own = distinct_release(os.path.join(work, "v2"), "2")
        self.root = model_repo(path, {1: {"lite": (LITE, VECTORS)}, 2: {"lite": own["lite"]},
                                      3: {"lite": (LITE, VECTORS)}}, {"board-a": recipient})

    def stored(self, repo_dir: str, version: int) -> str:
        """The stored ciphertext of ``version``'s lite variant in ``repo_dir``."""
        folder = os.path.join(repo_dir, "targets", "models", "vibration", "lite")
        (name,) = [n for n in os.listdir(folder) if n.endswith(f".{version}.tflite.age")]
        return os.path.join(folder, name)

    def grant(self, repo_dir: str, version: int) -> str:
        """board-a's grant file of ``version``'s lite release in ``repo_dir``."""
        grants = os.path.join(repo_dir, "grants")
        (release,) = [n for n in os.listdir(grants) if n.startswith(f"vibration-lite-{version}-")]
        (name,) = os.listdir(os.path.join(grants, release))
        return os.path.join(grants, release, name)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    work = tmp_path_factory.mktemp("fleet")
    return Fleet(str(work / "repo"), str(work))


@pytest.fixture(scope="module")
def runtime_settings(backend):
    return RuntimeSettings(backend=backend.name, delegate="cpu")


@pytest.fixture(scope="module")
def v1_state(fleet, runtime_settings, tmp_path_factory):
    """A board state directory with v1 installed and committed (floor 1), copied by each test."""
    state = str(tmp_path_factory.mktemp("v1") / "state")
    inst = installer(fleet.path, fleet.root, state, runtime_settings, identity=fleet.identity)
    assert inst.install(version=1)["version"] == 1
    inst.store.commit(1)
    return state


@pytest.fixture
def board(fleet, runtime_settings, v1_state, tmp_path):
    """``board(repo_dir=...)``: an installer on a copy of the v1 state reading ``repo_dir`` (default the fleet's)."""

    def make(repo_dir: str | None = None) -> Installer:
        state = str(tmp_path / "state")
        shutil.copytree(v1_state, state)
        return installer(repo_dir or fleet.path, fleet.root, state, runtime_settings, identity=fleet.identity)

    return make


@pytest.fixture
def stick(fleet, tmp_path):
    """A copy of the fleet's repository, as a USB stick found in the field would hold it."""
    path = str(tmp_path / "stick")
    shutil.copytree(fleet.path, path)
    return path


def refused_cleanly(inst: Installer, call, cls) -> Exception:
    """Runs ``call`` in a thread (a FIFO must not hang the test): asserts it raised ``cls`` within a generous
    bound, left the model and the store's state byte-identical, nothing in staging but downloads, and the store
    lock free."""
    before = model_state(inst.store)
    outcome: dict = {}

    def run():
        try:
            call()
        except Exception as exc:  # noqa: BLE001 (asserted below)
            outcome["error"] = exc

    t = threading.Thread(target=run, daemon=True, name="attack-install")
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "the install hangs (a FIFO opened on the stick)"
    err = outcome.get("error")
    assert isinstance(err, cls), repr(err)
    assert err.code == cls.code
    assert model_state(inst.store) == before
    staging = inst.store.staging_dir
    assert not os.path.exists(staging) or set(os.listdir(staging)) <= {"downloads"}
    with inst.store.locked("probe"):  # the lock was released
        pass
    return err


def unblock(fifo: str) -> None:
    """Opens a FIFO's writing end once, so a reader stuck on it (before the fix) sees its end and the test ends."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader waits: nothing to unblock
        pass


# --- a directory repository reads regular files inside it, nothing else -----------------------------------------

def test_a_stick_target_that_links_to_the_boards_identity_is_refused_not_copied(board, fleet, stick, tmp_path):
    secret = tmp_path / "board.age"
    secret.write_text(fleet.identity + "\n")
    target = fleet.stored(stick, 2)
    os.remove(target)
    os.symlink(secret, target)
    inst = board(stick)
    err = refused_cleanly(inst, lambda: inst.install(version=2), UnsafeFile)
    assert "is a symbolic link" in str(err) and os.path.basename(target) in str(err)
    for name in os.listdir(inst.store.downloads_dir):  # the identity never reached the state directory
        with open(os.path.join(inst.store.downloads_dir, name), "rb") as fh:
            assert fleet.identity.encode() not in fh.read()


def test_a_stick_grant_that_is_a_fifo_is_refused_and_never_hangs_the_install(board, fleet, stick):
    grant = fleet.grant(stick, 2)
    os.remove(grant)
    os.mkfifo(grant)
    inst = board(stick)
    try:
        err = refused_cleanly(inst, lambda: inst.install(version=2), UnsafeFile)
    finally:
        unblock(grant)
    assert "is a FIFO" in str(err)


def test_a_stick_target_that_is_a_device_node_is_refused(board, fleet, stick):
    target = fleet.stored(stick, 2)
    os.remove(target)
    os.mknod(target, 0o644 | 0o020000, os.makedev(1, 5))  # a character device: /dev/zero's numbers
    inst = board(stick)
    err = refused_cleanly(inst, lambda: inst.install(version=2), UnsafeFile)
    assert "is a device" in str(err)


@pytest.mark.parametrize("points_to", ["/dev/null", "a copy outside the stick"])
def test_stick_metadata_that_is_a_symbolic_link_is_refused(board, stick, tmp_path, points_to):
    timestamp = os.path.join(stick, "metadata", "timestamp.json")
    if points_to == "/dev/null":
        dest = "/dev/null"
    else:  # the very bytes the stick would hold: following the link would succeed
        dest = str(tmp_path / "elsewhere.json")
        shutil.copyfile(timestamp, dest)
    os.remove(timestamp)
    os.symlink(dest, timestamp)
    inst = board(stick)
    err = refused_cleanly(inst, lambda: inst.install(version=2), UnsafeFile)
    assert "metadata/timestamp.json is a symbolic link" in str(err)


def test_partial_downloads_are_0600_whatever_the_umask(fleet, tmp_path):
    repo = Repository(str(tmp_path / "meta"), root=fleet.root, metadata_url=fleet.path + "/metadata",
                      targets_url=fleet.path + "/targets", grants_url=fleet.path + "/grants")
    release = next(r for r in repo.releases() if r.version == 2)
    partial = str(tmp_path / "dl" / (release.target.hashes["sha256"] + ".part"))
    seen = []
    old = os.umask(0)
    try:
        def progress(have, total):
            if not seen:
                seen.append(os.stat(partial).st_mode & 0o7777)
        repo.download(release, str(tmp_path / "dl"), progress=progress)
    finally:
        os.umask(old)
    assert seen == [0o600]


# --- HTTP resume keeps every byte that arrived --------------------------------------------------------------

def test_a_link_that_drops_every_20_kib_still_completes_the_download(tmp_path):
    from tuf.api.metadata import TargetFile

    www = tmp_path / "www"
    www.mkdir()
    data = os.urandom(150_000)
    (www / "model.age").write_bytes(data)
    target = TargetFile.from_data("model.age", data, ["sha256"])
    with RangeServer(str(www)) as srv:
        srv.drop_after(20_000, times=20)  # less than one 64 KiB chunk per connection, every time
        clock = BoardClock(time.time())
        out = download_target(target, srv.url + "model.age", HttpSource(), str(tmp_path / "st"), clock=clock)
        ranges = [r for _, r in srv.requests if r]
    assert open(out, "rb").read() == data
    assert ranges[:3] == ["bytes=20000-", "bytes=40000-", "bytes=60000-"]


# --- a damaged local copy is the board's, fetched again -----------------------------------------------------

def test_a_cached_ciphertext_damaged_on_the_board_is_fetched_again(board, caplog):
    inst = board()
    inst.repo.refresh()
    release = next(r for r in inst.repo.releases() if r.version == 2)
    cached = inst.repo.download(release, inst.store.downloads_dir)
    with open(cached, "r+b") as fh:  # bit rot on the board's storage
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with caplog.at_level("WARNING", logger="device.update.fetch"):
        result = inst.install(version=2)
    assert result["installed"] and inst.store.active().version == 2
    assert f"the local copy {cached}" in caplog.text


# --- the floor compares bytes too ---------------------------------------------------------------------------

def test_older_bytes_under_a_newer_version_number_are_refused(board):
    inst = board()
    check = inst.check()
    assert check["available"]["version"] == 2  # v3 is v1's model: skipped, and said
    (v3,) = [r for r in check["refused"] if r["version"] == 3]
    assert v3["code"] == RollbackError.code and "same model as v1" in v3["message"]
    err = refused_cleanly(inst, lambda: inst.install(version=3), RollbackError)
    assert "vibration v3 (lite) decrypts to the same model as v1" in str(err)
    kept = json.loads(open(os.path.join(inst.store.root, "floors.json")).read())
    with open(LITE, "rb") as fh:
        assert kept["installed"]["vibration"] == [{"version": 1, "variant": "lite",
                                                   "sha256": hashlib.sha256(fh.read()).hexdigest()}]


def test_a_malformed_newer_release_is_an_error_naming_it_not_up_to_date(board, fleet, tmp_path):
    lying = str(tmp_path / "lying")
    shutil.copytree(fleet.path, lying)
    bad = "models/vibration/lite/4.tflite.age"

    def edit(targets):
        good = targets.targets["models/vibration/lite/2.tflite.age"]
        for path in [p for p in targets.targets if not p.startswith("models/vibration/lite/1.")]:
            del targets.targets[path]
        entry = copy.deepcopy(good)
        entry.path = bad
        del entry.unrecognized_fields["custom"]["plaintext"]
        targets.targets[bad] = entry

    resign_targets(lying, edit)
    inst = board(lying)
    err = refused_cleanly(inst, inst.install, MetadataError)
    assert bad in str(err)


# --- the trusted metadata is durable, also when a refresh is refused --------------------------------------------

def test_metadata_accepted_before_a_refusal_is_fsynced(tmp_path, capsys, monkeypatch):
    world = World(tmp_path, capsys)
    client = world.client("board")
    client.refresh()
    resign_targets(world.path, lambda targets: None)  # a new targets, snapshot and timestamp
    meta = os.path.join(world.path, "metadata")
    newest = max((n for n in os.listdir(meta) if n.endswith(".snapshot.json")), key=lambda n: int(n.split(".")[0]))
    doc = json.loads(open(os.path.join(meta, newest)).read())
    doc["signed"]["expires"] = "2099-01-01T00:00:00Z"  # its signature no longer holds
    with open(os.path.join(meta, newest), "w") as fh:
        json.dump(doc, fh)
    published = json.loads(open(os.path.join(meta, "timestamp.json")).read())["signed"]["version"]
    synced: set = set()
    real_fsync = os.fsync

    def fsync(fd):  # records what reached the disk; the real fsync runs
        synced.add(os.fstat(fd).st_ino)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    again = world.client("board")
    with pytest.raises(SignatureError):
        again.refresh()
    kept = os.path.join(str(tmp_path), "board", "metadata", "timestamp.json")
    assert json.loads(open(kept).read())["signed"]["version"] == published  # accepted before the snapshot failed
    assert os.stat(kept).st_ino in synced


# --- the command line: commit, the trusted root, no credentials in URLs -----------------------------------------

def test_update_commit_ends_a_trial_and_refuses_cleanly_without_one(tmp_path, capsys):
    from tests.update.test_agent_update import put_on_trial
    from tools.cli import main

    cfg = tmp_path / "fieldnode.toml"
    cfg.write_text(f'[device]\nid = "board-a"\nstate_dir = "{tmp_path / "state"}"\n')
    capsys.readouterr()
    assert main(["update", "commit", "--config", str(cfg), "--json"]) == 1
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["error"]["code"] == StoreError.code and "no trial to commit" in doc["error"]["message"]
    assert not (tmp_path / "state").exists()  # refused before anything was created
    put_on_trial(str(tmp_path / "state"), 4)
    assert main(["update", "commit", "--config", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert "committed vibration v4" in out and "floor now v4" in out
    store = ModelStore.for_state_dir(str(tmp_path / "state"))
    assert store.active().state == "committed" and store.floor("vibration") == 4
    assert main(["update", "commit", "--config", str(cfg)]) == 1
    out, err = capsys.readouterr()
    assert "no trial to commit: vibration v4 is committed" in err and "Traceback" not in err


def test_update_status_shows_the_trusted_root_version(board, tmp_path, capsys):
    from tools.update import RENDER

    inst = board()
    result = status(inst.store)
    assert result["root_version"] == 1
    assert "trusted root: version 1" in RENDER["status"](result)
    assert status(ModelStore(str(tmp_path / "empty")))["root_version"] is None


def test_a_repository_url_with_credentials_is_refused_without_repeating_them():
    with pytest.raises(ConfigError) as info:
        config.loads('[update]\nroot_file = "/r.json"\nrepository = "https://fleet:s3cret-token@updates.example/x/"\n')
    assert info.value.key_path == "update.repository" and "update.credentials_file" in str(info.value)
    assert "s3cret" not in str(info.value)
    with pytest.raises(ConfigError) as info:  # a password in clear over the network
        config.loads('[update]\nroot_file = "/r.json"\nrepository = "http://updates.example/x/"\n'
                     'credentials_file = "/c"\n')
    assert info.value.key_path == "update.credentials_file" and "https" in str(info.value)


def test_the_http_repository_gets_the_credentials_files_login(fleet, runtime_settings, tmp_path):
    (tmp_path / "root.json").write_bytes(fleet.root)
    (tmp_path / "board.age").write_text(fleet.identity + "\n")
    os.chmod(tmp_path / "board.age", 0o600)
    (tmp_path / "login").write_text("fleet:s3cret-token\n")
    with RangeServer(fleet.path) as srv:
        srv.require_authorization = "Basic ZmxlZXQ6czNjcmV0LXRva2Vu"  # fleet:s3cret-token

        def board_config(extra: str):
            return config.loads(
                f'[device]\nid = "board-a"\nstate_dir = "{tmp_path / "state"}"\n[runtime]\ndelegate = "cpu"\n'
                f'backend = "{runtime_settings.backend}"\n[update]\nroot_file = "{tmp_path / "root.json"}"\n'
                f'repository = "{srv.url}"\nidentity_file = "{tmp_path / "board.age"}"\nhwclass = "rpi4"\n{extra}')

        with Installer.from_config(board_config(""), clock=BoardClock(time.time())) as inst:
            with pytest.raises(DownloadError):
                inst.check()
        extra = f'credentials_file = "{tmp_path / "login"}"\n'
        with Installer.from_config(board_config(extra), clock=BoardClock(time.time())) as inst:
            assert inst.check()["available"]["version"] == 3  # nothing installed on this board yet
            inst.repo.fetch_release_key(inst.repo.releases()[0], "board-a", [fleet.identity])
    granted = [a for a in srv.authorizations if a is not None]
    assert granted and set(granted) == {srv.require_authorization}


def test_the_credentials_file_is_read_as_the_links_password_file(tmp_path):
    """One reader for both (device.link.url.read_password): a FIFO named by mistake is refused instead of hanging
    the install, and a file that is not one USER:PASSWORD line is refused naming the key, never the content."""
    from device.errors import ConfigError
    from device.update import install

    (tmp_path / "root.json").write_text("{}")

    def build(path) -> None:
        cfg = config.loads(f'[update]\nroot_file = "{tmp_path / "root.json"}"\nrepository = "https://r.example/"\n'
                           f'credentials_file = "{path}"\n')
        install._credentials(cfg)  # what Installer.from_config sends as HTTP Basic

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file") as info:
        build(fifo)
    assert info.value.key_path == "update.credentials_file"
    (tmp_path / "two").write_text("fleet:s3cret\nsecond line\n")
    with pytest.raises(ConfigError, match="USER:PASSWORD") as info:
        build(tmp_path / "two")
    assert "s3cret" not in str(info.value)
