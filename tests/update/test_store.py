"""The A/B model store on real files: installs, the trial, commit and rollback, every refusal (floor, failed
version, a lock held by another process, a full tmpfs), and recovery from corrupt state files and damaged
slots. A refusal must leave the store byte-identical."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from device.runtime.manifest import bundled_model_dir, load_manifest
from device.update.errors import Busy, NoSpace, RollbackError, StoreError, ValidationFailed
from device.update.store.store import ModelStore, Recovery
from tests.update import storeproc

FULL = "vibration_full.tflite"


def make_model(path, version: str) -> str:
    """A copy of the shipped model whose model.json says ``version``."""
    shutil.copytree(bundled_model_dir(), path)
    mj = os.path.join(path, "model.json")
    data = json.load(open(mj))
    data["version"] = version
    with open(mj, "w") as f:
        json.dump(data, f, indent=2)
    return str(path)


def rename_model(directory: str, name: str) -> None:
    mj = os.path.join(directory, "model.json")
    data = json.load(open(mj))
    data["name"] = name
    with open(mj, "w") as f:
        json.dump(data, f)


def tree(directory: str) -> dict:
    """Every file under ``directory`` (relative path → bytes), the store's own slot record left out."""
    out = {}
    for dirpath, _dirs, files in os.walk(directory):
        for n in files:
            full = os.path.join(dirpath, n)
            rel = os.path.relpath(full, directory)
            if rel != ".slot.json":
                out[rel] = open(full, "rb").read()
    return out


def snapshot(root: str) -> dict:
    """Every file of the store but its lock, for 'nothing was touched' checks."""
    return {k: v for k, v in tree(root).items() if k != "lock"} | {
        "slots/a/.slot.json?": os.path.exists(os.path.join(root, "slots", "a", ".slot.json")),
        "slots/b/.slot.json?": os.path.exists(os.path.join(root, "slots", "b", ".slot.json"))}


def install(store: ModelStore, src: str, version: int, commit: bool = True, name: str = "vibration"):
    """Installs the model directory ``src`` as ``version`` (on trial, or committed), as an installer would."""
    with store.begin(name, version, size_hint=256 * 1024) as st:
        for rel in os.listdir(src):
            st.write_file(rel, open(os.path.join(src, rel), "rb").read())
        info = store.activate(st)
    if commit:
        info = store.commit(version)
    return info


@pytest.fixture
def models(tmp_path):
    return {v: make_model(tmp_path / f"m{v}", f"{v}.0.0") for v in (4, 5, 6, 7)}


@pytest.fixture
def events():
    return []


@pytest.fixture
def store(tmp_path, events):
    return ModelStore(str(tmp_path / "update"), on_event=lambda kind, data: events.append((kind, data)),
                      reserve_bytes=0)


def test_a_store_that_never_installed_anything_serves_the_bundled_model(store):
    assert store.active() is None and store.fallback() is None
    assert store.inactive_slot() == "a"
    assert store.recover() == Recovery.BUNDLED
    st = store.status()
    assert st["serving"] == "bundled" and st["active"] is None and st["floors"] == {} and st["problems"] == []


def test_install_goes_on_trial_then_commit_raises_the_floor(store, models, events):
    info = install(store, models[5], 5, commit=False)
    assert (info.slot, info.version, info.state) == ("a", 5, "trial")
    assert tree(info.dir) == tree(models[5])
    assert load_manifest(info.dir).version == "5.0.0"
    assert store.fallback() is None  # the bundled model is the first install's fallback
    assert store.floor("vibration") is None  # not before the commit
    info = store.commit(5)
    assert info.state == "committed" and store.floor("vibration") == 5
    assert [k for k, _ in events] == ["activated", "committed"]
    second = install(store, models[6], 6, commit=False)
    assert second.slot == "b" and store.fallback().slot == "a" and store.fallback().version == 5
    assert store.inactive_slot() == "a"
    st = store.status()
    assert st["active"]["version"] == 6 and st["active"]["state"] == "trial" and st["fallback"]["version"] == 5


