"""``fieldnode update``: through ``tools.cli.main`` (output shapes, exit codes, the one error path) and once through
the installed ``fieldnode`` console script in a subprocess."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from tools.cli import main
from device.runtime.manifest import bundled_model_dir
from device.update import age
from tests.conftest import EXPECTED_BACKEND, ROOT
from tests.update.reposim import model_repo
from tools.update import DownloadProgress

SHIPPED = bundled_model_dir()
FULL, LITE, VECTORS = (os.path.join(SHIPPED, n) for n in ("vibration_full.tflite", "vibration_lite.tflite",
                                                          "vibration_testvectors.npz"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """v2: the shipped files; v3: full and lite swapped (fails validation). Granted to board-a."""
    base = tmp_path_factory.mktemp("cli")
    identity, recipient = age.generate_identity()
    root = model_repo(str(base / "repo"), {2: {"full": (FULL, VECTORS), "lite": (LITE, VECTORS)},
                                           3: {"full": (LITE, VECTORS), "lite": (FULL, VECTORS)}},
                      {"board-a": recipient})
    (base / "root.json").write_bytes(root)
    (base / "board.age").write_text(identity + "\n")
    os.chmod(base / "board.age", 0o600)
    return base


def write_config(tmp_path, repo, updates: bool = True) -> str:
    backend = f'backend = "{EXPECTED_BACKEND}"\n' if EXPECTED_BACKEND != "auto" else ""
    text = f'[device]\nid = "board-a"\nstate_dir = "{tmp_path / "state"}"\n\n[runtime]\ndelegate = "cpu"\n{backend}'
    if updates:
        text += (f'\n[update]\nroot_file = "{repo / "root.json"}"\nrepository = "{repo / "repo"}"\n'
                 f'identity_file = "{repo / "board.age"}"\nhwclass = "rpi4"\n')
    path = tmp_path / "fieldnode.toml"
    path.write_text(text)
    return str(path)


def cli(capsys, config: str, *argv: str) -> tuple:
    """``fieldnode update ARGV --config CONFIG``: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main(["update", *argv, "--config", config])
    out, err = capsys.readouterr()
    return rc, out, err


def for_people(out: str) -> None:
    """Human output: no Python reprs, no JSON."""
    for bad in ("{", "None", "[", "'", "True", "False"):
        assert bad not in out, (bad, out)


