"""The board's client of an update repository, metadata side: repositories made with ``fieldnode repo``, read over
a real HTTP server and from a directory, with the metadata tampered with in every way the client must refuse
(each case asserting its code), and the clock guard of boards without a real-time clock."""

from __future__ import annotations

import datetime
import json
import os
import shutil

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from device.update.client import BoardFacts, Repository
from device.update.errors import UpdateError
from tests.update.httpserver import RangeServer
from tests.update.reposim import BoardClock, World, publish_at, repo


@pytest.fixture
def world(tmp_path, capsys):
    return World(tmp_path, capsys)


def _code(call) -> UpdateError:
    with pytest.raises(UpdateError) as info:
        call()
    return info.value


def test_a_board_refreshes_downloads_and_decrypts_over_http_across_a_dropped_connection(world, tmp_path):
    with RangeServer(world.path) as srv:
        client = world.client(base=srv.url)
        client.refresh()
        (release,) = client.releases()
        assert (release.path, release.name, release.variant, release.version, release.release_id) == \
            (World.PATH, "vibration", "full", 3, world.release)
        assert (release.hwclass, release.ring, release.min_agent, release.requires) == (("rpi4",), "stable", "0.1.0",
                                                                                        None)
        client.check_target(release, BoardFacts("rpi4"))
        key = client.fetch_release_key(release, "board-a", [world.board[0]])
        srv.drop_after(100_000)  # the ciphertext's first response is cut: the download resumes with a range
        seen = []
        cipher = client.download(release, str(tmp_path / "staging"), progress=lambda have, n: seen.append(have))
        assert seen[-1] == release.target.length
        assert ("bytes=100000-" in [r for _, r in srv.requests])  # resumed at the byte the link dropped at
        out = tmp_path / "slot" / "model.tflite"
        out.parent.mkdir()
        client.decrypt_verified(cipher, key, str(out), release)
        assert out.read_bytes() == world.model
        vectors = client.download(release.test_vectors, str(tmp_path / "staging"))
        client.decrypt_verified(vectors, key, str(tmp_path / "slot" / "vectors.npz"), release.test_vectors)
        assert (tmp_path / "slot" / "vectors.npz").read_bytes() == world.vectors
        assert sorted(os.listdir(out.parent)) == ["model.tflite", "vectors.npz"]  # no temporary file left
        # The next run starts from what the board trusts (metadata_dir), and asks the server only what is new.
        before = len(srv.requests)
        again = world.client(base=srv.url)
        again.refresh()
        fetched = [p for p, _ in srv.requests[before:]]
        assert fetched == ["/metadata/2.root.json", "/metadata/timestamp.json"]
        assert again.releases()[0].target == release.target
    state = json.load(open(client.not_before.path))
    assert state["not_before"] == again.clock.time()  # the later of the two refreshes


def test_a_usb_export_is_read_through_file_urls(world, tmp_path, capsys):
    stick = tmp_path / "stick" / "fieldnode"
    repo(capsys, "export", world.path, "--usb", str(stick))
    client = Repository(str(tmp_path / "board" / "metadata"), root=open(world.file("metadata/1.root.json"), "rb")
                        .read(), metadata_url=(stick / "metadata").as_uri(), targets_url=(stick / "targets").as_uri(),
                        grants_url=str(stick / "grants"))  # a plain directory works as well as a file:// URL
    (release,) = client.releases()  # refreshes first
    key = client.fetch_release_key(release, "board-b", [world.other[0]])
    cipher = client.download(release, str(tmp_path / "staging"))
    client.decrypt_verified(cipher, key, str(tmp_path / "model.tflite"), release)
    assert (tmp_path / "model.tflite").read_bytes() == world.model


def _flip_signature(world):
    path = world.file("metadata/timestamp.json")
    doc = json.load(open(path))
    sig = doc["signatures"][0]["sig"]
    doc["signatures"][0]["sig"] = ("0" if sig[0] != "0" else "1") + sig[1:]
    json.dump(doc, open(path, "w"))