def test_the_third_install_replaces_the_fallback_slot(store, models):
    install(store, models[4], 4)
    install(store, models[5], 5)
    info = install(store, models[6], 6)
    assert info.slot == "a" and tree(info.dir) == tree(models[6])
    assert store.fallback().version == 5 and tree(store.fallback().dir) == tree(models[5])
    assert sorted(os.listdir(store.slots_dir)) == ["a", "b"] and os.listdir(store.staging_dir) == []


def test_activate_with_trial_false_commits_at_once(store, models):
    with store.begin("vibration", 5) as st:
        for rel in os.listdir(models[5]):
            st.write_file(rel, open(os.path.join(models[5], rel), "rb").read())
        info = store.activate(st, trial=False)
    assert info.state == "committed" and store.floor("vibration") == 5


def test_a_version_below_the_floor_is_refused_and_touches_nothing(store, models):
    install(store, models[5], 5)
    before = snapshot(store.root)
    with pytest.raises(RollbackError) as e:
        store.begin("vibration", 4)
    assert e.value.code == "rollback_refused" and "below this board's floor v5" in str(e.value)
    assert snapshot(store.root) == before
    install(store, models[5], 5)  # the committed version itself may come again (a damaged slot's remedy)


def test_a_version_that_failed_its_trial_is_never_retried(store, models, events):
    install(store, models[5], 5)
    install(store, models[6], 6, commit=False)
    back = store.rollback("latency 3.1x the previous model's")
    assert back.version == 5 and back.state == "committed" and tree(back.dir) == tree(models[5])
    assert store.failed_versions("vibration")[6]["reason"] == "latency 3.1x the previous model's"
    assert ("rolled_back", {"name": "vibration", "version": 6, "reason": "latency 3.1x the previous model's",
                            "to": {"slot": "a", "name": "vibration", "version": 5}}) in events
    before = snapshot(store.root)
    with pytest.raises(RollbackError, match="failed on this board before.*latency 3.1x"):
        store.begin("vibration", 6)
    assert snapshot(store.root) == before
    assert install(store, models[7], 7).version == 7  # a newer version is welcome
    [entry] = store.status()["failed"]["vibration"]
    assert entry == {"version": 6, "reason": "latency 3.1x the previous model's", "at": entry["at"]}


def test_rolling_back_the_first_install_returns_to_the_bundled_model(store, models):
    install(store, models[5], 5, commit=False)
    assert store.rollback("worker crashed") is None
    assert store.active() is None and store.status()["serving"] == "bundled"
    with pytest.raises(StoreError, match="the bundled model serves"):
        store.rollback("again")


def test_commit_needs_a_trial_of_the_version_judged(store, models):
    with pytest.raises(StoreError, match="nothing is installed"):
        store.commit()
    install(store, models[5], 5, commit=False)
    with pytest.raises(StoreError, match="no trial to commit for v6"):
        store.commit(6)
    store.commit(5)
    with pytest.raises(StoreError, match="is committed"):
        store.commit(5)
    with pytest.raises(StoreError, match="nothing to roll back for v4"):
        store.rollback("x", version=4)


def test_no_install_starts_while_a_trial_runs(store, models):
    install(store, models[5], 5, commit=False)
    with pytest.raises(Busy, match="vibration v5 is on trial"):
        store.begin("vibration", 6)
    assert store.active().state == "trial"


@pytest.mark.parametrize("damage, message", [
    (lambda d: os.unlink(os.path.join(d, "model.json")), "no model.json"),
    (lambda d: os.unlink(os.path.join(d, FULL)), "names vibration_full.tflite, which is not in the model"),
    (lambda d: open(os.path.join(d, "model.json"), "w").write("{"), "not valid JSON"),
    (lambda d: rename_model(d, "other"), "names the model 'other'"),
    (lambda d: os.symlink("/etc/hostname", os.path.join(d, "extra")), "not a regular file"),
])
def test_a_staged_tree_that_is_not_the_release_is_refused_and_touches_nothing(store, models, damage, message):
    install(store, models[5], 5)
    before = snapshot(store.root)
    st = store.begin("vibration", 6)
    for rel in os.listdir(models[6]):
        st.write_file(rel, open(os.path.join(models[6], rel), "rb").read())
    damage(st.dir)
    with pytest.raises(ValidationFailed, match=message) as e:
        store.activate(st)
    assert e.value.code == "validation_failed" and st.closed
    assert snapshot(store.root) == before and os.listdir(store.staging_dir) == []
    with pytest.raises(StoreError, match="staging is closed"):
        store.activate(st)
    install(store, models[6], 6)  # the lock was released


