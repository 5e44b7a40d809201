"""A pytest plugin that moves the board's default paths out of the host: ``-p tests.hostpaths`` with
``FIELDNODE_TEST_HOST_ROOT=DIR`` points every default that names a host path (the config file, ``device.state_dir``,
``device.runtime_dir``, ``link.trust_dir``, ``update.identity_file``) under ``DIR``, for that pytest process only.

``tests/unit/test_host_paths.py`` runs agent tests this way with ``DIR`` a directory that refuses writes, and fails
if anything was written there: a test that leans on a default would otherwise read or write the host's ``/etc``,
``/run`` or ``/var``, and fail on the very machines where a real agent runs (or disturb it).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

ENV = "FIELDNODE_TEST_HOST_ROOT"


def _move_default(cls: type, name: str, value: str) -> None:
    """Rebinds a frozen dataclass field's default: the generated ``__init__`` keeps its defaults in a tuple."""
    params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.default is not p.empty]
    defaults = list(cls.__init__.__defaults__)
    defaults[[p.name for p in params].index(name)] = value
    cls.__init__.__defaults__ = tuple(defaults)
    cls.__dataclass_fields__[name].default = value
    setattr(cls, name, value)


def move_host_defaults(root: str) -> dict[str, str]:
    """Points the host-path defaults under ``root``; returns what now stands where."""
    from device import config
    from device.link import envelope
    from device.link.config import LinkConfig
    from device.update.config import UpdateConfig

    moved = {
        "config": os.path.join(root, "etc", "fieldnode", "fieldnode.toml"),
        "device.state_dir": os.path.join(root, "var", "lib", "fieldnode"),
        "device.runtime_dir": os.path.join(root, "run", "fieldnode"),
        "link.trust_dir": os.path.join(root, "etc", "fieldnode", "trust"),
        "update.identity_file": os.path.join(root, "etc", "fieldnode", "update.age"),
    }
    config.DEFAULT_PATH = moved["config"]
    envelope.DEFAULT_TRUST_DIR = moved["link.trust_dir"]
    _move_default(config.DeviceConfig, "state_dir", moved["device.state_dir"])
    _move_default(config.DeviceConfig, "runtime_dir", moved["device.runtime_dir"])
    _move_default(LinkConfig, "trust_dir", moved["link.trust_dir"])
    _move_default(UpdateConfig, "identity_file", moved["update.identity_file"])
    assert dataclasses.is_dataclass(config.DeviceConfig)
    return moved


def pytest_configure(config: pytest.Config) -> None:  # noqa: ARG001 - pytest's hook signature
    root = os.environ.get(ENV)
    if root:
        move_host_defaults(root)
