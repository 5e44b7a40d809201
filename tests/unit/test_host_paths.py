"""Tests stand on their own: none may touch a path outside its temporary directories.

A few agent tests run again in a child pytest with the board's default host paths (config file, state and runtime
directories, trust directory, update identity) moved under an empty directory of the test's own
(``tests/hostpaths.py``). A test that leaned on a default would read or write the host's ``/etc``, ``/run`` or
``/var``; here it writes under that directory instead (an agent makes its state and runtime directories, and they
stay), and the directory must still be empty afterwards. (Not a read-only directory: the agent carries on without
its control socket, so a refused write would pass unseen.)
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A few agent tests, each building a whole Agent (spool, link, control socket, runtime, GPIO, update store) from a
# config of its own: enough to see every default host path used, at a fraction of the whole modules' time.
AGENT_TESTS = [
    "tests/link/test_agent.py::test_a_stop_says_what_it_drains_and_what_it_keeps",
    "tests/link/test_agent.py::test_telemetry_and_events_are_published",
    "tests/power/test_agent_io.py",
    "tests/update/test_agent_update.py::test_a_worker_killed_from_outside_does_not_fail_the_trial",
]


def test_agent_tests_write_nothing_outside_their_temporary_directories(tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    env = dict(os.environ, FIELDNODE_TEST_HOST_ROOT=str(host))
    env.pop("FIELDNODE_CONFIG", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.hostpaths", *AGENT_TESTS]
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
