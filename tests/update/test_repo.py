"""``fieldnode repo``: repositories built with the tool and read by python-tuf's own client (tests/update/reposim).

Real files, real keys, real age encryption; the judge of every signature, version and hash is
``tuf.ngclient.Updater``.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata

from device.update import age
from tests.update.reposim import open_release, repo, repo_error, updater
from tools.repo.release import grant_path

MODEL = bytes(range(256)) * 700 + b"tail"  # 179,204 bytes: three full 64 KiB age chunks and a partial one
VECTORS = b"PK\x03\x04 not really an npz, only bytes to carry" * 20


@pytest.fixture
def files(tmp_path):
    model = tmp_path / "model.tflite"
    model.write_bytes(MODEL)
    vectors = tmp_path / "vectors.npz"
    vectors.write_bytes(VECTORS)
    return model, vectors


@pytest.fixture
def made(tmp_path, capsys):
    """A fresh repository (2-of-3 root keys, 1-of-1 elsewhere)."""
    path = str(tmp_path / "repo")
    repo(capsys, "init", path, "--root-keys", "3", "--root-threshold", "2")
    return path


def _add(capsys, path, model, version, *extra):
    return repo(capsys, "add-model", path, "--model", str(model), "--name", "vibration", "--variant", "full",
                "--version", str(version), *extra)


def test_init_writes_version_1_of_every_role_and_keys_only_under_keys(made):
    meta = os.path.join(made, "metadata")
    assert sorted(os.listdir(meta)) == ["1.root.json", "1.snapshot.json", "1.targets.json", "root.json",
                                        "timestamp.json"]
    root = Metadata.from_file(os.path.join(meta, "1.root.json")).signed
    assert root.consistent_snapshot is True
    assert (len(root.roles["root"].keyids), root.roles["root"].threshold) == (3, 2)
    assert {r: len(root.roles[r].keyids) for r in ("targets", "snapshot", "timestamp")} == \
        {"targets": 1, "snapshot": 1, "timestamp": 1}
    keys = os.path.join(made, "keys")
    pems = [os.path.join(d, n) for d, _, names in os.walk(keys) for n in names if n.endswith(".pem")]
    assert len(pems) == 6
    assert sorted(os.path.basename(os.path.dirname(p)) for p in pems) == ["offline"] * 4 + ["online"] * 2
    for p in pems:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    for d in (keys, os.path.join(keys, "offline"), os.path.join(keys, "online")):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    with open(os.path.join(keys, "offline", "README-OFFLINE-KEYS.txt")) as fh:
        assert "MOVE THEM OFF THIS MACHINE" in fh.read()
    for public in ("metadata", "targets", "grants"):
        for _, _, names in os.walk(os.path.join(made, public)):
            assert not [n for n in names if n.endswith((".pem", ".key"))]


def test_a_board_verifies_downloads_and_decrypts_a_granted_release(made, files, tmp_path, capsys):
    model, vectors = files
    added = _add(capsys, made, model, 3, "--hwclass", "rpi4", "rpi5", "--ring", "canary", "--min-agent", "0.4.0",
                 "--test-vectors", str(vectors))
    release = added["release"]
    board_a, board_b = age.generate_identity(), age.generate_identity()
    recipients = tmp_path / "boards.txt"
    recipients.write_text(f"# the fleet\nboard-a {board_a[1]}\n\nboard-b {board_b[1]}  # spare\n")
    granted = repo(capsys, "grant", made, "--recipients-file", str(recipients), "--release", release)
    assert granted["files"] == [grant_path(release, "board-a"), grant_path(release, "board-b")]
    published = repo(capsys, "publish", made)
    assert published["published"] == {"targets": 2, "snapshot": 2, "timestamp": 2}

    client = updater(made, str(tmp_path / "board"))
    client.refresh()
    info = client.get_targetinfo("models/vibration/full/3.tflite.age")
    assert info is not None
    custom = info.custom
    assert {k: custom[k] for k in ("kind", "name", "variant", "version", "release", "hwclass", "ring", "min_agent",
                                   "encryption")} == \
        {"kind": "model", "name": "vibration", "variant": "full", "version": 3, "release": release,
         "hwclass": ["rpi4", "rpi5"], "ring": "canary", "min_agent": "0.4.0", "encryption": "age"}
    import hashlib

    assert custom["plaintext"] == {"sha256": hashlib.sha256(MODEL).hexdigest(), "length": len(MODEL)}
    with open(client.download_target(info), "rb") as fh:
        ciphertext = fh.read()
    assert MODEL not in ciphertext and len(ciphertext) == info.length
    assert open_release(made, release, "board-a", board_a[0], ciphertext) == MODEL
    assert open_release(made, release, "board-b", board_b[0], ciphertext) == MODEL

    vinfo = client.get_targetinfo(custom["test_vectors"]["target"])
    assert vinfo.custom["kind"] == "test_vectors" and custom["test_vectors"]["sha256"] == \
        hashlib.sha256(VECTORS).hexdigest()
    with open(client.download_target(vinfo), "rb") as fh:
        assert open_release(made, release, "board-a", board_a[0], fh.read()) == VECTORS

    # A grant opens only with its own board's identity; the release key itself is never published.
    with open(os.path.join(made, *grant_path(release, "board-a").split("/")), "rb") as fh:
        grant_a = fh.read()
    with pytest.raises(age.DecryptError):
        age.decrypt_bytes(grant_a, [board_b[0]])
    with pytest.raises(age.DecryptError):
        age.decrypt_bytes(ciphertext, [board_a[0]])
    assert os.path.isfile(os.path.join(made, "keys", "releases", f"{release}.key"))
    assert stat.S_IMODE(os.stat(os.path.join(made, "keys", "releases", f"{release}.key")).st_mode) == 0o600


def test_a_version_not_above_the_highest_listed_is_refused_and_changes_nothing(made, files, capsys):
    model, _ = files
    _add(capsys, made, model, 5)
    before = {d: sorted(names) for d, _, names in os.walk(made)}
    staged = open(os.path.join(made, "staged", "targets.json"), "rb").read()
    for version in (5, 4):
        error = repo_error(capsys, "add-model", made, "--model", str(model), "--name", "vibration", "--variant",
                           "full", "--version", str(version))
        assert error["code"] == "repository_error"
        assert f"--version {version}" in error["message"] and "already lists version 5" in error["message"]
    assert {d: sorted(names) for d, _, names in os.walk(made)} == before
    assert open(os.path.join(made, "staged", "targets.json"), "rb").read() == staged
    # Another variant keeps its own sequence; a published one counts as listed too.
    repo(capsys, "publish", made)
    repo(capsys, "add-model", made, "--model", str(model), "--name", "vibration", "--variant", "lite",
         "--version", "1")
    assert repo_error(capsys, "add-model", made, "--model", str(model), "--name", "vibration", "--variant", "full",
                      "--version", "2")["code"] == "repository_error"


def test_targets_edited_after_signing_are_refused_by_the_client(made, files, tmp_path, capsys):
    model, _ = files
    _add(capsys, made, model, 1)
    repo(capsys, "publish", made)
    path = os.path.join(made, "metadata", "2.targets.json")
    doc = json.load(open(path))
    doc["signed"]["targets"]["models/vibration/full/1.tflite.age"]["custom"]["hwclass"] = ["anything"]
    with open(path, "w") as fh:
        json.dump(doc, fh)
    with pytest.raises(tuf_exc.UnsignedMetadataError, match="targets was signed by 0/1 keys"):
        updater(made, str(tmp_path / "board")).refresh()


def test_root_and_timestamp_rotations_are_followed_and_the_old_key_is_refused(made, files, tmp_path, capsys):
    model, _ = files
    board = str(tmp_path / "board")
    updater(made, board).refresh()  # trusts root 1 and timestamp 1
    old_timestamp_keys = set(Metadata.from_file(os.path.join(made, "metadata", "1.root.json"))
                             .signed.roles["timestamp"].keyids)
    rotated = repo(capsys, "rotate", made, "--role", "root", "--count", "2", "--threshold", "2")
    assert rotated["root_version"] == 2 and len(rotated["retired"]) == 3
    repo(capsys, "rotate", made, "--role", "timestamp")
    _add(capsys, made, model, 1)
    assert repo(capsys, "publish", made)["published"] == {"targets": 2, "root": 2, "snapshot": 2, "timestamp": 2}
    repo(capsys, "rotate", made, "--role", "root")  # root 3: signed by root 2's keys, which now sit in retired/
    repo(capsys, "rotate", made, "--role", "targets")
    repo(capsys, "publish", made)

    known = updater(made, board, fresh=False)  # the board's cached root 1
    known.refresh()
    assert known._trusted_set.root.version == 3
    assert known.get_targetinfo("models/vibration/full/1.tflite.age") is not None
    fresh = updater(made, str(tmp_path / "new-board"))
    fresh.refresh()
    assert fresh._trusted_set.timestamp.version == 3

    # Someone holding the retired timestamp key signs a newer timestamp: boards refuse it.
    from tools.repo.keys import load_signers

    signers = load_signers(os.path.join(made, "keys", "online"))
    (old_key,) = [k for k in signers if k in old_timestamp_keys]
    forged = Metadata.from_file(os.path.join(made, "metadata", "timestamp.json"))
    forged.signed.version += 1
    forged.sign(signers[old_key])
    forged.to_file(os.path.join(made, "metadata", "timestamp.json"))
    with pytest.raises(tuf_exc.UnsignedMetadataError, match="timestamp was signed by 0/1 keys"):
        updater(made, board, fresh=False).refresh()


def test_k_of_n_targets_keys_can_live_in_another_directory(tmp_path, files, capsys):
    model, _ = files
    path = str(tmp_path / "repo")
    repo(capsys, "init", path, "--targets-keys", "3", "--targets-threshold", "2")
    offline = os.path.join(path, "keys", "offline")
    stick = tmp_path / "stick"
    stick.mkdir(mode=0o700)
    targets_keys = sorted(n for n in os.listdir(offline) if n.startswith("targets-"))
    for name in targets_keys[:2]:
        os.replace(os.path.join(offline, name), stick / name)
    error = repo_error(capsys, "add-model", path, "--model", str(model), "--name", "m", "--variant", "v",
                       "--version", "1")
    assert "needs 2 of the targets keys" in error["message"] and "found 1" in error["message"]
    assert not os.listdir(os.path.join(path, "targets")) and not os.path.exists(os.path.join(path, "keys", "releases"))
    repo(capsys, "add-model", path, "--model", str(model), "--name", "m", "--variant", "v", "--version", "1",
         "--keys", str(stick))
    repo(capsys, "publish", path)
    client = updater(path, str(tmp_path / "board"))
    client.refresh()
    assert client.get_targetinfo("models/m/v/1.tflite.age").custom["version"] == 1


def test_grants_are_idempotent_and_bad_input_writes_nothing(made, files, tmp_path, capsys):
    model, _ = files
    first = _add(capsys, made, model, 1)["release"]
    repo(capsys, "add-model", made, "--model", str(model), "--name", "vibration", "--variant", "lite",
         "--version", "1")
    board = age.generate_identity()
    twice = [repo(capsys, "grant", made, "--device", "field-7", "--recipient", board[1], "--name", "vibration",
                  "--version", "1") for _ in range(2)]
    assert twice[0]["files"] == twice[1]["files"] and len(twice[0]["files"]) == 2  # both variants
    assert grant_path(first, "field-7") in twice[0]["files"]
    for rel in twice[0]["files"]:
        with open(os.path.join(made, rel), "rb") as fh:
            assert age.decrypt_bytes(fh.read(), [board[0]]).startswith(b"AGE-SECRET-KEY-1")
    grants_before = sorted(os.walk(os.path.join(made, "grants")))
    bad = tmp_path / "bad.txt"
    bad.write_text(f"ok-board {board[1]}\nbroken-line\n")
    cases = [
        (["--device", "x", "--recipient", "age1notarecipient", "--release", first], "is not an age X25519 recipient"),
        (["--device", "x", "--recipient", board[1], "--release", "nope"], "--release nope: no such release"),
        (["--device", "x", "--recipient", board[1], "--name", "vibration", "--version", "9"], "version 9"),
        (["--device", "x", "--release", first], "--device needs --recipient"),
        (["--device", "has space", "--recipient", board[1], "--release", first], "printable characters"),
        (["--recipients-file", str(bad), "--release", first], "line 2"),
        (["--recipients-file", str(tmp_path / "none.txt"), "--release", first], "cannot read it"),
    ]
    for argv, words in cases:
        error = repo_error(capsys, "grant", made, *argv)
        assert error["code"] == "repository_error" and words in error["message"], (argv, error)
    assert sorted(os.walk(os.path.join(made, "grants"))) == grants_before


def test_granting_more_boards_does_not_grow_what_a_board_refreshes(made, files, tmp_path, capsys):
    model, _ = files
    release = _add(capsys, made, model, 1)["release"]
    repo(capsys, "publish", made)

    def refresh_bytes(name):
        client = updater(made, str(tmp_path / name))
        client.refresh()
        fetched = client._fetcher.fetched
        return sum(os.path.getsize(os.path.join(made, p)) for p in fetched), sorted(fetched)

    few = refresh_bytes("before")
    fleet = tmp_path / "fleet.txt"
    fleet.write_text("".join(f"board-{i:05d} {age.generate_identity()[1]}\n" for i in range(300)))
    assert len(repo(capsys, "grant", made, "--recipients-file", str(fleet), "--release", release)["files"]) == 300
    repo(capsys, "publish", made)
    many = refresh_bytes("after")
    assert many == few  # the same files (a fresh client walks the same roots) and the same byte count
    assert len(os.listdir(os.path.join(made, "grants", release))) == 300
