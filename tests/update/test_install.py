"""The install pipeline on real parts: repositories made with ``fieldnode repo`` from the shipped vibration model,
read through ``file://`` URLs, a real store on tmp_path, real inference workers for validation. Each refusal
asserts its code at its step and an active model that is byte-identical, with nothing left in staging but the
downloads."""

from __future__ import annotations

import os
import pathlib
import shutil
import time

import pytest

from device.runtime.manifest import bundled_model_dir, load_manifest
from device.runtime.runtime import RuntimeSettings
from device.update import age
from device.update.client import BoardFacts, Repository
from device.update.errors import UpdateError
from device.update.install import Installer
from device.update.store.store import ModelStore
from tests.update import storeproc
from tests.update.httpserver import RangeServer
from tests.update.reposim import BoardClock, model_repo, resign_targets

SHIPPED = bundled_model_dir()
FULL, LITE, VECTORS = (os.path.join(SHIPPED, n) for n in ("vibration_full.tflite", "vibration_lite.tflite",
                                                          "vibration_testvectors.npz"))


class World:
    """v1 and v2: the shipped files and vectors; v3: full and lite swapped (its vectors cannot pass). All for
    hardware class rpi4, granted to board-a."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.identity, recipient = age.generate_identity()
        good = {"full": (FULL, VECTORS), "lite": (LITE, VECTORS)}
        self.root = model_repo(path, {1: good, 2: good, 3: {"full": (LITE, VECTORS), "lite": (FULL, VECTORS)}},
                               {"board-a": recipient})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(str(tmp_path_factory.mktemp("install") / "repo"))


@pytest.fixture(scope="module")
def runtime_settings(backend):
    return RuntimeSettings(backend=backend.name, delegate="cpu")


def installer(repo_dir: str, root: bytes, state_dir: str, runtime_settings, *, identity: str,
              device_id: str = "board-a", facts: BoardFacts = BoardFacts("rpi4"), store=None, **kw) -> Installer:
    """A board reading ``repo_dir`` through file:// URLs, its store under ``state_dir``."""
    store = store or ModelStore.for_state_dir(state_dir)
    base = pathlib.Path(repo_dir).as_uri() + "/"
    repo = Repository(os.path.join(store.root, "metadata"), root=root, metadata_url=base + "metadata/",
                      targets_url=base + "targets/", grants_url=base + "grants/", attempts=2)
    return Installer(repo, store, device_id=device_id, identities=[identity], facts=facts,
                     runtime_settings=runtime_settings, **kw)


@pytest.fixture(scope="module")
def base_state(world, runtime_settings, tmp_path_factory):
    """A board state directory with v2 installed and committed (floor 2), copied by each test that uses it."""
    state = str(tmp_path_factory.mktemp("base") / "state")
    inst = installer(world.path, world.root, state, runtime_settings, identity=world.identity)
    assert inst.install(version=2)["version"] == 2
    inst.store.commit(2)
    return state


@pytest.fixture
def board(world, runtime_settings, base_state, tmp_path):
    """``board(fresh=False, **kw)``: an installer on a copy of the base state (or a fresh one)."""

    def make(fresh: bool = False, **kw) -> Installer:
        state = str(tmp_path / "state")
        if not fresh:
            shutil.copytree(base_state, state)
        kw.setdefault("identity", world.identity)
        return installer(kw.pop("repo_dir", world.path), world.root, state, runtime_settings, **kw)

    return make


def model_state(store: ModelStore) -> dict:
    """Every byte of what serves and of the store's state files (the TUF metadata and downloads left out)."""
    out = {}
    for name in ("store.json", "floors.json", "failed.json"):
        path = os.path.join(store.root, name)
        out[name] = open(path, "rb").read() if os.path.exists(path) else None
    for dirpath, _dirs, files in os.walk(store.slots_dir):
        for n in files:
            full = os.path.join(dirpath, n)
            out[os.path.relpath(full, store.root)] = open(full, "rb").read()
    return out


def refused(inst: Installer, call, *, marks_failed: bool = False) -> UpdateError:
    """Runs ``call``; asserts it raised an UpdateError and left the model and the staging area as they were (and,
    unless ``marks_failed``, the store's state files: a model that fails validation is marked failed)."""
    before = model_state(inst.store)
    with pytest.raises(UpdateError) as info:
        call()
    after = model_state(inst.store)
    if marks_failed:
        assert after.pop("failed.json") != before.pop("failed.json")
    assert after == before
    staging = inst.store.staging_dir
    assert not os.path.exists(staging) or set(os.listdir(staging)) <= {"downloads"}
    return info.value


