"""Quarantine bookkeeping: consecutive failures per file content, reset on success, release by digest."""

import pytest

from device.runtime.errors import ModelQuarantined
from device.runtime.quarantine import Quarantine


def test_consecutive_failures_quarantine_and_success_resets(tmp_path):
    f = tmp_path / "m.tflite"
    f.write_bytes(b"model one")
    q = Quarantine(threshold=3, wall=lambda: 1234.0)
    assert not q.crashed(str(f), "boom") and not q.crashed(str(f), "boom")
    q.succeeded(str(f))  # a success in between: the count starts over
    assert q.crashes(str(f)) == 0
    assert [q.crashed(str(f), "boom") for _ in range(3)] == [False, False, True]
    (entry,) = q.entries()
    assert entry.crashes == 3 and entry.since == 1234.0 and entry.reason == "boom"
    with pytest.raises(ModelQuarantined, match="quarantined after 3 consecutive worker crashes"):
        q.check(str(f))


def test_identity_is_the_content_not_the_name(tmp_path):
    bad, copy = tmp_path / "a.tflite", tmp_path / "b.tflite"
    bad.write_bytes(b"bad bytes")
    copy.write_bytes(b"bad bytes")
    q = Quarantine(threshold=1)
    assert q.crashed(str(bad), "segv")
    assert q.is_quarantined(str(copy))  # a renamed copy stays quarantined
    bad.write_bytes(b"a fixed model")  # a replaced file starts clean
    assert not q.is_quarantined(str(bad))


def test_release_lifts_the_quarantine(tmp_path):
    f = tmp_path / "m.tflite"
    f.write_bytes(b"x")
    q = Quarantine(threshold=1)
    q.crashed(str(f), "segv")
    digest = q.entries()[0].sha256
    assert q.release(digest) is True and q.release(digest) is False
    assert not q.is_quarantined(str(f)) and q.crashes(str(f)) == 0


def test_threshold_must_be_positive():
    with pytest.raises(ValueError):
        Quarantine(threshold=0)