@pytest.mark.parametrize("rel", ["../escape", "/abs", "a/../../b", "", ".slot.json", "a//b"])
def test_staging_refuses_file_names_outside_the_model(store, rel):
    with store.begin("vibration", 1) as st:
        with pytest.raises(ValidationFailed, match="relative path inside the model"):
            st.path(rel)
        assert st.path("sub/x.bin").startswith(st.dir + os.sep)


@pytest.mark.parametrize("name, version", [("../x", 1), ("", 1), ("vibration", -1), ("vibration", True),
                                           ("vibration", "7")])
def test_a_malformed_release_name_or_version_is_refused(store, name, version):
    with pytest.raises(ValidationFailed):
        store.begin(name, version)
    store.begin("vibration", 1).abort()  # nothing held on


def test_a_lock_held_by_another_process_refuses_every_change_and_names_it(store, models):
    install(store, models[5], 5, commit=False)
    proc = storeproc.spawn("hold", store.root)
    try:
        assert proc.stdout.readline() == "held\n"
        for attempt in (lambda: store.begin("vibration", 6), store.commit, lambda: store.rollback("x"),
                        store.recover):
            with pytest.raises(Busy) as e:
                attempt()
            assert e.value.code == "update_busy"
            assert f"locked by pid {proc.pid} (storeproc: holding the lock for a test)" in str(e.value)
        assert store.active().state == "trial"  # reading needs no lock
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
    assert store.commit(5).state == "committed"


def test_one_change_at_a_time_within_a_process(store, models):
    st = store.begin("vibration", 5)
    with pytest.raises(Busy, match="busy in this process \\(install vibration v5\\)"):
        store.begin("vibration", 6)
    with pytest.raises(Busy):
        store.recover()
    assert store.status()["installing"] == {"slot": "a", "name": "vibration", "version": 5}
    st.abort()
    assert store.status()["installing"] is None
    assert store.recover() == Recovery.BUNDLED


# --- corrupt state files, damaged slots ------------------------------------------------------------------

def two_committed(store, models):
    install(store, models[5], 5)
    install(store, models[6], 6)
    return store.active(), store.fallback()


def test_a_corrupt_store_json_is_set_aside_and_the_committed_model_serves_again(store, models, events):
    active, fallback = two_committed(store, models)
    path = os.path.join(store.root, "store.json")
    open(path, "wb").write(b"\x00garbage")
    with pytest.raises(StoreError, match="not valid JSON") as e:
        store.active()
    assert e.value.code == "model_store_error"
    assert "not valid JSON" in store.status()["problems"][0]
    with pytest.raises(StoreError):
        store.begin("vibration", 7)
    assert store.recover() == Recovery.REPAIRED
    assert (store.active().slot, store.active().version) == (active.slot, 6)
    assert store.fallback().version == 5 and store.active().state == "committed"
    aside = [n for n in os.listdir(store.root) if n.startswith("store.json.corrupt-")]
    assert len(aside) == 1 and open(os.path.join(store.root, aside[0]), "rb").read() == b"\x00garbage"
    assert "state_corrupt" in [k for k, _ in events] and "store_rebuilt" in [k for k, _ in events]


def test_a_corrupt_store_json_during_a_trial_keeps_the_committed_model(store, models):
    install(store, models[5], 5)
    install(store, models[6], 6, commit=False)
    open(os.path.join(store.root, "store.json"), "w").write(json.dumps({"format": 1, "active": {"slot": "c"}}))
    assert store.recover() == Recovery.REPAIRED
    info = store.active()
    assert (info.version, info.state) == (5, "committed") and tree(info.dir) == tree(models[5])
    assert os.listdir(store.slots_dir) == [info.slot]  # the abandoned trial's slot went


