"""Every subcommand, run as a technician would (the real ``fieldnode`` console script in a subprocess), with
no config file, with an empty state directory, and with files that do not exist: each ends with its own exit
code and a one-line error naming the problem, never a traceback and never the CLI's catch-all for defects."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from device.errors import Exit
from tests.cleanenv import clean_env

FIELDNODE = os.path.join(os.path.dirname(sys.executable), "fieldnode")
MISSING = "/nonexistent/fieldnode-test"

# (arguments, expected exit codes): device.errors.Exit, the one table (docs/errors.md).
OK, FAILED, USAGE, UNREACHABLE, WARN, FAULTS = (Exit.OK, Exit.FAILED, Exit.USAGE, Exit.UNREACHABLE, Exit.WARN,
                                                 Exit.FAULTS)
NO_CONFIG = [
    ([], {2}),
    (["status"], {UNREACHABLE}),  # no agent running: one line saying so
    (["diag"], {WARN, FAULTS}),  # a board config must name its sensor: diag says so as a FAIL with a remedy
    (["diag", "--json"], {WARN, FAULTS}),
    (["status", "--json"], {UNREACHABLE}),
    (["status", "--watch", "--count", "1"], {UNREACHABLE}),
    (["--help"], {0}),
    (["version"], {0}),
    (["version", "--json"], {0}),
    (["config"], {0}),
    (["config", "check"], {2}),  # a board config must name its sensor (or ask for --sim)
    (["config", "defaults"], {0}),
    (["config", "keys"], {0}),
    (["selftest", "--json"], {0}),
    (["bench", "device/models/vibration", "--runs", "5", "--warmup", "1", "--json"], {0}),
    (["power", "status", "--sim"], {0}),
    (["power", "simulate", "--scenario", "plug"], {0}),
    (["demo", "--seconds", "1", "--json"], {0, 1}),
    (["run", "--seconds", "1"], {2}),  # no sensor and no --sim: drivers.sensor_url names the problem
    (["send", "ping"], {2}),
    (["keys", "id", MISSING], {1, 2}),
]

MISSING_FILES = [
    (["install", "--root", MISSING], {1, 2}),
    (["install", "--wheel", MISSING + ".whl", "--root", MISSING], {1, 2}),
    (["provision", "--device-id", "d1", "--root", MISSING], {1}),
    (["--config", MISSING, "version"], {2}),
    (["--config", MISSING, "config", "check"], {2}),
    (["bench", MISSING], {1, 2}),
    (["bench", MISSING + ".tflite"], {1, 2}),
    (["selftest", "--model", MISSING], {1, 2}),
    (["power", "status", "--root", MISSING], {2}),
    (["send", "--broker", "mqtt://127.0.0.1:9", "--device", "d1", "--sign", MISSING, "ping"], {1, 2}),
    (["send", "--broker", "mqtts://127.0.0.1:9", "--device", "d1", "--ca", MISSING, "ping"], {1, 2}),
    (["keys", "sign", MISSING, "--device", "d1", "ping"], {1, 2}),
    (["repo", "status", MISSING], {1, 2}),
    (["repo", "add-model", MISSING, "--model", MISSING, "--name", "m", "--variant", "v", "--version", "1"], {1, 2}),
]

BAD_VALUES = [
    (["status", "--interval", "0"], {2}),
    (["provision", "--device-id", "a/b"], {2}),
    (["bench", "device/models/vibration", "--runs", "0"], {2}),
    (["demo", "--battery", "150"], {2}),
    (["demo", "--sim", "pi99"], {2}),
    (["run", "--sim", "pi99"], {2}),
    (["run", "--seconds", "-1"], {2}),
    (["power", "simulate", "--scenario", "nan"], {2}),
]


# The board's default paths. A command run here with the defaults must not see (or write into) those of an agent
# installed or running on this machine: each command runs in a mount namespace of its own in which an empty tmpfs
# covers whichever of them exist (the host's mounts are untouched).
BOARD_DIRS = ("/etc/fieldnode", "/run/fieldnode", "/var/lib/fieldnode")
_UNSHARE = shutil.which("unshare")
HIDE = os.geteuid() == 0 and _UNSHARE is not None and subprocess.run(
    [_UNSHARE, "--mount", "--propagation", "private", "true"], capture_output=True, check=False).returncode == 0
_HIDING = ('for d in ' + " ".join(BOARD_DIRS) + '; do if [ -d "$d" ]; then mount -t tmpfs -o size=4m tmpfs "$d" '
           '|| exit 97; fi; done; exec "$@"')


def fieldnode(args, env_extra=None, cwd=None, timeout=120):
    env = clean_env()
    env.update(env_extra or {})
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    hide = [_UNSHARE, "--mount", "--propagation", "private", "sh", "-c", _HIDING, "sh"] if HIDE else []
    proc = subprocess.run([*hide, FIELDNODE, *args], capture_output=True, text=True, env=env, cwd=cwd or root,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode != 97, f"could not hide the board's directories: {proc.stderr}"
    return proc


def check(proc, codes):
    what = f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr + proc.stdout, what
    assert "[internal]" not in proc.stderr, what  # the catch-all for defects must never be what answers
    assert proc.returncode in codes, what
    if proc.returncode != 0:
        assert proc.stderr.strip() or "usage: fieldnode" in proc.stdout, what  # a failure always says why


@pytest.fixture(scope="module")
def no_config():
    """The commands below run with the board's default paths; on a machine where an agent is installed or runs,
    those are hidden from them (:func:`fieldnode`), so the case is the same everywhere."""
    assert HIDE or not any(os.path.exists(d) for d in BOARD_DIRS), \
        "an agent's directories exist here and cannot be hidden (needs root and unshare)"


@pytest.mark.parametrize("args,codes", NO_CONFIG, ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_no_config_file(no_config, tmp_path, args, codes):
    check(fieldnode(args, cwd=str(tmp_path) if args[:1] == ["keys"] else None), codes)


@pytest.mark.parametrize("args,codes", MISSING_FILES, ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_missing_files(args, codes):
    check(fieldnode(args), codes)


@pytest.mark.parametrize("args,codes", BAD_VALUES, ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_bad_values_name_the_argument(args, codes):
    proc = fieldnode(args)
    check(proc, codes)
    assert f"argument {args[-2]}: " in proc.stderr, proc.stderr  # names the option...
    assert "expected " in proc.stderr or "invalid choice" in proc.stderr, proc.stderr  # ...and what it takes


@pytest.fixture
def empty_state(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    cfg = tmp_path / "fieldnode.toml"
    cfg.write_text(f'[device]\nstate_dir = "{state}"\n[runtime]\nisolation = "inline"\n')
    return {"FIELDNODE_CONFIG": str(cfg)}, state


@pytest.mark.parametrize("args,codes", [
    (["config", "check"], {2}),
    (["selftest"], {0}),
    (["power", "status", "--sim", "rpi5"], {0}),
    (["run", "--sim", "--seconds", "3"], {0}),
    (["run", "--seconds", "1"], {2}),
    (["update", "check"], {2}),  # updates off: the config key says so
    (["update", "status", "--json"], {0}),
    (["update", "rollback"], {1}),  # nothing to roll back
], ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_empty_state_directory(empty_state, args, codes):
    env, _state = empty_state
    check(fieldnode(args, env), codes)


def test_state_directory_that_cannot_be_made(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = tmp_path / "fieldnode.toml"
    cfg.write_text(f'[device]\nstate_dir = "{blocker / "state"}"\n')
    proc = fieldnode(["run", "--sim", "--seconds", "1"], {"FIELDNODE_CONFIG": str(cfg)})
    check(proc, {2})
    assert "device.state_dir" in proc.stderr


def test_run_without_sensor_names_the_key_and_the_way_to_simulate(empty_state):
    env, state = empty_state
    proc = fieldnode(["run", "--seconds", "1"], env)
    check(proc, {2})
    assert "drivers.sensor_url" in proc.stderr and "--sim" in proc.stderr
    assert not os.listdir(state)  # refused before anything was opened or written


def test_a_reader_that_closes_the_pipe_early_ends_it_quietly():
    """``fieldnode config keys | head -1``: the reader goes away after one line; the command must not complain
    (no ``BrokenPipeError``, no ``Exception ignored ... Broken pipe``), and exits with the table's code for it."""
    import fcntl

    env = clean_env()
    read_end, write_end = os.pipe()
    # A small pipe, so the command is still writing when the reader leaves (its output is larger than this).
    fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)
    proc = subprocess.Popen([FIELDNODE, "config", "keys"], stdout=write_end, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env, text=True)
    os.close(write_end)
    first = b""
    while not first.endswith(b"\n"):
        chunk = os.read(read_end, 1)
        assert chunk, "the command ended before its first line"
        first += chunk
    os.close(read_end)
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(60) == Exit.PIPE_CLOSED and err == ""
    assert first.startswith(b"| Key |")
