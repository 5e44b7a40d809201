"""The board's client of an update repository, release side: the signed facts and the target check, the grants
(missing, swapped, replayed, forged, flipped, oversized) and the ciphertext (flipped, truncated, oversized,
altered after verification, decrypting to something else than signed), each case asserting its code and that
nothing is left where the plaintext would go."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil

import pytest
from tuf.api.exceptions import DownloadHTTPError

from device.update import age, layout
from device.update.client import BoardFacts, decrypt_verified
from device.update.errors import MetadataError, UpdateError
from tests.update.httpserver import RangeServer
from tests.update.reposim import World, repo, resign_targets


@pytest.fixture
def world(tmp_path, capsys):
    return World(tmp_path, capsys)


def _error(call) -> UpdateError:
    with pytest.raises(UpdateError) as info:
        call()
    return info.value


# -- the target check ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample():
    from device.update.client import Release

    return Release(path=World.PATH, name="vibration", variant="full", version=3, release_id="vibration-full-3-00ff",
                   target=None, plaintext_sha256="0" * 64, plaintext_length=1, hwclass=("rpi4", "rpi5"),
                   ring="stable", min_agent="0.4.0", requires=None, test_vectors=None)


def test_the_target_check_names_the_fact_that_fails(sample):
    from device.update.client import Repository

    ok = BoardFacts("rpi5", rings=("canary", "stable"), agent_version="0.4.0")
    Repository.check_target(sample, ok)
    Repository.check_target(dataclasses.replace(sample, hwclass=()), dataclasses.replace(ok, hwclass="jetson"))
    Repository.check_target(sample, dataclasses.replace(ok, agent_version="0.10.0"))  # 10 > 4, not "1" < "4"
    Repository.check_target(sample, dataclasses.replace(ok, agent_version="0.4.0+g1a2b"))
    edgetpu = dataclasses.replace(sample, variant="edgetpu", requires="edgetpu")
    Repository.check_target(edgetpu, dataclasses.replace(ok, accelerators=("edgetpu",)))
    cases = [
        (sample, dataclasses.replace(ok, hwclass="jetson"), "hardware class: it is for rpi4, rpi5; this board is "
                                                             "'jetson'"),
        (sample, dataclasses.replace(ok, rings=("canary",)), "ring: it is in ring 'stable'; this board accepts canary"),
        (sample, dataclasses.replace(ok, agent_version="0.3.9"), "minimum agent version: it needs agent 0.4.0 or "
                                                                 "later; this board runs 0.3.9"),
        (sample, dataclasses.replace(ok, agent_version="0.4.0rc1"), "minimum agent version"),
        (sample, dataclasses.replace(ok, agent_version="0.4.0.dev3"), "minimum agent version"),
        (sample, dataclasses.replace(ok, agent_version="unknown"), "the board's version cannot be compared"),
        (edgetpu, ok, "accelerator: variant 'edgetpu' needs an edgetpu; this board has none"),
    ]
    for release, board, words in cases:
        err = _error(lambda: Repository.check_target(release, board))
        assert err.code == "not_for_this_board" and words in str(err) and release.release_id in str(err), (words, str(err))


def test_versions_compare_as_numbers_with_pre_releases_below_their_release():
    order = ["0.1.0", "0.4.0rc1", "0.4.0", "0.4.1", "0.10.0", "1.0.0"]
    keys = [layout.parse_version(v) for v in order]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert layout.parse_version("0.4") == layout.parse_version("0.4.0") == layout.parse_version("0.4.0+g1a2b")
    assert layout.parse_version("0.4.0.dev3") == layout.parse_version("0.4.0-beta") == keys[1]
    with pytest.raises(ValueError):
        layout.parse_version("four")


# -- the signed facts -----------------------------------------------------------------------------------------

GOOD = layout.model_facts(name="m", variant="v", version=2, release="m-v-2-0a0b0c0d", sha256="ab" * 32, length=10,
                          hwclass=["rpi4"], ring="stable", min_agent=None,
                          test_vectors=layout.vectors_ref("models/m/v/2.testvectors.npz.age", "cd" * 32, 5))


@pytest.mark.parametrize("edit, field", [
    (lambda c: c.update(kind="firmware"), "custom.kind"),
    (lambda c: c.pop("name"), "custom.name"),
    (lambda c: c.update(variant="a/b"), "custom.variant"),
    (lambda c: c.update(version=True), "custom.version"),
    (lambda c: c.update(version=0), "custom.version"),
    (lambda c: c.update(release="../escape"), "custom.release"),
    (lambda c: c.update(plaintext=None), "custom.plaintext"),
    (lambda c: c["plaintext"].update(sha256="AB" * 32), "custom.plaintext.sha256"),
    (lambda c: c["plaintext"].update(length=-1), "custom.plaintext.length"),
    (lambda c: c.update(hwclass="rpi4"), "custom.hwclass"),
    (lambda c: c.update(ring=None), "custom.ring"),
    (lambda c: c.update(min_agent="four"), "custom.min_agent"),
    (lambda c: c.update(encryption="gpg"), "custom.encryption"),
    (lambda c: c.update(requires="tpu"), "custom.requires"),
    (lambda c: c["test_vectors"].update(target="models/other/v/2.testvectors.age"), "custom.test_vectors.target"),
    (lambda c: c["test_vectors"].update(length="5"), "custom.test_vectors.length"),
])
def test_malformed_facts_are_refused_naming_the_field(edit, field):
    import copy

    assert layout.parse_model_facts("models/m/v/2.tflite.age", GOOD).plaintext.length == 10
    custom = copy.deepcopy(GOOD)
    edit(custom)
    with pytest.raises(MetadataError) as info:
        layout.parse_model_facts("models/m/v/2.tflite.age", custom)
    assert info.value.code == "metadata_invalid" and f"target models/m/v/2.tflite.age: signed {field}:" in str(info.value)


def test_facts_under_another_path_and_the_shared_names():
    with pytest.raises(MetadataError, match="must be listed under the path"):
        layout.parse_model_facts("models/m/v/9.tflite.age", GOOD)
    assert layout.model_target_path("m", "v", 2) == "models/m/v/2.tflite.age"
    assert layout.vectors_target_path("m", "v", 2, ".npz") == "models/m/v/2.testvectors.npz.age"
    assert layout.vectors_target_path("m", "v", 2, "./x") == "models/m/v/2.testvectors.age"
    digest = hashlib.sha256(b"board-a").hexdigest()[:16]
    assert layout.grant_path("r-1", "board-a") == f"grants/r-1/{digest}.age" == "grants/" + layout.grant_name(
        "r-1", "board-a")
    assert layout.variant_requires("full_edgetpu") == "edgetpu" and layout.variant_requires("full") is None


def test_a_malformed_signed_release_is_left_out_and_the_others_stay_installable(world, tmp_path, capsys):
    model = tmp_path / "lite.tflite"
    model.write_bytes(b"lite model")
    repo(capsys, "add-model", world.path, "--model", str(model), "--name", "vibration", "--variant", "lite",
         "--version", "1")
    resign_targets(world.path, lambda t: t.targets[World.PATH].custom["plaintext"].update(length="150000"))
    client = world.client()
    assert [r.path for r in client.releases()] == ["models/vibration/lite/1.tflite.age"]
    (refused,) = client.refused
    assert "signed custom.plaintext.length" in str(refused)
    err = _error(lambda: client.release(World.PATH))
    assert err.code == "metadata_invalid" and "custom.plaintext.length" in str(err)
    assert _error(lambda: client.release("models/none/x/1.tflite.age")).code == "metadata_invalid"


# -- grants ---------------------------------------------------------------------------------------------------

def _grant(world, release_id, device="board-a") -> str:
    return world.file(layout.grant_path(release_id, device))


def test_a_board_without_a_grant_or_with_another_boards_is_not_granted(world):
    client = world.client()
    (release,) = client.releases()
    err = _error(lambda: client.fetch_release_key(release, "board-z", [world.board[0]]))
    assert err.code == "not_granted" and "no release key for this board" in str(err)
    shutil.copyfile(_grant(world, world.release, "board-b"), _grant(world, world.release, "board-a"))  # swapped
    err = _error(lambda: client.fetch_release_key(release, "board-a", [world.board[0]]))
    assert err.code == "not_granted" and "the key file is not for this board" in str(err)
    with RangeServer(world.path) as srv:  # the same over HTTP: a 404
        http = world.client("http", base=srv.url)
        (release,) = http.releases()
        err = _error(lambda: http.fetch_release_key(release, "board-z", [world.board[0]]))
        assert err.code == "not_granted" and srv.url in str(err)


def test_a_key_file_replayed_from_an_older_release_or_forged_opens_but_does_not_decrypt(world, tmp_path, capsys):
    newer = tmp_path / "v4.tflite"
    newer.write_bytes(b"version 4" * 1000)
    v4 = repo(capsys, "add-model", world.path, "--model", str(newer), "--name", "vibration", "--variant", "full",
              "--version", "4")["release"]
    repo(capsys, "grant", world.path, "--device", "board-a", "--recipient", world.board[1], "--release", v4)
    repo(capsys, "publish", world.path)
    client = world.client()
    release = client.release("models/vibration/full/4.tflite.age")
    cipher = client.download(release, str(tmp_path / "staging"))
    out = tmp_path / "slot" / "model.tflite"
    out.parent.mkdir()
    out.write_bytes(b"the active model")
    shutil.copyfile(_grant(world, world.release), _grant(world, v4))  # replayed: version 3's key file
    forged = age.encrypt_bytes((age.generate_identity()[0] + "\n").encode(), [world.board[1]])  # recipients are public
    for key_file in (None, forged):
        if key_file is not None:
            with open(_grant(world, v4), "wb") as fh:
                fh.write(key_file)
        key = client.fetch_release_key(release, "board-a", [world.board[0]])  # it opens: it is for this board
        err = _error(lambda: decrypt_verified(cipher, key, str(out), release))
        assert err.code == "not_granted" and "does not open it" in str(err)
        assert out.read_bytes() == b"the active model" and os.listdir(out.parent) == ["model.tflite"]


def test_damaged_or_oversized_key_files(world, tmp_path):
    client = world.client()
    (release,) = client.releases()
    path = _grant(world, world.release)
    good = open(path, "rb").read()

    def attempt(data: bytes) -> UpdateError:
        with open(path, "wb") as fh:
            fh.write(data)
        return _error(lambda: client.fetch_release_key(release, "board-a", [world.board[0]]))

    stanza = good.index(b"-> X25519 ") + len(b"-> X25519 ")  # the ephemeral share: still well formed, no longer
    other = b"B" if good[stanza:stanza + 1] == b"A" else b"A"  # a wrap of this board's key
    assert attempt(good[:stanza] + other + good[stanza + 1:]).code == "not_granted"
    err = attempt(good[:-3] + bytes([good[-3] ^ 1]) + good[-2:])  # the payload
    assert err.code == "decrypt_failed" and "authentication failed" in str(err)
    assert attempt(good[:-10]).code == "decrypt_failed"
    assert attempt(b"garbage, not an age file").code == "decrypt_failed"
    assert attempt(age.encrypt_bytes(b"hello", [world.board[1]])).code == "decrypt_failed"  # opens, holds no key
    err = attempt(good + b"\0" * (70 * 1024))
    assert err.code == "size_exceeded" and "larger than 65536 bytes" in str(err)
    with open(path, "wb") as fh:
        fh.write(good)
    assert client.fetch_release_key(release, "board-a", [world.board[0]]).startswith("AGE-SECRET-KEY-1")


class FlakySource:
    """A RangeSource whose reads fail like a broken link, then serve a file."""

    def __init__(self, failures: int, data: bytes = b""):
        self.failures, self.data, self.calls = failures, data, 0

    def read(self, url: str, offset: int):
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionResetError("the link dropped")
        if not self.data:
            raise DownloadHTTPError(f"{url}: missing", 404)
        return iter([self.data[offset:]])


def test_key_file_transport_failures_are_retried_then_a_download_error(world):
    grant = open(_grant(world, world.release), "rb").read()
    flaky = world.client(source=FlakySource(1, grant), attempts=3)
    (release,) = flaky.releases()
    assert flaky.fetch_release_key(release, "board-a", [world.board[0]]).startswith("AGE-SECRET-KEY-1")
    assert len(flaky.clock.slept) == 1
    broken = world.client("broken", source=FlakySource(10), attempts=3)
    err = _error(lambda: broken.fetch_release_key(broken.releases()[0], "board-a", [world.board[0]]))
    assert err.code == "download_failed" and "the link dropped" in str(err) and "3 attempts" in str(err)


# -- the ciphertext and the plaintext -------------------------------------------------------------------------

def test_flipped_truncated_and_oversized_targets(world, tmp_path):
    client = world.client()
    (release,) = client.releases()
    stored = world.stored_target(World.PATH)
    good = open(stored, "rb").read()
    cases = [
        (good[:1000] + bytes([good[1000] ^ 0x10]) + good[1001:], "hash_mismatch"),
        (good[:-100], "download_failed"),
        (good + b"more", "size_exceeded"),
    ]
    for n, (data, code) in enumerate(cases):
        with open(stored, "wb") as fh:
            fh.write(data)
        staging = tmp_path / f"staging{n}"
        err = _error(lambda: client.download(release, str(staging)))
        assert err.code == code and World.PATH in str(err), (code, str(err))
        assert not (staging / release.target.hashes["sha256"]).exists()  # nothing verified is handed out
    with open(stored, "wb") as fh:
        fh.write(good)
    assert open(client.download(release, str(tmp_path / "staging1")), "rb").read() == good  # resumes the partial


def test_a_ciphertext_altered_after_verification_never_reaches_the_slot(world, tmp_path):
    client = world.client()
    (release,) = client.releases()
    key = client.fetch_release_key(release, "board-a", [world.board[0]])
    cipher = client.download(release, str(tmp_path / "staging"))
    data = bytearray(open(cipher, "rb").read())
    data[-500] ^= 1  # the final chunk: the first two chunks' plaintext passes before it fails
    altered = tmp_path / "altered.age"
    altered.write_bytes(bytes(data))
    slot = tmp_path / "slot"
    slot.mkdir()
    err = _error(lambda: client.decrypt_verified(str(altered), key, str(slot / "model.tflite"), release))
    assert err.code == "decrypt_failed" and World.PATH in str(err)
    assert os.listdir(slot) == []


def test_a_plaintext_that_is_not_the_signed_one_is_refused(world, tmp_path):
    # A targets key holder signs facts that do not match the ciphertext (or the tool has a bug).
    def lie(plaintext):
        def edit(targets):
            targets.targets[World.PATH].custom["plaintext"] = plaintext
        return edit

    slot = tmp_path / "slot"
    slot.mkdir()
    (slot / "model.tflite").write_bytes(b"the active model")
    sha = hashlib.sha256(world.model).hexdigest()
    for n, (plaintext, words) in enumerate([
        ({"sha256": hashlib.sha256(b"something else").hexdigest(), "length": 150_000}, "is not the signed one"),
        ({"sha256": sha, "length": 150_001}, "is not the signed one"),
        ({"sha256": sha, "length": 149_999}, "longer than the signed 149999 bytes"),
    ]):
        resign_targets(world.path, lie(plaintext))
        client = world.client(f"board{n}")
        (release,) = client.releases()
        key = client.fetch_release_key(release, "board-a", [world.board[0]])
        cipher = client.download(release, str(tmp_path / "staging"))
        err = _error(lambda: client.decrypt_verified(cipher, key, str(slot / "model.tflite"), release))
        assert err.code == "hash_mismatch" and words in str(err) and World.PATH in str(err), str(err)
        assert os.listdir(slot) == ["model.tflite"] and (slot / "model.tflite").read_bytes() == b"the active model"


def test_a_release_whose_test_vectors_are_not_signed_targets_is_refused(world):
    resign_targets(world.path, lambda t: t.targets.pop("models/vibration/full/3.testvectors.npz.age"))
    client = world.client()
    assert client.releases() == []
    assert "custom.test_vectors.target models/vibration/full/3.testvectors.npz.age is not listed" in \
        str(client.refused[0])


def test_board_side_write_failures_are_store_errors(world, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    err = _error(lambda: world.client("blocker/below").refresh())
    assert err.code == "model_store_error" and "cannot create the metadata directory" in str(err)
    client = world.client()
    (release,) = client.releases()
    key = client.fetch_release_key(release, "board-a", [world.board[0]])
    cipher = client.download(release, str(tmp_path / "staging"))
    err = _error(lambda: decrypt_verified(cipher, key, str(blocker / "model.tflite"), release))
    assert err.code == "model_store_error" and World.PATH in str(err)
    err = _error(lambda: decrypt_verified(str(tmp_path / "gone.age"), key, str(tmp_path / "model.tflite"), release))
    assert err.code == "model_store_error" and "gone.age" in str(err)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".model.tflite")]