def test_a_corrupt_store_json_with_only_an_uncommitted_model_resumes_its_trial(store, models):
    install(store, models[5], 5, commit=False)
    open(os.path.join(store.root, "store.json"), "w").write("[]")
    assert store.recover() == Recovery.TRIAL_RESUMED
    assert (store.active().version, store.active().state) == (5, "trial")


def test_a_corrupt_floors_file_is_rebuilt_from_what_is_installed(store, models, events):
    two_committed(store, models)
    open(os.path.join(store.root, "floors.json"), "w").write('{"format": 1, "floors": {"vibration": "x"}}')
    with pytest.raises(StoreError, match="floors.vibration"):
        store.begin("vibration", 4)  # refused, never taken as 'no floor'
    assert store.recover() == Recovery.REPAIRED
    assert store.floor("vibration") == 6
    with pytest.raises(RollbackError):
        store.begin("vibration", 5)
    assert [d["file"] for k, d in events if k == "state_corrupt"] == ["floors.json"]


def test_a_corrupt_failed_file_is_set_aside_and_starts_empty(store, models):
    install(store, models[5], 5)
    open(os.path.join(store.root, "failed.json"), "w").write("nope")
    assert store.recover() == Recovery.REPAIRED
    assert store.failed_versions("vibration") == {} and store.status()["problems"] == []
    assert any(n.startswith("failed.json.corrupt-") for n in os.listdir(store.root))


def test_a_committed_slot_whose_files_were_deleted_falls_back_without_marking_it_failed(store, models, events):
    active, fallback = two_committed(store, models)
    os.unlink(os.path.join(active.dir, FULL))
    assert store.recover() == Recovery.REPAIRED
    info = store.active()
    assert (info.slot, info.version) == (fallback.slot, 5) and tree(info.dir) == tree(models[5])
    assert store.failed_versions("vibration") == {}
    assert ("slot_damaged", {"slot": active.slot, "name": "vibration", "version": 6,
                             "reason": f"{FULL}: No such file or directory"}) in events
    assert install(store, models[6], 6).version == 6  # reinstalling the floor's version repairs it


def test_a_trial_slot_that_was_truncated_rolls_back(store, models):
    install(store, models[5], 5)
    trial = install(store, models[6], 6, commit=False)
    with open(os.path.join(trial.dir, FULL), "r+b") as f:
        f.truncate(100)
    assert store.recover() == Recovery.ROLLED_BACK
    assert store.active().version == 5


def test_a_damaged_fallback_is_dropped_and_a_damaged_last_slot_means_the_bundled_model(store, models, events):
    active, fallback = two_committed(store, models)
    shutil.rmtree(fallback.dir)
    assert store.recover() == Recovery.COMMITTED
    assert store.fallback() is None and "fallback_dropped" in [k for k, _ in events]
    os.unlink(os.path.join(active.dir, "model.json"))
    assert store.recover() == Recovery.REPAIRED
    assert store.active() is None and store.status()["serving"] == "bundled"


def test_a_trial_resumes_after_restarts_until_too_many(store, models):
    install(store, models[5], 5)
    install(store, models[6], 6, commit=False)
    assert store.recover(restarted=False) == Recovery.TRIAL_RESUMED and store.active().restarts == 0
    for n in (1, 2, 3):
        assert store.recover() == Recovery.TRIAL_RESUMED
        assert (store.active().version, store.active().restarts) == (6, n)
    assert store.recover() == Recovery.ROLLED_BACK
    assert store.active().version == 5
    assert store.failed_versions("vibration")[6]["reason"] == "the trial was interrupted by 4 restarts"


class Cut(Exception):
    """Stands for a crash at a step boundary (the crash test does the real thing with SIGKILL)."""


