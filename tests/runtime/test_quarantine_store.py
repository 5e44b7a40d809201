"""The quarantine survives restarts: a state file written atomically after every change, reloaded at start,
and a corrupt, unreadable or unwritable file never takes the agent down. Real files and real worker
processes throughout."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest

from device.runtime import errors as E
from device.runtime.quarantine import Quarantine
from device.runtime.runtime import Runtime
from tests.conftest import TEST_MODELS
from tests.runtime.crashmodel import make_crashing_model

pytestmark = pytest.mark.runtime

LOGGER = "device.runtime.quarantine"
NOW = 1_700_000_000.0
GOOD_SHA = "ab" * 32


@pytest.fixture
def model(tmp_path):
    f = tmp_path / "m.tflite"
    f.write_bytes(b"a model that crashes its worker")
    return f


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def stored(path):
    return json.loads(path.read_text())


# ----- persistence ---------------------------------------------------------------------------------------


def test_counts_and_quarantine_survive_a_restart(tmp_path, model):
    qf = tmp_path / "state" / "sub" / "quarantine.json"  # the directory is created on the first write
    q = Quarantine(threshold=3, wall=lambda: NOW, path=str(qf))
    assert not qf.exists()
    assert not q.crashed(str(model), "segv")
    assert Quarantine(threshold=3, path=str(qf)).crashes(str(model)) == 1

    assert not q.crashed(str(model), "segv") and q.crashed(str(model), "segv one too many")
    again = Quarantine(threshold=3, path=str(qf))
    assert again.is_quarantined(str(model)) and again.crashes(str(model)) == 3
    (entry,) = again.entries()
    assert entry == q.entries()[0]
    assert (entry.path, entry.crashes, entry.reason, entry.since) == (str(model), 3, "segv one too many", NOW)
    with pytest.raises(E.ModelQuarantined, match="quarantined after 3 consecutive worker crashes"):
        again.check(str(model))

    doc = stored(qf)
    assert doc["version"] == 1 and doc["counts"] == {entry.sha256: 3}
    assert doc["entries"] == [{"path": str(model), "sha256": entry.sha256, "crashes": 3,
                               "reason": "segv one too many", "since": NOW}]
    assert sorted(os.listdir(qf.parent)) == ["quarantine.json"]  # no temporary file left behind


def test_success_and_release_persist(tmp_path, model):
    qf = tmp_path / "q.json"
    q = Quarantine(threshold=2, path=str(qf))
    q.succeeded(str(model))  # nothing to reset: nothing is written
    assert not qf.exists()
    q.crashed(str(model), "segv")
    q.succeeded(str(model))
    assert stored(qf)["counts"] == {}
    assert Quarantine(threshold=2, path=str(qf)).crashes(str(model)) == 0

    assert [q.crashed(str(model), "segv") for _ in range(2)] == [False, True]
    digest = q.entries()[0].sha256
    assert Quarantine(threshold=2, path=str(qf)).is_quarantined(str(model))
    assert q.release(digest) is True
    after = Quarantine(threshold=2, path=str(qf))
    assert after.entries() == [] and after.crashes(str(model)) == 0 and not after.is_quarantined(str(model))
    assert stored(qf) == {"version": 1, "entries": [], "counts": {}}
    assert after.release(digest) is False


def test_reloaded_entries_quarantine_by_content(tmp_path, model):
    qf = tmp_path / "q.json"
    Quarantine(threshold=1, path=str(qf)).crashed(str(model), "segv")
    copy = tmp_path / "renamed.tflite"
    shutil.copyfile(model, copy)
    model.write_bytes(b"a fixed model")  # the original path now holds other content

    q = Quarantine(threshold=1, path=str(qf))
    assert q.is_quarantined(str(copy))  # a renamed copy of the bad file stays quarantined
    with pytest.raises(E.ModelQuarantined):
        q.check(str(copy))
    assert not q.is_quarantined(str(model))  # a changed file starts clean
    q.check(str(model))


# ----- a bad state file --------------------------------------------------------------------------------


MALFORMED = [
    pytest.param(b"\x00\xffnot json at all\x13", "not JSON", id="garbage-bytes"),
    pytest.param(b"[1, 2, 3]", "expected a JSON object, got an array", id="not-an-object"),
    pytest.param(b'{"version": 1, "entries": {}, "counts": {}}', "'entries': expected a JSON array",
                 id="entries-not-a-list"),
    pytest.param(b'{"version": 1, "counts": {}}', "no 'entries' field", id="entries-missing"),
    pytest.param(b'{"version": 2, "entries": [], "counts": {}}', "version is 2, this agent reads version 1",
                 id="wrong-version"),
    pytest.param(json.dumps({"version": 1, "entries": [], "counts": {"AB" * 32: 1}}).encode(),
                 "counts key: expected a SHA-256 digest (64 lowercase hex characters)", id="uppercase-sha256"),
    pytest.param(json.dumps({"version": 1, "counts": {}, "entries": [
        {"path": "/m.tflite", "sha256": "abc", "crashes": 3, "reason": "segv", "since": NOW}]}).encode(),
                 'entries[0].sha256: expected a SHA-256 digest (64 lowercase hex characters), got "abc"',
                 id="short-sha256"),
    pytest.param(json.dumps({"version": 1, "entries": [], "counts": {GOOD_SHA: -2}}).encode(),
                 "expected a non-negative integer, got -2", id="negative-count"),
    pytest.param(json.dumps({"version": 1, "counts": {}, "entries": [
        {"path": "/m.tflite", "sha256": GOOD_SHA, "crashes": -1, "reason": "segv", "since": NOW}]}).encode(),
                 "entries[0].crashes: expected a non-negative integer, got -1", id="negative-crashes"),
    pytest.param(json.dumps({"version": 1, "counts": {}, "entries": [
        {"path": "/m.tflite", "sha256": GOOD_SHA, "crashes": 3, "reason": "segv"}]}).encode(),
                 "entries[0]: missing field(s) since", id="entry-missing-field"),
    pytest.param(json.dumps({"version": 1, "entries": [], "counts": {GOOD_SHA: "3"}}).encode(),
                 'expected a non-negative integer, got "3"', id="count-as-string"),
]


@pytest.mark.parametrize("content, problem", MALFORMED)
def test_malformed_file_is_moved_aside_and_the_quarantine_starts_empty(tmp_path, model, caplog, content,
                                                                       problem):
    qf = tmp_path / "q.json"
    qf.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        q = Quarantine(threshold=1, wall=lambda: NOW, path=str(qf))
    assert q.entries() == [] and q.crashes(str(model)) == 0
    (message,) = warnings_of(caplog)
    aside = tmp_path / "q.json.corrupt-20231114T221320Z"  # the UTC stamp of NOW
    assert str(qf) in message and problem in message and str(aside) in message, message
    assert not qf.exists() and aside.read_bytes() == content  # kept for the technician
    assert q.crashed(str(model), "segv")  # and it works, writing a fresh file
    assert Quarantine(threshold=1, path=str(qf)).is_quarantined(str(model))


def test_unreadable_file_warns_and_is_left_in_place(tmp_path, model, caplog):
    qf = tmp_path / "q.json"
    qf.mkdir()  # reading it fails with an OSError whoever runs the test
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        q = Quarantine(threshold=1, path=str(qf))
    assert q.entries() == []
    (message,) = warnings_of(caplog)
    assert str(qf) in message and "cannot read it" in message, message
    assert qf.is_dir() and not list(tmp_path.glob("q.json.corrupt-*"))


@pytest.fixture
def unwritable_path(tmp_path):
    """A state path that cannot be written: in a 0o500 directory, or, when the mode bits do not bind (root),
    below a regular file, so creating the directory and the file both fail."""
    d = tmp_path / "readonly"
    d.mkdir()
    os.chmod(d, 0o500)
    try:
        (d / "probe").write_bytes(b"")
    except PermissionError:
        yield d / "q.json"
    else:
        (d / "probe").unlink()
        blocker = tmp_path / "blocker"
        blocker.write_bytes(b"a regular file, not a directory")
        yield blocker / "q.json"
    finally:
        os.chmod(d, 0o700)


def test_unwritable_location_warns_once_and_the_quarantine_works_in_memory(unwritable_path, model, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        q = Quarantine(threshold=3, path=str(unwritable_path))
        caplog.clear()  # below a regular file, even reading fails (and is logged); the writes matter here
        results = [q.crashed(str(model), "segv") for _ in range(4)]
        q.succeeded(str(model))
        digest = q.entries()[0].sha256
        released = q.release(digest)
    assert results == [False, False, True, False]
    assert released and not q.is_quarantined(str(model))
    (message,) = warnings_of(caplog)  # once per distinct error, not once per write
    assert str(unwritable_path) in message and "cannot write it" in message, message
    assert not unwritable_path.exists()


# ----- end to end: real workers, a restarted runtime ----------------------------------------------------


def test_a_quarantine_survives_a_new_runtime_and_release_lifts_it(settings, single_model, tmp_path):
    good = (TEST_MODELS / "mobilenet_v2_0.35_96_int8.tflite").read_bytes()
    manifest = single_model(make_crashing_model(good), "crashy.tflite")
    crashy = manifest.variant("default").path
    qf = tmp_path / "state" / "q.json"
    s = settings(isolation="process", quarantine_after=3, warmup_runs=0)

    first_events = []
    rt = Runtime(s, manifest=manifest, on_event=lambda k, d: first_events.append(k), quarantine_path=str(qf))
    rt.start()  # crashes until quarantined, then nothing can serve: the runtime says so and does not raise
    assert first_events == ["worker_crashed", "worker_crashed", "model_quarantined", "not_serving"]
    assert not rt.serving
    (entry,) = rt.quarantine.entries()
    rt.close()
    on_disk = qf.read_bytes()

    # The agent restarts: the new runtime refuses the file at once, without a worker to crash.
    events = []
    rt2 = Runtime(s, manifest=manifest, on_event=lambda k, d: events.append((k, d)), quarantine_path=str(qf))
    assert rt2.quarantine.entries() == [entry]
    rt2.start()
    st = rt2.status()
    assert not st["serving"] and "crashy.tflite is quarantined after 3 consecutive worker crashes" in \
        st["not_serving_reason"]
    assert st["crashes"] == 0 and st["worker_pid"] is None and rt2.worker_pid is None
    assert st["quarantined"] == [{"path": crashy, "sha256": entry.sha256, "crashes": 3, "reason": entry.reason,
                                  "since": entry.since}]
    assert rt2.quarantine.crashes(crashy) == 3  # no new crash was counted, and nothing was rewritten
    assert qf.read_bytes() == on_disk
    assert [k for k, _ in events] == ["not_serving"]  # the quarantine was reported when it happened

    # An operator releases it: the event goes out, the release is on disk, and the file is loaded again at
    # once by real workers (it still crashes, so it is counted, quarantined and stored again).
    assert rt2.release_quarantine("cd" * 32) is False and len(events) == 1  # nothing to release: no event
    assert rt2.release_quarantine(entry.sha256) is True
    assert events[1] == ("quarantine_released", {"sha256": entry.sha256, "by": None})
    assert [k for k, _ in events[2:]] == ["worker_crashed", "worker_crashed", "model_quarantined"]
    assert not rt2.serving  # still not serving: no second not_serving event for the same outage
    (again,) = stored(qf)["entries"]
    assert again["sha256"] == entry.sha256 and again["crashes"] == 3
    assert Quarantine(threshold=3, path=str(qf)).crashes(crashy) == 3
    rt2.close()
