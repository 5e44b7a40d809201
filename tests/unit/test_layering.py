"""The package layering written in docs/architecture.md, checked on the source.

- ``drivers/`` and ``power/`` sit below the agent: they import only the base modules of ``device/`` (the clock,
  the errors, the config schema and the config, the state files, the logs and the typed results), never the
  agent, the runtime, the link or the CLI.
- ``device/`` never imports ``tools/``: the agent runs on a board without the operator's tools in mind, and the
  MQTT ``diag`` command uses the checks of ``device/diag/``, not the CLI that prints them.
- No module imports another module's private names (``from x import _y``, or ``x._y`` on a module of ours).
- No import cycles among our modules, counting imports inside functions and the tools that ``tools/cli.py``
  loads by name (``_lazy("tools.repo.cli", ...)``), which are edges of the graph like any import.
- The GPIO seam finds its backends by name instead of importing them, so no backend (the simulated one
  included) is in an import cycle with the seam.
"""

from __future__ import annotations

import ast
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("device", "drivers", "power", "tools")
BASE_MODULES = {"device.clock", "device.errors", "device.configschema", "device.config", "device.statefile",
                "device.logs", "device.results"}


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def python_files(*packages: str) -> list[str]:
    found = []
    for pkg in packages:
        for d, _dirs, files in os.walk(os.path.join(ROOT, pkg)):
            found += [os.path.join(d, f) for f in files if f.endswith(".py")]
    return sorted(found)


def _parse(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def lazy_modules(tree: ast.Module) -> list[tuple[int, str]]:
    """Modules loaded by name: ``_lazy("pkg.mod", ...)`` (the CLI's subcommands) and
    ``importlib.import_module("pkg.mod")`` with a literal name."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else ""
            if name in ("_lazy", "import_module") and node.args[0].value.split(".")[0] in PACKAGES:
                out.append((node.lineno, node.args[0].value))
    return out


def imports_of(path: str, tree: ast.Module | None = None) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth (function-level imports and modules loaded by name count too).
    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module, else of ``pkg``."""
    tree = tree or _parse(path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names if is_our_module(f"{node.module}.{a.name}")]
            out += [(node.lineno, s) for s in subs]
            if len(subs) < len(node.names):
                out.append((node.lineno, node.module))
    return sorted(out + lazy_modules(tree))


def is_our_module(name: str) -> bool:
    if name.split(".")[0] not in PACKAGES:
        return False
    base = os.path.join(ROOT, *name.split("."))
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py"))


def layering_violations(paths: list[str]) -> list[str]:
    """Imports of ``device`` other than its base modules (for ``drivers/`` and ``power/``)."""
    bad = []
    for path in paths:
        for line, mod in imports_of(path):
            if (mod == "device" or mod.startswith("device.")) and mod not in BASE_MODULES \
                    and not any(mod.startswith(b + ".") for b in BASE_MODULES):
                bad.append(f"{os.path.relpath(path, ROOT)}:{line} imports {mod}")
    return bad


def tools_imports(paths: list[str]) -> list[str]:
    return [f"{os.path.relpath(p, ROOT)}:{line} imports {mod}" for p in paths for line, mod in imports_of(p)
            if mod == "tools" or mod.startswith("tools.")]


def private_imports(paths: list[str]) -> list[str]:
    """``from ours import _name`` and ``module._name`` on a module of ours bound by an import."""
    bad = []
    for path in paths:
        tree, where = _parse(path), os.path.relpath(path, ROOT)
        modules: set[str] = set()  # local names bound to our modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] in PACKAGES:
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{where}:{node.lineno} imports {node.module}.{a.name}")
                    if is_our_module(f"{node.module}.{a.name}"):
                        modules.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and is_our_module(a.name):
                        modules.add(a.asname)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                bad.append(f"{where}:{node.lineno} uses {node.value.id}.{node.attr}")
    return bad


def import_graph(paths: list[str]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in paths:
        me = module_name(path)
        edges = graph.setdefault(me, set())
        for _line, mod in imports_of(path):
            # an import of a.b.c runs a/__init__ and a/b/__init__ too, but those are not edges of a cycle
            # that code can break; the module itself is.
            if is_our_module(mod) and mod != me:
                edges.add(mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("package", ["drivers", "power"])
def test_lower_packages_import_only_device_base_modules(package):
    assert layering_violations(python_files(package)) == []


def test_device_never_imports_tools():
    assert tools_imports(python_files("device")) == []


def test_no_module_imports_another_modules_private_names():
    assert private_imports(python_files(*PACKAGES)) == []


def test_no_import_cycles():
    assert cycles(import_graph(python_files(*PACKAGES))) == []


def test_every_tool_the_cli_loads_by_name_exists_and_is_in_the_graph():
    cli = os.path.join(ROOT, "tools", "cli.py")
    loaded = [m for _line, m in lazy_modules(_parse(cli))]
    assert len(loaded) >= 10
    for name in loaded:
        assert importlib.util.find_spec(name) is not None, name
    assert set(loaded) <= import_graph([cli])["tools.cli"]


def test_the_checks_see_violations(tmp_path):
    """Each scan can fail: imports at module and function level, a string-loaded tool, a private name, a cycle."""
    f = tmp_path / "bad.py"
    f.write_text("import device.clock\nfrom device import errors\n\ndef g():\n    from device.agent import agent\n"
                 "    import device.link.client\n    _lazy('tools.repo.cli', 'repo', 'x')\n"
                 "from device.link.keyfile import _parse_key\nfrom device.link import session as s\n"
                 "s._whatever\n")
    assert [v.split(" imports ")[1] for v in layering_violations([str(f)])] == [
        "device.agent.agent", "device.link.client", "device.link.keyfile", "device.link.session"]
    assert [v.split(" imports ")[1] for v in tools_imports([str(f)])] == ["tools.repo.cli"]
    assert [v.split(" ", 1)[1] for v in private_imports([str(f)])] == [
        "imports device.link.keyfile._parse_key", "uses s._whatever"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


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