def test_a_rollback_cut_short_after_marking_the_version_is_finished_by_recover(tmp_path, models):
    def cut_at(step):
        def hook(name):
            if name == step:
                raise Cut(name)
        return hook

    root = str(tmp_path / "update")
    plain = ModelStore(root, reserve_bytes=0)
    install(plain, models[5], 5)
    install(plain, models[6], 6, commit=False)
    with pytest.raises(Cut):
        ModelStore(root, on_step=cut_at("rollback.marked")).rollback("disagreement 0.71 < 0.9")
    assert plain.active().version == 6  # marked failed, not yet switched
    assert plain.recover() == Recovery.ROLLED_BACK
    assert plain.active().version == 5


def test_recover_removes_stray_staging_unreferenced_slots_and_temporary_files_but_keeps_downloads(store, models):
    install(store, models[5], 5)
    partial = os.path.join(store.downloads_dir, "ab12.partial")
    open(partial, "wb").write(b"half a download")
    os.makedirs(os.path.join(store.staging_dir, "slot-b", "sub"))
    open(os.path.join(store.staging_dir, "slot-b", "sub", "x"), "wb").write(b"x")
    shutil.copytree(models[6], os.path.join(store.slots_dir, "b"))  # placed, never switched to
    open(os.path.join(store.root, ".store.json.k2j3.tmp"), "wb").write(b"{")
    before = tree(store.active().dir)
    assert store.recover() == Recovery.COMMITTED
    assert os.listdir(store.staging_dir) == ["downloads"] and open(partial, "rb").read() == b"half a download"
    assert os.listdir(store.slots_dir) == ["a"] and tree(store.active().dir) == before
    assert not [n for n in os.listdir(store.root) if n.endswith(".tmp")]


# --- free space (a real, small tmpfs) ---------------------------------------------------------------------

FS_BYTES = 1024 * 1024


@pytest.fixture
def small_fs(tmpfs):
    """A fresh tmpfs of FS_BYTES (the shared ``tmpfs`` fixture: root, never skipped)."""
    return tmpfs(FS_BYTES)


def free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_an_install_the_disk_cannot_take_is_refused_before_a_byte_is_written(small_fs, models):
    store = ModelStore(os.path.join(small_fs, "update"), reserve_bytes=64 * 1024)
    install(store, models[5], 5)
    before = snapshot(store.root)
    with pytest.raises(NoSpace) as e:
        store.begin("vibration", 6, size_hint=free(small_fs))  # fits, but not with the reserve kept
    assert e.value.code == "no_space" and "65536 kept in reserve" in str(e.value)
    assert snapshot(store.root) == before and os.listdir(store.staging_dir) == []
    install(store, models[6], 6)  # the model itself (~190 KB) fits


def test_the_fallback_slot_gives_way_when_that_alone_makes_room(small_fs, models):
    events = []
    store = ModelStore(os.path.join(small_fs, "update"), reserve_bytes=0,
                       on_event=lambda kind, data: events.append((kind, data)))
    install(store, models[5], 5)
    install(store, models[6], 6)
    need = free(small_fs) + 100 * 1024  # more than is free, less than free + the ~190 KB fallback
    with store.begin("vibration", 7, size_hint=need) as st:
        assert store.fallback() is None and [k for k, _ in events][-1] == "fallback_dropped"
        for rel in os.listdir(models[7]):
            st.write_file(rel, open(os.path.join(models[7], rel), "rb").read())
        assert store.activate(st).version == 7
    assert store.fallback().version == 6


def test_a_disk_that_fills_while_staging_is_no_space_and_the_model_is_untouched(small_fs, models):
    store = ModelStore(os.path.join(small_fs, "update"), reserve_bytes=0)
    install(store, models[5], 5)
    before = snapshot(store.root)
    with store.begin("vibration", 6) as st:  # no size hint: the disk fills while writing
        with pytest.raises(NoSpace, match="the disk is full"):
            st.write_file("big.bin", b"\0" * FS_BYTES)
    assert snapshot(store.root) == before and os.listdir(store.staging_dir) == []
    assert store.recover() == Recovery.COMMITTED
