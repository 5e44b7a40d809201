"""Shared fixtures. Runtime tests run twice: in the main venv (ai-edge-litert) and in the tflite-runtime venv;
``FIELDNODE_TEST_BACKEND`` says which backend the venv must provide, and the tests check they got it."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEST_MODELS = ROOT / "tests" / "models"
EXPECTED_BACKEND = os.environ.get("FIELDNODE_TEST_BACKEND", "auto")
# No verdict of the suite may depend on whether this machine has a `fieldnode` user or group (a board, or the machine
# that builds its image, has them): the agent's user is named as one that exists nowhere (device.configfiles).
os.environ.setdefault("FIELDNODE_SERVICE_USER", "fieldnode-test-absent")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/runtime/" in item.nodeid.replace(os.sep, "/"):
            item.add_marker(pytest.mark.runtime)


@pytest.fixture(scope="session")
def backend():
    """The backend these tests run on; fails (never skips) when the venv lacks the one it should have."""
    from device.runtime.backends import load_backend

    b = load_backend(EXPECTED_BACKEND)
    if EXPECTED_BACKEND != "auto":
        assert b.name == EXPECTED_BACKEND
    return b


@pytest.fixture
def settings(backend):
    """Builds RuntimeSettings on the backend under test: ``settings(isolation="inline", ...)``."""
    from device.runtime.runtime import RuntimeSettings

    def make(**kw):
        kw.setdefault("backend", backend.name)
        kw.setdefault("delegate", "cpu")
        return RuntimeSettings(**kw)

    return make


@pytest.fixture(scope="session")
def vibration():
    from device.runtime.manifest import bundled_model_dir, load_manifest

    return load_manifest(bundled_model_dir())


@pytest.fixture
def single_model(tmp_path):
    """Copies a .tflite (or writes bytes) into tmp_path and returns its one-variant manifest."""
    from device.runtime.manifest import load_manifest

    def make(src, name="model.tflite"):
        dst = tmp_path / name
        if isinstance(src, (bytes, bytearray)):
            dst.write_bytes(src)
        else:
            shutil.copyfile(src, dst)
        return load_manifest(str(dst))

    return make


@pytest.fixture
def tmpfs(tmp_path):
    """Mounts small real filesystems for full-disk tests: ``tmpfs(size_bytes) -> path``, unmounted afterwards
    whatever the test did. Needs root, as CI runs; fails, never skips, when it cannot mount."""
    mounts: list[pathlib.Path] = []

    def mount(size: int) -> str:
        mnt = tmp_path / f"tmpfs-{len(mounts)}"
        mnt.mkdir()
        run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
        if run.returncode != 0:
            pytest.fail(f"cannot mount a {size}-byte tmpfs at {mnt} (these tests need root): "
                        f"{(run.stderr or run.stdout).strip()}")
        mounts.append(mnt)
        return str(mnt)

    yield mount
    for mnt in mounts:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
