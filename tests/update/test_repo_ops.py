"""``fieldnode repo`` export, status, publish without changes, and the operator's mistakes (each one repository_error)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import pytest
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata

from device.update import age
from tests.update.reposim import open_release, repo, repo_error, updater
from tools.repo.export import MARKER

MODEL = os.urandom(70_000)


@pytest.fixture
def granted(tmp_path, capsys):
    """A published repository with one release granted to one board: ``(path, release, board identity)``."""
    path = str(tmp_path / "repo")
    model = tmp_path / "m.tflite"
    model.write_bytes(MODEL)
    repo(capsys, "init", path)
    release = repo(capsys, "add-model", path, "--model", str(model), "--name", "m", "--variant", "v",
                   "--version", "7")["release"]
    board = age.generate_identity()
    repo(capsys, "grant", path, "--device", "b1", "--recipient", board[1], "--release", release)
    repo(capsys, "publish", path)
    return path, release, board[0]


def _expires(path: str) -> datetime.datetime:
    return Metadata.from_file(path).signed.expires


def test_export_is_a_repository_the_client_refreshes_from_with_a_long_timestamp(granted, tmp_path, capsys):
    path, release, board = granted
    out = str(tmp_path / "stick" / "fieldnode")
    res = repo(capsys, "export", path, "--usb", out, "--valid-days", "30")
    marker = json.load(open(os.path.join(out, MARKER)))
    until = datetime.datetime.fromisoformat(marker["valid_until"])
    assert until - datetime.datetime.fromisoformat(marker["exported"]) == datetime.timedelta(days=30)
    assert _expires(os.path.join(out, "metadata", "timestamp.json")) == until
    assert _expires(os.path.join(out, "metadata", f"{res['snapshot_version']}.snapshot.json")) >= until
    # Nothing secret on the stick, and the online repository moved one timestamp version past it.
    assert not [n for _, _, names in os.walk(out) for n in names if n.endswith((".pem", ".key"))]
    assert not os.path.exists(os.path.join(out, "keys")) and not os.path.exists(os.path.join(out, "staged"))
    online = Metadata.from_file(os.path.join(path, "metadata", "timestamp.json")).signed
    assert online.version == res["timestamp_version"] + 1 == res["online_timestamp_version"]

    board_dir = str(tmp_path / "board")
    client = updater(out, board_dir)
    client.refresh()
    info = client.get_targetinfo("models/m/v/7.tflite.age")
    with open(client.download_target(info), "rb") as fh:
        assert open_release(out, release, "b1", board, fh.read()) == MODEL
    # Back on the network, the same board moves on to the online repository's newer timestamp.
    later = updater(path, board_dir, fresh=False)
    later.refresh()
    assert later._trusted_set.timestamp.version == online.version
    # A board that has seen the newer online timestamp refuses the older stick: TUF's rollback check.
    with pytest.raises(tuf_exc.BadVersionNumberError):
        updater(out, board_dir, fresh=False).refresh()

    # Exporting again replaces the earlier export; a directory that is not one is refused.
    repo(capsys, "export", path, "--usb", out)
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    assert "not an earlier export" in repo_error(capsys, "export", path, "--usb", str(other))["message"]
    assert os.listdir(other) == ["cat.jpg"]


def test_export_refuses_what_would_not_last_and_unpublished_changes(tmp_path, capsys):
    path = str(tmp_path / "repo")
    repo(capsys, "init", path, "--expires", "root=10")
    error = repo_error(capsys, "export", path, "--usb", str(tmp_path / "out"))
    assert "root expires" in error["message"] and "publish --resign root" in error["message"]
    repo(capsys, "rotate", path, "--role", "snapshot")
    assert "staged but not published" in repo_error(capsys, "export", path, "--usb", str(tmp_path / "out"))["message"]
    repo(capsys, "publish", path, "--resign", "root", "--expires", "root=400")
    repo(capsys, "export", path, "--usb", str(tmp_path / "out"))
    updater(str(tmp_path / "out"), str(tmp_path / "board")).refresh()
    assert not os.listdir(os.path.join(path, "staged"))


def test_publish_with_nothing_staged_signs_only_a_new_timestamp(granted, capsys):
    path, _, _ = granted
    before = sorted(os.listdir(os.path.join(path, "metadata")))
    assert repo(capsys, "publish", path)["published"] == {"timestamp": 3}
    assert sorted(os.listdir(os.path.join(path, "metadata"))) == before
    # ...unless the snapshot would expire before the new timestamp.
    assert repo(capsys, "publish", path, "--expires", "timestamp=60")["published"] == {"snapshot": 3, "timestamp": 4}


def test_status_json_lists_roles_releases_and_grants(granted, tmp_path, capsys):
    path, release, _ = granted
    model = tmp_path / "m2.tflite"
    model.write_bytes(b"x" * 100)
    repo(capsys, "add-model", path, "--model", str(model), "--name", "m", "--variant", "v", "--version", "8",
         "--hwclass", "rpi5")
    status = repo(capsys, "status", path)
    assert status["staged"] == ["targets"]
    assert {r: (v["version"], v["threshold"], v["keys_here"], v["expired"]) for r, v in status["roles"].items()} == \
        {"root": (1, 1, 1, False), "targets": (2, 1, 1, False), "snapshot": (2, 1, 1, False),
         "timestamp": (2, 1, 1, False)}
    assert [(r["version"], r["release"] == release, r["published"], r["grants"], r["hwclass"])
            for r in status["releases"]] == [(7, True, True, 1, []), (8, False, False, 0, ["rpi5"])]
    assert status["grants"] == 1 and status["consistent_snapshot"] is True


def test_operator_mistakes_are_one_line_errors_naming_the_problem(granted, tmp_path, capsys):
    path, release, _ = granted
    model = tmp_path / "m.tflite"
    model.write_bytes(b"m")
    empty = tmp_path / "empty.tflite"
    empty.write_bytes(b"")
    add = ["add-model", path, "--name", "m", "--variant", "v", "--version", "9", "--model"]
    cases = [
        (["status", str(tmp_path / "nowhere")], "no such repository directory"),
        (["status", str(tmp_path)], "not a fieldnode repository"),
        (["init", path], "not an empty directory"),
        (["init", str(tmp_path / "r2"), "--root-keys", "2", "--root-threshold", "3"], "threshold 3 with 2 keys"),
        (add + [str(tmp_path / "missing.tflite")], "No such file"),
        (add + [str(empty)], "empty file"),
        (add + [str(model), "--keys", str(tmp_path)], "found 0"),
        (add + [str(model), "--min-agent", "one"], "--min-agent 'one'"),
        (["add-model", path, "--model", str(model), "--name", "../etc", "--variant", "v", "--version", "9"],
         "--name '../etc'"),
        (["publish", path, "--online-keys", str(tmp_path)], "timestamp: signed by 0 of the 1 keys"),
        (["rotate", path, "--role", "targets", "--keys", str(tmp_path)], "found 0"),
        (["rotate", path, "--role", "timestamp", "--count", "2", "--threshold", "3"], "threshold 3 with 2 keys"),
    ]
    for argv, words in cases:
        error = repo_error(capsys, *argv)
        assert error["code"] == "repository_error" and words in error["message"], (argv, error)
    assert not os.path.exists(tmp_path / "r2")
    assert Metadata.from_file(os.path.join(path, "metadata", "timestamp.json")).signed.version == 2

    # A key file others can read is refused, not used.
    online = os.path.join(path, "keys", "online")
    key = os.path.join(online, sorted(n for n in os.listdir(online) if n.startswith("timestamp-"))[0])
    os.chmod(key, 0o644)
    error = repo_error(capsys, "publish", path)
    assert "mode 0644 lets others read it" in error["message"] and key in error["message"]
    status = repo(capsys, "status", path)  # status reports it rather than refusing
    assert status["roles"]["timestamp"]["keys_here"] == 0 and key in status["key_problems"][0]

    # Garbage in a published file names the file.
    with open(os.path.join(path, "metadata", "timestamp.json"), "w") as fh:
        fh.write("{not json")
    assert "timestamp.json: not valid TUF metadata" in repo_error(capsys, "status", path)["message"]


def test_the_installed_command_prints_errors_without_a_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    bad = subprocess.run([sys.executable, "-m", "tools.cli", "repo", "grant", str(tmp_path / "none"), "--device",
                          "b", "--recipient", "age1x", "--release", "r"], capture_output=True, text=True, env=env,
                         timeout=60)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("fieldnode repo: error [repository_error]:")
    usage = subprocess.run([sys.executable, "-m", "tools.cli", "repo", "publish", str(tmp_path), "--expires",
                            "forever=1"], capture_output=True, text=True, env=env, timeout=60)
    assert usage.returncode == 2 and "expected ROLE=DAYS" in usage.stderr and "Traceback" not in usage.stderr


def test_the_worked_example_in_docs_runs_and_a_board_can_read_the_stick(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "docs", "updates.md"), encoding="utf-8") as fh:
        text = fh.read()
    example = text.split("### Worked example", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "fieldnode").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tools.cli "$@"\n')
    (shims / "fieldnode").chmod(0o755)
    (shims / "python3").symlink_to(sys.executable)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, PATH=f"{shims}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=root)
    done = subprocess.run(["bash", "-e", "-c", example], cwd=work, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    stick = str(work / "stick" / "fieldnode")
    client = updater(stick, str(tmp_path / "board"))
    client.refresh()
    info = client.get_targetinfo("models/vibration/full/2.tflite.age")
    with open(client.download_target(info), "rb") as fh:
        plain = open_release(stick, info.custom["release"], "board-0001",
                             age.read_identity_file(str(work / "boards" / "board-0001.age"))[0], fh.read())
    from device.runtime.manifest import bundled_model_dir

    with open(os.path.join(bundled_model_dir(), "vibration_full.tflite"), "rb") as fh:
        assert plain == fh.read()