def test_check_install_status_rollback_as_json_and_for_people(repo, tmp_path, capsys):
    config = write_config(tmp_path, repo)
    rc, out, _ = cli(capsys, config, "check", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["ok"] is True and doc["available"]["version"] == 3 and doc["refused"] == []
    assert doc["installed"] == {"name": "vibration", "version": None, "source": "bundled", "slot": None,
                                "state": None}
    rc, out, _ = cli(capsys, config, "check")
    assert rc == 0 and out.splitlines()[0].startswith("vibration: v3 available (variants full, lite; ")
    for_people(out)

    rc, out, _ = cli(capsys, config, "install", "--version", "2", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["ok"] and (doc["installed"], doc["version"], doc["state"]) == (True, 2, "trial")
    assert doc["variants"] == ["full", "lite"] and doc["slot"] in ("a", "b")

    rc, out, _ = cli(capsys, config, "status", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["active"]["version"] == 2 and doc["active"]["state"] == "trial"
    assert doc["serving"] == "store" and doc["last_check"]["available"]["version"] == 3
    rc, out, _ = cli(capsys, config, "status")
    assert rc == 0 and out.startswith("serving: vibration v2 (slot ") and "last check: " in out
    for_people(out)

    rc, out, err = cli(capsys, config, "install", "--json")  # a trial is on: the store says busy
    assert rc == 1 and json.loads(out)["error"]["code"] == "update_busy"
    assert err.startswith("fieldnode update: error [update_busy]: ") and len(err.strip().splitlines()) == 1

    rc, out, _ = cli(capsys, config, "rollback", "--reason", "the operator said so", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["rolled_back"] == {"name": "vibration", "version": 2} and doc["serving"] == "bundled"
    assert doc["reason"] == "the operator said so"

    rc, out, err = cli(capsys, config, "install", "--version", "2", "--json")
    assert rc == 1 and json.loads(out) == {"ok": False, "error": {"code": "rollback_refused", "message": err.split(
        "]: ", 1)[1].strip()}}
    assert "the operator said so" in err and "Traceback" not in err

    rc, out, _ = cli(capsys, config, "status")
    assert "failed: vibration v2 (the operator said so, " in out
    for_people(out)


def test_install_for_people_and_a_refusal_with_its_code(repo, tmp_path, capsys):
    config = write_config(tmp_path, repo)
    rc, out, err = cli(capsys, config, "install", "--version", "2")
    assert rc == 0 and out.splitlines()[:2] == [
        "installed vibration v2 in slot a, on trial (variants full, lite)",
        "validated: full test vectors pass; lite test vectors pass"]
    for_people(out)
    rc, out, err = cli(capsys, config, "rollback")
    assert rc == 0 and out.splitlines() == ["rolled back vibration v2 (marked failed: rolled back from the command "
                                            "line)", "serving: the bundled model"]
    rc, out, err = cli(capsys, config, "install")  # the newest, v3, misses its test vectors
    assert rc == 1 and out == "" and err.startswith("fieldnode update: error [validation_failed]: vibration v3, variant ")


def test_updates_off_is_a_config_error_but_status_still_answers(repo, tmp_path, capsys):
    config = write_config(tmp_path, repo, updates=False)
    for action in ("check", "install"):
        rc, out, err = cli(capsys, config, action, "--json")
        error = json.loads(out)["error"]
        assert rc == 2 and error["code"] == "config_invalid" and error["key"] == "update.root_file"
        assert "updates are off: set update.root_file and update.repository" in err
    rc, out, _ = cli(capsys, config, "status", "--json")
    assert rc == 0 and json.loads(out)["serving"] == "bundled"
    rc, out, err = cli(capsys, config, "rollback", "--json")
    assert rc == 1 and json.loads(out)["error"]["code"] == "model_store_error" and "nothing to roll back" in err


def test_a_missing_identity_file_is_a_config_error_naming_its_key(repo, tmp_path, capsys):
    config = write_config(tmp_path, repo)
    text = open(config).read().replace(str(repo / "board.age"), str(tmp_path / "missing.age"))
    open(config, "w").write(text)
    rc, out, err = cli(capsys, config, "check", "--json")
    assert rc == 2 and json.loads(out)["error"]["key"] == "update.identity_file" and "missing.age" in err


def test_download_progress_is_a_line_per_tenth_of_a_long_download():
    stream = io.StringIO()
    progress = DownloadProgress(stream, min_bytes=1000)
    for done in range(0, 4001, 100):
        progress("download", {"variant": "full", "file": "model", "bytes": done, "total": 4000})
    progress("download", {"variant": "lite", "file": "model", "bytes": 500, "total": 999})  # too short to show
    progress("decrypt", {"variant": "full"})
    lines = stream.getvalue().splitlines()
    assert [line.split(": ")[1].split("%")[0] for line in lines] == [str(p) for p in range(0, 101, 10)]
    assert lines[-1] == "downloading full model: 100% (3.9 KiB of 3.9 KiB)"


def test_the_console_script_exits_with_the_code_and_prints_one_json_object(repo, tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "fieldnode")
    assert os.access(script, os.X_OK), f"{script}: the console script is not installed (pip install -e .)"
    config = write_config(tmp_path, repo)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ok = subprocess.run([script, "update", "check", "--config", config], capture_output=True, text=True, env=env,
                        timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("vibration: v3 available"), ok.stderr
    bad = subprocess.run([script, "update", "install", "--version", "7", "--json", "--config", config],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and json.loads(bad.stdout)["error"]["code"] == "not_for_this_board"
    assert bad.stderr.startswith("fieldnode update: error [not_for_this_board]: vibration v7: no such release")


def test_the_installing_example_in_docs_runs_after_the_worked_example(tmp_path):
    with open(os.path.join(ROOT, "docs", "updates.md"), encoding="utf-8") as fh:
        text = fh.read()

    def block(heading: str) -> str:
        return text.split(heading, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]

    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "fieldnode").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tools.cli "$@"\n')
    (shims / "fieldnode").chmod(0o755)
    (shims / "python3").symlink_to(sys.executable)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, PATH=f"{shims}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    script = block("### Worked example") + block("### Installing")
    done = subprocess.run(["bash", "-e", "-c", script], cwd=work, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "vibration: v2 available (variants full; " in done.stdout
    assert "installed vibration v2 in slot a, on trial (variants full)" in done.stdout
    assert "serving: vibration v2 (slot a, trial)" in done.stdout
    from device.runtime.manifest import load_manifest

    m = load_manifest(str(work / "board-state" / "update" / "slots" / "a"))
    assert (m.version, list(m.variants), m.labels) == ("2", ["full"], load_manifest(SHIPPED).labels)


def test_install_waits_when_the_board_is_low_on_power_unless_forced(repo, tmp_path, capsys):
    """The CLI judges the board as the agent's governor would: a battery at 20 % and not charging is 'saver',
    so an install is deferred (update_deferred, nothing installed) until --force."""
    from drivers.sim.board import VirtualBoard

    VirtualBoard(str(tmp_path / "sys"), "rpi4", battery_mah=2000, soc_pct=20, mains=False)
    config = write_config(tmp_path, repo)
    with open(config, "a") as f:
        f.write(f'\n[drivers]\nsysfs_root = "{tmp_path / "sys"}"\n')
    rc, out, err = cli(capsys, config, "install", "--version", "2", "--json")
    assert rc == 1 and json.loads(out)["error"]["code"] == "update_deferred" and "saver" in err
    rc, out, _ = cli(capsys, config, "status", "--json")
    assert json.loads(out)["active"] is None  # nothing was installed
    rc, out, _ = cli(capsys, config, "install", "--version", "2", "--force", "--json")
    assert rc == 0 and json.loads(out)["installed"] is True
