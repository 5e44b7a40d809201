"""Tests stand on their own: none may touch a path outside its temporary directories.

A few agent tests run again in a child pytest with the board's default host paths (config file, state and runtime
directories, trust directory, update identity) moved under a directory that refuses writes (``tests/hostpaths.py``).
A test that leaned on a default would read or write the host's ``/etc``, ``/run`` or ``/var``: it fails there instead,
and the directory must still be empty afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Each builds a whole Agent (spool, link, control socket, runtime, update store) from a config of its own.
AGENT_TESTS = [
    "tests/link/test_agent.py",
    "tests/power/test_agent_io.py",
    "tests/update/test_agent_update.py",
]


def _read_only_runner(host: str) -> list[str]:
    """As root, permissions refuse nothing: a read-only bind mount in a mount namespace of the child's own does
    (the host's mounts are untouched). Without ``unshare`` or the privilege, the directory is made 0555."""
    unshare = shutil.which("unshare")
    if os.geteuid() == 0 and unshare:
        probe = subprocess.run([unshare, "--mount", "--propagation", "private", "true"], capture_output=True,
                               check=False)
        if probe.returncode == 0:
            script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && shift && exec "$@"'
            return [unshare, "--mount", "--propagation", "private", "sh", "-c", script, host, "--"]
    os.chmod(host, 0o555)
    return []


def test_agent_tests_write_nothing_outside_their_temporary_directories(tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    env = dict(os.environ, FIELDNODE_TEST_HOST_ROOT=str(host))
    env.pop("FIELDNODE_CONFIG", None)
    cmd = _read_only_runner(str(host)) + [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                          "-p", "tests.hostpaths", *AGENT_TESTS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout, tail
    assert sorted(str(p.relative_to(host)) for p in host.rglob("*")) == []


def test_the_plugin_moves_every_host_default(tmp_path):
    """The check above can fail: with the plugin, a default config names only paths under the moved root."""
    code = ("import json, sys; sys.path.insert(0, '.'); from tests.hostpaths import move_host_defaults; "
            "move_host_defaults(sys.argv[1]); from device import config; c = config.Config(); "
            "print(json.dumps([config.resolve_path(None, environ={})[0], c.device.state_dir, c.device.runtime_dir, "
            "c.link.trust_dir, c.update.identity_file]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    import json

    paths = json.loads(out)
    assert len(paths) == 5 and all(p.startswith(str(tmp_path) + os.sep) for p in paths), paths