def _edit_targets(world):
    path = world.file("metadata/2.targets.json")
    doc = json.load(open(path))
    doc["signed"]["targets"][World.PATH]["custom"]["hwclass"] = ["anything"]
    json.dump(doc, open(path, "w"))


def _wrong_key(world):
    path = world.file("metadata/2.targets.json")
    md = Metadata.from_file(path)
    md.signatures.clear()
    md.sign(CryptoSigner.generate_ed25519())
    md.to_file(path)


def _garbage(world):
    with open(world.file("metadata/2.snapshot.json"), "wb") as fh:
        fh.write(b"\x00\xffnot json at all")


def _endless(world):
    with open(world.file("metadata/timestamp.json"), "ab") as fh:
        fh.write(b" " * 100_000)


def _missing(world):
    os.remove(world.file("metadata/timestamp.json"))


@pytest.mark.parametrize("tamper, code, words", [
    (_flip_signature, "metadata_signature_invalid", "timestamp metadata carries no valid signature"),
    (_edit_targets, "metadata_signature_invalid", "targets metadata carries no valid signature"),
    (_wrong_key, "metadata_signature_invalid", "targets metadata carries no valid signature"),
    (_garbage, "metadata_invalid", "snapshot metadata is malformed"),
    (_endless, "size_exceeded", "timestamp metadata is longer than allowed"),
    (_missing, "download_failed", "timestamp metadata could not be fetched"),
], ids=lambda v: getattr(v, "__name__", None) or str(v)[:12])
def test_tampered_metadata_is_refused_with_its_code_and_role(world, tamper, code, words):
    tamper(world)
    client = world.client()
    err = _code(client.refresh)
    assert (err.code, words in str(err)) == (code, True), str(err)
    assert isinstance(err.__cause__, Exception)  # raised from python-tuf's own error
    assert _code(client.releases).code == code  # nothing trusted: releases() refreshes again and fails again
    assert not os.path.exists(client.not_before.path)


def test_a_targets_role_signed_by_fewer_keys_than_its_threshold(tmp_path, capsys):
    world = World(tmp_path, capsys, "--targets-keys", "2", "--targets-threshold", "2")
    world.client("good").refresh()
    path = world.file("metadata/2.targets.json")
    md = Metadata.from_file(path)
    assert len(md.signatures) == 2
    md.signatures.pop(next(iter(md.signatures)))
    md.to_file(path)
    err = _code(world.client().refresh)
    assert err.code == "too_few_signatures" and "targets metadata is signed by 1 of the 2" in str(err)


def test_replayed_metadata_is_a_rollback(world, capsys):
    old = open(world.file("metadata/timestamp.json"), "rb").read()
    repo(capsys, "publish", world.path)
    world.client().refresh()  # the board has seen timestamp 3
    with open(world.file("metadata/timestamp.json"), "wb") as fh:
        fh.write(old)  # a mirror serves timestamp 2 again
    err = _code(world.client().refresh)
    assert err.code == "rollback_refused" and "timestamp metadata is older" in str(err) and "must be >= 3" in str(err)
    world.client("fresh").refresh()  # timestamp 2 is validly signed and not expired: only a board that saw 3 can tell


def test_expired_metadata_and_expiry_judged_at_the_boards_clock(world):
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    # A board whose clock runs 400 days ahead: the root (365 days) has expired at its time.
    ahead = world.client("ahead", clock=BoardClock(now.timestamp() + 400 * 86400))
    err = _code(ahead.refresh)
    assert err.code == "metadata_expired" and "root metadata has expired" in str(err)
    # A repository published ten days ago and never again: its 7-day timestamp has expired (a freeze).
    publish_at(world.path, now - datetime.timedelta(days=10))
    err = _code(world.client().refresh)
    assert err.code == "metadata_expired" and "timestamp metadata has expired" in str(err)


