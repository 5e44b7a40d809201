"""The package layering written in docs/architecture.md, checked on the source.

``drivers/`` and ``power/`` sit below the agent: they may import only the base modules of ``device/`` (the
clock, the errors, the config schema's building blocks and the state files), never the agent, the runtime, the
link or the CLI. And the GPIO seam finds its backends by name instead of importing them, so no backend (the
simulated one included) is in an import cycle with the seam.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE_MODULES = {"device.clock", "device.errors", "device.configschema", "device.statefile"}


def imports_of(path: str) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth (function-level imports count too)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "device":  # from device import clock: the module imported is device.clock
                out += [(node.lineno, f"device.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def python_files(*packages: str) -> list[str]:
    found = []
    for pkg in packages:
        for d, _dirs, files in os.walk(os.path.join(ROOT, pkg)):
            found += [os.path.join(d, f) for f in files if f.endswith(".py")]
    return sorted(found)


def layering_violations(paths: list[str]) -> list[str]:
    bad = []
    for path in paths:
        for line, mod in imports_of(path):
            if (mod == "device" or mod.startswith("device.")) and mod not in BASE_MODULES \
                    and not any(mod.startswith(b + ".") for b in BASE_MODULES):
                bad.append(f"{os.path.relpath(path, ROOT)}:{line} imports {mod}")
    return bad


@pytest.mark.parametrize("package", ["drivers", "power"])
def test_lower_packages_import_only_device_base_modules(package):
    assert layering_violations(python_files(package)) == []


def test_the_check_sees_a_violation(tmp_path):
    """The scan itself can fail: a module-level and a function-level import of the agent are both caught."""
    f = tmp_path / "bad.py"
    f.write_text("import device.clock\nfrom device import errors\n\ndef g():\n    from device.agent import Agent\n"
                 "    import device.link.client\n    from device import cli\n")
    assert [v.split(" imports ")[1] for v in layering_violations([str(f)])] == [
        "device.agent", "device.link.client", "device.cli"]


def test_gpio_seam_names_no_backend_module():
    seam = os.path.join(ROOT, "drivers", "gpio", "__init__.py")
    mods = [m for _line, m in imports_of(seam)]
    assert not [m for m in mods if m.startswith(("drivers.sim", "drivers.gpio."))]


def test_every_gpio_backend_is_found_by_name():
    from drivers.gpio import BACKENDS, make_factory

    factory = make_factory("sim")
    try:
        assert type(factory).__module__ == BACKENDS["sim"]
    finally:
        factory.close()
    import importlib

    for name, module in BACKENDS.items():
        assert callable(importlib.import_module(module).open_factory), name
