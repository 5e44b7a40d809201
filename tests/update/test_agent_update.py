"""The agent with the A/B store and the health gate, end to end on a virtual board (real store files, real
workers where the worker is the point, the real governor and sensor): a healthy model on trial is committed, a
model that disagrees with the previous one or crashes its worker is rolled back by itself, and a reboot in the
middle of a trial resumes it from zero windows."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest

from device import config
from device.agent.agent import Agent
from device.runtime.manifest import bundled_model_dir
from device.update.store.store import ModelStore
from tests.runtime.crashmodel import make_crashing_model
from tests.waiting import eventually

DEV = "dev-a"
DERANGED = ["imbalance", "normal", "loose_mount", "bearing_fault"]  # no label keeps its place


def put_on_trial(state_dir: str, version: int, mutate=None):
    """Installs a copy of the bundled model as ``version`` into the store, on trial (as an install leaves it)."""
    store = ModelStore.for_state_dir(state_dir, who="test")
    staging = store.begin("vibration", version)
    for name in os.listdir(bundled_model_dir()):
        shutil.copyfile(os.path.join(bundled_model_dir(), name), staging.path(name))
    edit_manifest(staging.dir, version=str(version))
    if mutate is not None:
        mutate(staging.dir)
    return store.activate(staging, trial=True)


def edit_manifest(model_dir: str, **changes) -> None:
    path = os.path.join(model_dir, "model.json")
    with open(path) as f:
        meta = json.load(f)
    meta.update(changes)
    with open(path, "w") as f:
        json.dump(meta, f)


def agent_config(tmp_path, *, trial_s=2.0, min_windows=8, isolation="inline", shadow=True, extra="") -> config.Config:
    return config.loads(f"""