# --- a successful install ---------------------------------------------------------------------------------

def test_an_install_serves_the_new_model_on_trial_with_the_released_bytes(board):
    steps = []
    inst = board(fresh=True, progress=lambda step, info: steps.append(step))
    check = inst.check()
    assert check["available"]["version"] == 3 and check["installed"]["source"] == "bundled"
    assert [v["variant"] for v in check["available"]["variants"]] == ["full", "lite"] and check["refused"] == []

    result = inst.install(version=2)

    assert {k: result[k] for k in ("installed", "name", "version", "state", "variants")} == {
        "installed": True, "name": "vibration", "version": 2, "state": "trial", "variants": ["full", "lite"]}
    assert [(c["variant"], c["check"], c["ok"]) for c in result["checks"]] == [("full", "vectors", True),
                                                                                ("lite", "vectors", True)]
    active = inst.store.active()
    assert (active.name, active.version, active.state, active.slot) == ("vibration", 2, "trial", result["slot"])
    files = {n: open(os.path.join(active.dir, n), "rb").read() for n in os.listdir(active.dir) if n != ".slot.json"}
    shipped = {n: open(os.path.join(SHIPPED, n), "rb").read() for n in os.listdir(SHIPPED)}
    assert files.pop("vibration_full.tflite") == shipped["vibration_full.tflite"]
    assert files.pop("vibration_lite.tflite") == shipped["vibration_lite.tflite"]
    assert files.pop("vibration_testvectors.npz") == shipped["vibration_testvectors.npz"]
    assert sorted(files) == ["model.json"]
    m, template = load_manifest(active.dir), load_manifest(SHIPPED)
    assert (m.name, m.version, m.labels, m.default_variant) == ("vibration", "2", template.labels, "full")
    assert {n: v.cost for n, v in m.variants.items()} == {n: v.cost for n, v in template.variants.items()}
    assert m.meta["input"] == template.meta["input"] and "accuracy" not in m.meta  # accuracy was the old weights'
    assert os.path.basename(m.testvectors) == "vibration_testvectors.npz"
    assert os.listdir(inst.store.downloads_dir) == []  # the ciphertexts go once the switch is done
    order = [s for i, s in enumerate(steps) if i == 0 or steps[i - 1] != s]
    assert order[order.index("target"):] == ["target", "begin", "grant", "download", "decrypt", "manifest",
                                             "validate", "activate", "done"]
    assert inst.status()["last_check"]["available"]["version"] == 3


def test_deferred_with_its_reason_touches_nothing_and_force_installs(board):
    asked = []

    def defer():
        asked.append(1)
        return "battery at 12 % and not charging"

    inst = board(fresh=True, defer=defer)
    err = refused(inst, lambda: inst.install(version=2))
    assert err.code == "update_deferred" and "battery at 12 % and not charging" in str(err) and asked
    assert inst.store.active() is None and not os.path.exists(inst.store.slots_dir)
    assert inst.install(version=2, force=True)["installed"] is True
    assert inst.store.active().version == 2 and len(asked) == 1  # force does not ask


def test_a_release_without_test_vectors_gets_the_finite_output_probe(runtime_settings, tmp_path):
    identity, recipient = age.generate_identity()
    root = model_repo(str(tmp_path / "repo"), {4: {"lite": (LITE, None)}}, {"board-a": recipient})
    inst = installer(str(tmp_path / "repo"), root, str(tmp_path / "state"), runtime_settings, identity=identity)
    result = inst.install()
    assert result["version"] == 4 and [(c["variant"], c["check"]) for c in result["checks"]] == [("lite", "probe")]
    m = load_manifest(inst.store.active().dir)
    assert list(m.variants) == ["lite"] and m.default_variant == "lite" and m.testvectors is None
    assert m.variants["lite"].cost == load_manifest(SHIPPED).variants["lite"].cost


def test_from_config_installs_over_http_with_a_download_cut_short(world, runtime_settings, tmp_path):
    from device import config

    (tmp_path / "root.json").write_bytes(world.root)
    (tmp_path / "board.age").write_text(world.identity + "\n")
    os.chmod(tmp_path / "board.age", 0o600)
    with RangeServer(world.path) as srv:
        t = tmp_path
        cfg = config.loads(f'[device]\nid = "board-a"\nstate_dir = "{t / "state"}"\n[runtime]\n'
                           f'delegate = "cpu"\nbackend = "{runtime_settings.backend}"\n[update]\n'
                           f'root_file = "{t / "root.json"}"\nrepository = "{srv.url}"\n'
                           f'identity_file = "{t / "board.age"}"\nhwclass = "rpi4"\n')
        clock = BoardClock(time.time())  # sleeps between attempts are recorded, not slept
        inst = Installer.from_config(cfg, clock=clock)
        assert inst.store.root == str(tmp_path / "state" / "update") and inst.facts.hwclass == "rpi4"
        assert inst.check()["available"]["version"] == 3
        srv.drop_after(100_000, times=10)  # the 151 KB model drops at byte 100,000 and resumes there
        result = inst.install(version=2)
        assert result["installed"] and inst.store.active().version == 2
        assert [rng for _path, rng in srv.requests if rng] == ["bytes=100000-"] and len(clock.slept) == 1
    assert os.path.isfile(os.path.join(inst.store.root, "metadata", "root.json"))


