"""Runtime.switch_model: a hot swap to another model directory (an update's slot) and back, with real workers on
copies of the vibration model: no request dropped or mislabelled, the old worker retired, the variant request
carried over, and a model that cannot serve never replacing one that does."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import pytest

from device.runtime import errors as E
from device.runtime.manifest import bundled_model_dir, load_manifest
from device.runtime.runtime import Runtime
from drivers.sim.signal import WINDOW, VibrationSource


def copy_model(dst, version: str, *, labels=None, variants=("full", "lite"), garbage=False):
    """A copy of the bundled vibration model, with its own version (and optionally permuted labels, fewer
    variants, or files that are not models at all)."""
    os.makedirs(dst)
    src = bundled_model_dir()
    with open(os.path.join(src, "model.json")) as f:
        meta = json.load(f)
    meta["version"] = version
    meta["variants"] = {v: meta["variants"][v] for v in variants}
    meta["default_variant"] = variants[0]
    if labels is not None:
        meta["labels"] = labels
    for v in variants:
        name = meta["variants"][v]["file"]
        if garbage:
            with open(os.path.join(dst, name), "wb") as f:
                f.write(b"TFL3 this is not a model" * 10)
        else:
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(dst, "model.json"), "w") as f:
        json.dump(meta, f)
    return load_manifest(str(dst))


WINDOWS = [VibrationSource(seed=3).read(WINDOW) for _ in range(16)]


def test_switch_under_continuous_load_drops_and_mislabels_nothing(tmp_path, settings):
    a = copy_model(tmp_path / "a", "1")
    permuted = ["loose_mount", "bearing_fault", "imbalance", "normal"]
    b = copy_model(tmp_path / "b", "2", labels=permuted)
    events = []
    rt = Runtime(settings(isolation="process"), manifest=a, on_event=lambda k, d: events.append((k, d)))
    rt.start()
    stop = threading.Event()
    log, errors = [], []

    def load():
        i = 0
        while not stop.is_set():
            try:
                started = time.monotonic()
                p = rt.predict(WINDOWS[i % len(WINDOWS)])
                # the label always comes from the model that answered, never from the other one's manifest
                assert p.label == p.model.labels[p.index]
                log.append((started, time.monotonic(), p.model.version, p.label, p.index))
            except Exception as exc:  # noqa: BLE001 - any failure is the defect under test
                errors.append(exc)
            i += 1

    t = threading.Thread(target=load)
    t.start()
    try:
        time.sleep(0.2)
        pid_a = rt.worker_pid
        swaps = []
        for target in (b, a):
            begin = time.monotonic()
            rt.switch_model(target)
            swaps.append((begin, time.monotonic(), target.version))
            time.sleep(0.3)
    finally:
        stop.set()
        t.join(30)
    st = rt.status()
    rt.close()
    assert errors == []
    for i, (begin, end, version) in enumerate(swaps):
        assert any(begin <= done <= end for _, done, *_ in log), "no request was served during the switch"
        nxt = swaps[i + 1][0] if i + 1 < len(swaps) else float("inf")
        after = {v for started, _, v, *_ in log if end < started < nxt}
        assert after == {version}
    served_b = [(lab, i) for _, _, v, lab, i in log if v == "2"]
    assert served_b and all(lab == permuted[i] for lab, i in served_b)
    assert [(d["from_version"], d["to_version"]) for k, d in events if k == "model_changed"] == [("1", "2"), ("2", "1")]
    assert st["model_version"] == "1" and st["failures"] == 0 and st["swaps"] == 2
    assert pid_a is not None and not _alive(pid_a)  # the first model's worker was retired


def test_a_model_that_cannot_serve_leaves_the_one_before_serving(tmp_path, settings):
    a = copy_model(tmp_path / "a", "1")
    bad = copy_model(tmp_path / "bad", "2", garbage=True)
    events = []
    with Runtime(settings(isolation="process"), manifest=a, on_event=lambda k, d: events.append((k, d))) as rt:
        pid = rt.worker_pid
        with pytest.raises(E.NotServing) as err:
            rt.switch_model(bad)
        assert "vibration 2 cannot serve" in str(err.value) and "full" in str(err.value)
        assert rt.manifest is a and rt.worker_pid == pid and rt.serving
        assert rt.predict(WINDOWS[0]).model is a
    assert not [k for k, _ in events if k == "model_changed"]


def test_the_variant_request_carries_over_or_becomes_auto(tmp_path, settings):
    a = copy_model(tmp_path / "a", "1")
    full_only = copy_model(tmp_path / "f", "2", variants=("full",))
    with Runtime(settings(isolation="inline", variant="lite", threads=1), manifest=a) as rt:
        assert rt.variant == "lite"
        b = copy_model(tmp_path / "b", "3")
        rt.switch_model(b)
        assert rt.variant == "lite" and rt.status()["requested_variant"] == "lite" and rt.status()["threads"] == 1
        rt.switch_model(full_only)  # no lite in it: its default serves
        assert rt.variant == "full" and rt.status()["requested_variant"] == "auto"
        assert rt.latency.count == 0  # the figures are the new model's
        rt.predict(WINDOWS[1])
        assert rt.latency.count == 1


def test_before_start_a_switch_changes_what_starts(tmp_path, settings):
    a = copy_model(tmp_path / "a", "1")
    b = copy_model(tmp_path / "b", "2")
    events = []
    rt = Runtime(settings(isolation="inline"), manifest=a, on_event=lambda k, d: events.append((k, d)))
    rt.switch_model(b)
    assert rt.manifest is b and not rt.serving and events == []
    with rt:
        assert rt.predict(WINDOWS[2]).model is b


def test_a_runtime_that_was_down_serves_again_on_the_new_model(tmp_path, settings):
    bad = copy_model(tmp_path / "bad", "1", garbage=True)
    good = copy_model(tmp_path / "good", "2")
    events = []
    with Runtime(settings(isolation="inline"), manifest=bad, on_event=lambda k, d: events.append((k, d))) as rt:
        assert not rt.serving
        rt.switch_model(good)
        assert rt.serving and rt.status()["not_serving_reason"] is None
    kinds = [k for k, _ in events]
    assert kinds.index("not_serving") < kinds.index("model_changed") < kinds.index("serving")


def _alive(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:  # a zombie child of this process still answers kill(0) until it is reaped
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return False
        except OSError:
            return False
        time.sleep(0.05)
    return True