[device]
id = "{DEV}"
state_dir = "{tmp_path / 'state'}"
runtime_dir = "{tmp_path / 'run'}"
[runtime]
isolation = "{isolation}"
delegate = "cpu"
quarantine_after = 1
start_timeout_s = 30
{extra}
[drivers]
virtual_board = "rpi4"
[power]
step_s = 0.5
[update]
trial_s = {trial_s}
trial_min_windows = {min_windows}
latency_factor = 5.0
shadow = {"true" if shadow else "false"}
min_agreement = 0.9
""")


class Running:
    """An agent running in a thread, with every event it emitted."""

    def __init__(self, cfg):
        self.events: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.agent = Agent(cfg, on_event=self._event)
        self.thread = threading.Thread(target=self.agent.run, daemon=True)

    def _event(self, kind, data):
        with self.lock:
            self.events.append((kind, dict(data)))

    def of(self, kind: str) -> list[dict]:
        with self.lock:
            return [d for k, d in self.events if k == kind]

    def wait(self, cond, timeout=25.0, what="the condition"):
        eventually(cond, timeout=timeout, what=what, detail=lambda: f"events: {[k for k, _ in self.events]}")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.agent.stop()
        self.thread.join(30)


def test_a_healthy_model_on_trial_is_committed(tmp_path):
    state = str(tmp_path / "state")
    put_on_trial(state, 2)
    with Running(agent_config(tmp_path)) as r:
        a = r.agent
        assert a.updates.source == "store" and a.updates.recovery == "trial_resumed"
        assert a.runtime.manifest.root == os.path.join(state, "update", "slots", "a")
        r.wait(lambda: r.of("update_committed"), what="the commit")
        st = a.status()["update"]
    committed = r.of("update_committed")[0]
    assert committed["version"] == 2 and committed["windows"] >= 8 and committed["agreement"] == 1.0
    trial = r.of("update_trial")
    assert trial[0]["version"] == 2 and trial[0]["windows"] == 0 and trial[0]["verdict"] is None
    assert trial[-1]["verdict"] == "pass" and trial[-1]["p50_ms"] > 0
    assert r.of("update_shadow")[0]["state"] == "started"
    store = ModelStore.for_state_dir(state)
    assert store.active().state == "committed" and store.floor("vibration") == 2
    assert st["trial"] is None and st["store"]["active"]["state"] == "committed"
    assert a.birth()["update"]["active"]["version"] == 2 and a.birth()["update"]["on_trial"] is False
    assert not r.of("update_rolled_back")


@pytest.mark.parametrize("previous", ["bundled", "slot"])
def test_a_model_that_disagrees_with_the_previous_one_is_rolled_back(tmp_path, previous):
    state = str(tmp_path / "state")
    if previous == "slot":  # v2 committed in slot a: it is the shadow, and what serves after the rollback
        put_on_trial(state, 2)
        ModelStore.for_state_dir(state, who="test").commit(2)
    put_on_trial(state, 3, mutate=lambda d: edit_manifest(d, labels=DERANGED))
    with Running(agent_config(tmp_path, trial_s=60)) as r:
        a = r.agent
        r.wait(lambda: r.of("update_rolled_back"), what="the rollback")
        # the board goes on classifying, with the previous model
        n = a.results
        r.wait(lambda: a.results >= n + 2 and a.last_result.model == "vibration", what="results after it")
        labels_after = a.last_result.scores
    rb = r.of("update_rolled_back")[0]
    back_to, back_version = ("bundled", "1.0.0") if previous == "bundled" else ("vibration v2", "2")
    assert rb["version"] == 3 and rb["code"] == "trial_failed" and "disagrees" in rb["reason"] and rb["to"] == back_to
    assert r.of("update_trial")[-1]["verdict"] == "fail"
    assert r.of("update_shadow")[0]["model_version"] == back_version
    assert [(d["from_version"], d["to_version"]) for d in r.of("model_changed")] == [("3", back_version)]
    back_dir = bundled_model_dir() if previous == "bundled" else os.path.join(state, "update", "slots", "a")
    assert a.runtime.manifest.root == back_dir and a.updates.source == ("bundled" if previous == "bundled" else "store")
    assert list(labels_after) == ["normal", "imbalance", "bearing_fault", "loose_mount"]
    store = ModelStore.for_state_dir(state)
    assert (store.active().version if store.active() else None) == (None if previous == "bundled" else 2)
    assert 3 in store.failed_versions("vibration")
    assert "disagrees" in store.failed_versions("vibration")[3]["reason"]
    assert not r.of("update_committed")


def crash_full(model_dir: str) -> None:
    path = os.path.join(model_dir, "vibration_full.tflite")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(make_crashing_model(data))


def test_a_model_that_crashes_its_worker_is_rolled_back_by_itself(tmp_path):
    state = str(tmp_path / "state")
    put_on_trial(state, 4, mutate=crash_full)
    with Running(agent_config(tmp_path, trial_s=60, isolation="process")) as r:
        a = r.agent
        r.wait(lambda: r.of("update_rolled_back"), timeout=40, what="the rollback")
        r.wait(lambda: a.serving and a.runtime.manifest.root == bundled_model_dir(), what="the bundled model")
        n = a.results
        r.wait(lambda: a.results > n, what="a result from the bundled model")
        quarantined = [q["path"] for q in a.runtime.status()["quarantined"]]
    rb = r.of("update_rolled_back")[0]
    # quarantine_after = 1: the first crash quarantines the file (the event that fails the trial names the signal)
    assert rb["version"] == 4 and rb["code"] == "trial_failed" and "SIGSEGV" in rb["reason"]
    assert r.of("model_quarantined") and r.of("variant_fallback")[0]["to"] == "lite"  # it even served, on lite
    assert 4 in ModelStore.for_state_dir(state).failed_versions("vibration")
    assert quarantined == [os.path.join(state, "update", "slots", "a", "vibration_full.tflite")]  # only its file


def test_a_reboot_mid_trial_resumes_it_from_zero_windows(tmp_path):
    state = str(tmp_path / "state")
    put_on_trial(state, 5)
    with Running(agent_config(tmp_path, trial_s=120, shadow=False)) as r:
        r.wait(lambda: (r.agent.updates.status()["trial"] or {}).get("windows", 0) >= 3, what="three trial windows")
    store = ModelStore.for_state_dir(state)
    assert store.active().state == "trial" and store.active().restarts == 1
    # the "reboot": a new agent on the same state directory
    with Running(agent_config(tmp_path, trial_s=1, min_windows=4, shadow=False)) as r:
        st = r.agent.updates.status()
        assert st["recovery"] == "trial_resumed" and st["trial"]["windows"] == 0
        assert st["store"]["active"]["restarts"] == 2
        r.wait(lambda: r.of("update_committed"), what="the commit after the reboot")
    assert r.of("store_trial_resumed")[0]["restarts"] == 2
    assert r.of("update_committed")[0]["agreement"] is None  # no shadow: not judged, and said so
    assert ModelStore.for_state_dir(state).active().state == "committed"


def test_a_trial_that_keeps_taking_the_board_down_is_rolled_back_at_start(tmp_path):
    state = str(tmp_path / "state")
    put_on_trial(state, 6)
    events = []
    for _ in range(4):  # restarts 1, 2, 3 resume; the 4th is one too many (max_trial_restarts = 3)
        a = Agent(agent_config(tmp_path), on_event=lambda k, d: events.append((k, d)))
        a.close()
    assert a.updates.recovery == "rolled_back" and a.updates.source == "bundled"
    assert a.runtime.manifest.root == bundled_model_dir()
    rb = [d for k, d in events if k == "update_rolled_back"]
    assert len(rb) == 1 and rb[0]["by"] == "recovery" and "restarts" in rb[0]["reason"]
    assert 6 in ModelStore.for_state_dir(state).failed_versions("vibration")


def test_runtime_model_overrides_the_store(tmp_path):
    state = str(tmp_path / "state")
    put_on_trial(state, 7)
    a = Agent(agent_config(tmp_path, extra=f'model = "{bundled_model_dir()}"'))
    try:
        st = a.status()["update"]
        assert st["source"] == "override" and st["override"] == bundled_model_dir() and st["trial"] is None
        assert st["store"]["active"]["version"] == 7 and st["store"]["active"]["restarts"] == 0  # not counted
        with pytest.raises(Exception) as err:
            a.updates.start_install()
        assert getattr(err.value, "code", None) == "model_store_error" and "runtime.model" in str(err.value)
    finally:
        a.close()


def test_a_worker_killed_from_outside_does_not_fail_the_trial(tmp_path):
    """The runtime says a kill from outside (an operator, the OOM killer) is not the model's fault with counted false
    (tests/runtime/test_external_kills.py); the agent's trial reads it, and the model is committed all the same."""
    state = str(tmp_path / "state")
    put_on_trial(state, 8)
    with Running(agent_config(tmp_path, trial_s=2, min_windows=4, shadow=False)) as r:
        r.wait(lambda: r.agent.updates.status()["trial"], what="the trial")
        r.agent.updates.on_event("worker_crashed", {"message": "inference worker (pid 1) was killed by signal "
                                                    "SIGKILL (killed from outside: not counted against the model)",
                                                    "variant": "full", "path": "", "counted": False})
        r.wait(lambda: r.of("update_committed") or r.of("update_rolled_back"), what="the trial's verdict")
    assert r.of("update_committed") and not r.of("update_rolled_back")