# --- refusals, each at its step, the active model byte-identical ------------------------------------------

def test_a_release_for_another_hardware_class_is_refused_and_listed(board):
    inst = board(facts=BoardFacts("jetson-orin"))
    check = inst.check()
    assert check["available"] is None
    assert {(r["version"], r["variant"], r["code"]) for r in check["refused"]} == {(3, "full", "not_for_this_board"),
                                                                                  (3, "lite", "not_for_this_board")}
    err = refused(inst, inst.install)
    assert err.code == "not_for_this_board" and "hardware class" in str(err) and "jetson-orin" in str(err)
    err = refused(inst, lambda: inst.install(version=9))
    assert err.code == "not_for_this_board" and "no such release" in str(err) and "1, 2, 3" in str(err)


def test_a_version_below_the_floor_is_refused_by_the_store(board):
    inst = board()
    err = refused(inst, lambda: inst.install(version=1))
    assert err.code == "rollback_refused" and "below this board's floor v2" in str(err)


def test_a_board_not_granted_is_refused_before_any_download(board):
    other, _ = age.generate_identity()
    inst = board(device_id="board-z", identity=other)
    err = refused(inst, lambda: inst.install(version=3))
    assert err.code == "not_granted" and "fieldnode repo grant" in str(err)
    assert os.listdir(inst.store.downloads_dir) == []


def test_a_plaintext_that_is_not_the_signed_one_is_refused(board, world, tmp_path):
    lying = str(tmp_path / "lying-repo")
    shutil.copytree(world.path, lying)

    def edit(targets):
        targets.targets["models/vibration/full/3.tflite.age"].unrecognized_fields["custom"]["plaintext"]["sha256"] = \
            "0" * 64

    resign_targets(lying, edit)
    inst = board(repo_dir=lying)
    err = refused(inst, lambda: inst.install(version=3))
    assert err.code == "hash_mismatch" and "models/vibration/full/3.tflite.age" in str(err)


def test_a_model_that_misses_its_test_vectors_is_refused_naming_the_variant(board):
    inst = board()
    assert inst.check()["available"]["version"] == 3
    err = refused(inst, inst.install, marks_failed=True)  # the newest version: full and lite swapped
    assert err.code == "validation_failed" and "variant full" in str(err) and "worst difference" in str(err)
    assert 3 in inst.store.failed_versions("vibration")  # it does not pass here: never validated again
    err = refused(inst, lambda: inst.install(version=3))
    assert err.code == "rollback_refused" and "failed on this board before" in str(err)
    check = inst.check()
    assert check["available"] is None and any(r["version"] == 3 and r["code"] == "rollback_refused"
                                              for r in check["refused"])


def test_an_install_while_another_process_holds_the_store_lock_is_busy(board):
    inst = board()
    holder = storeproc.spawn("hold", inst.store.root)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = refused(inst, lambda: inst.install(version=3))
        assert err.code == "update_busy" and "storeproc" in str(err)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


FS_BYTES = 4 * 1024 * 1024


@pytest.fixture
def small_fs(tmpfs):
    """A fresh tmpfs of FS_BYTES (the shared ``tmpfs`` fixture: root, never skipped)."""
    return tmpfs(FS_BYTES)


def test_an_install_the_disk_cannot_take_is_refused_before_a_byte_is_downloaded(world, base_state,
                                                                               runtime_settings, small_fs):
    state = os.path.join(small_fs, "state")
    shutil.copytree(base_state, state)
    st = os.statvfs(small_fs)
    store = ModelStore.for_state_dir(state, reserve_bytes=st.f_bavail * st.f_frsize)  # all of it kept free
    inst = installer(world.path, world.root, state, runtime_settings, identity=world.identity, store=store)
    err = refused(inst, lambda: inst.install(version=3))
    assert err.code == "no_space" and "kept in reserve" in str(err)
    assert os.listdir(store.downloads_dir) == []