def test_the_clock_guard_refuses_a_clock_earlier_than_the_last_refresh(world):
    t = datetime.datetime.now(datetime.timezone.utc).timestamp()
    world.client(clock=BoardClock(t)).refresh()
    state = world.client().not_before.path
    assert json.load(open(state))["not_before"] == t
    # A board booted without a real-time clock reads 1970 (or the day it was flashed).
    err = _code(world.client(clock=BoardClock(86400.0)).refresh)
    assert err.code == "clock_behind"
    text = str(err)
    assert "the clock reads 1970-01-02T00:00:00Z" in text
    assert datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M") in text
    assert "NTP" in text and "date -s" in text and state in text
    # An NTP step of a minute back is no lost clock; and the stored time never moves back.
    world.client(clock=BoardClock(t - 60)).refresh()
    assert json.load(open(state))["not_before"] == t
    world.client(clock=BoardClock(t + 3600)).refresh()
    assert json.load(open(state))["not_before"] == t + 3600


def test_a_corrupt_clock_state_is_set_aside_and_counts_as_no_evidence(world):
    client = world.client()
    os.makedirs(os.path.dirname(client.not_before.path))
    with open(client.not_before.path, "w") as fh:
        fh.write('{"not_before": "yesterday"}')
    client.refresh()
    names = os.listdir(os.path.dirname(client.not_before.path))
    assert [n for n in names if ".corrupt-" in n]
    assert json.load(open(client.not_before.path))["not_before"] == client.clock.time()


def test_a_bad_configured_root_or_url_is_refused_with_its_code(world, tmp_path):
    def make(root=b"{}", **urls):
        args = {"metadata_url": "file:///nowhere", "targets_url": "file:///nowhere", "grants_url": "file:///x"}
        return Repository(str(tmp_path / "b" / "metadata"), root=root, **(args | urls))

    err = _code(lambda: make(b"not json").refresh())
    assert err.code == "metadata_invalid" and "the trusted root from the configuration" in str(err)
    timestamp = open(world.file("metadata/timestamp.json"), "rb").read()
    err = _code(lambda: make(timestamp).refresh())
    assert err.code == "metadata_invalid" and "the trusted root from the configuration" in str(err)
    assert _code(lambda: make(b"")).code == "metadata_invalid"
    err = _code(lambda: make(metadata_url="ftp://mirror/metadata/"))
    assert err.code == "download_failed" and "metadata_url 'ftp://mirror/metadata/'" in str(err)
    # A root that is not signed by its own keys.
    doc = json.load(open(world.file("metadata/1.root.json")))
    doc["signed"]["version"] = 1
    doc["signed"]["expires"] = "2099-01-01T00:00:00Z"
    err = _code(lambda: make(json.dumps(doc).encode()).refresh())
    assert err.code == "metadata_signature_invalid" and "the trusted root from the configuration" in str(err)


def test_a_board_keeps_its_trusted_state_when_the_repository_goes_away(world, tmp_path):
    world.client().refresh()
    shutil.rmtree(world.file("metadata"))
    err = _code(world.client().refresh)
    assert err.code == "download_failed"
    assert os.path.isfile(tmp_path / "board" / "metadata" / "timestamp.json")


def test_the_boards_worked_example_in_docs_reads_the_stick(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "docs", "updates.md"), encoding="utf-8") as fh:
        text = fh.read()
    operator = text.split("### Worked example", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    board = text.split("### On the board", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "fieldnode").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tools.cli "$@"\n')
    (shims / "fieldnode").chmod(0o755)
    (shims / "python3").symlink_to(sys.executable)
    env = dict(os.environ, PATH=f"{shims}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=root)
    done = subprocess.run(["bash", "-e", "-c", operator], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-c", board], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "vibration full 2 verified and decrypted\n"
    from device.runtime.manifest import bundled_model_dir

    with open(os.path.join(bundled_model_dir(), "vibration_full.tflite"), "rb") as fh:
        assert (tmp_path / "vibration_full.tflite").read_bytes() == fh.read()
