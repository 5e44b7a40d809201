"""One error contract: every code in one style, each code one meaning, all of them in docs/errors.md; one table
of exit codes that every tool returns from.

The rule for shared codes: a code belongs to one class; another class may carry it only if it subclasses that
class (a finer Python type for the same condition, like ``NoMatchingIdentity`` under ``DecryptError``, or the
MQTT dispatcher's ``CommandCrashed`` under the CLI's ``InternalError``).
"""

from __future__ import annotations

import ast
import os
import re

import pytest

from device import errors
from device.errors import CODE_RE, Exit, FieldnodeError, class_codes, error_classes, registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("device", "drivers", "power", "tools")
DOC = os.path.join(ROOT, "docs", "errors.md")


@pytest.fixture(scope="module")
def classes():
    return error_classes(PACKAGES)


def doc_text() -> str:
    with open(DOC, encoding="utf-8") as f:
        return f.read()


def doc_codes() -> list[str]:
    """The codes of the table under ``## Codes``: the first column of each row, in backquotes."""
    section = doc_text().split("\n## Codes\n", 1)[1]
    return re.findall(r"^\| `([^`]+)` \|", section, re.M)


def name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def test_every_module_is_walked(classes):
    # The walk imports every module, so a family defined anywhere is seen (not only the ones imported so far).
    modules = {c.__module__ for c in classes}
    assert {"device.errors", "device.link.errors", "device.update.errors", "device.runtime.errors",
            "drivers.errors", "device.control", "tools.provision", "tools.install.cli"} <= modules


def test_every_code_is_snake_case(classes):
    bad = [(name(c), code) for c in classes for code in class_codes(c) if not CODE_RE.match(code)]
    assert bad == []


def test_no_two_classes_share_a_code_unless_one_subclasses_the_other(classes):
    by_code: dict[str, list[type]] = {}
    for c in classes:
        for code in class_codes(c):
            by_code.setdefault(code, []).append(c)
    clashes = []
    for code, owners in by_code.items():
        roots = [c for c in owners if all(issubclass(o, c) for o in owners)]
        if not roots:
            clashes.append((code, sorted(name(c) for c in owners)))
    assert clashes == []
    assert registry(PACKAGES).keys() == by_code.keys()


def test_the_registry_refuses_a_clash_and_a_code_out_of_style():
    class Root(Exception):  # not a FieldnodeError: the tree's own walk must not see these
        code = "root"

    class A(Root):
        code = "clash"

    class B(Root):
        code = "clash"

    class C(A):  # inherits A's code: the same condition, a finer type
        pass

    class D(A):
        code = "clash"  # says it again: still A's

    with pytest.raises(ValueError, match="'clash' belongs to .*A and .*B, and neither subclasses the other"):
        registry(classes=[Root, A, B])
    B.code = "Clash"
    with pytest.raises(ValueError, match="'Clash' is not snake_case"):
        registry(classes=[Root, A, B])
    B.code = "other"
    assert registry(classes=[D, C, B, A, Root]) == {"clash": A, "other": B, "root": Root}


def test_the_codes_that_were_renamed_are_gone(classes):
    codes = registry(PACKAGES)
    assert not [c for c in codes if c.startswith("e_")]
    owners = [c for c in classes if "reply_malformed" in class_codes(c)]
    assert [name(c) for c in owners] == ["device.link.errors.ReplyMalformed"]
    from device.control import ControlProtocolError
    from device.link.errors import BadSignature
    from device.update.errors import HashMismatch, SignatureError

    assert SignatureError.code != BadSignature.code
    assert HashMismatch.code == "hash_mismatch"
    assert ControlProtocolError.code != "reply_malformed"


def test_docs_list_every_code_and_no_other(classes):
    listed = doc_codes()
    assert len(listed) == len(set(listed)), [c for c in listed if listed.count(c) > 1]
    codes = registry(PACKAGES)
    assert sorted(set(codes) - set(listed)) == [], "codes missing from docs/errors.md"
    assert sorted(set(listed) - set(codes)) == [], "docs/errors.md lists codes no class has"


def test_docs_rows_say_what_to_do():
    section = doc_text().split("\n## Codes\n", 1)[1]
    rows = [r for r in section.splitlines() if r.startswith("| `")]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) >= 4 and all(cells[:4]), row


# ------------------------------------------------------------------------------------------------ exit codes


def test_the_exit_table_is_distinct_and_documented():
    values = [m.value for m in Exit]
    assert len(values) == len(set(values))
    assert (Exit.OK, Exit.FAILED, Exit.USAGE, Exit.TIMEOUT, Exit.UNREACHABLE) == (0, 1, 2, 3, 4)
    table = doc_text().split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| (\d+) \| `([A-Z_]+)` \|", table, re.M))
    assert rows == {str(m.value): m.name for m in Exit}


def test_send_keeps_the_table():
    from tools import send

    assert (send.EXIT_OK, send.EXIT_ERROR_REPLY, send.EXIT_USAGE, send.EXIT_TIMEOUT, send.EXIT_CONNECT) == (
        Exit.OK, Exit.FAILED, Exit.USAGE, Exit.TIMEOUT, Exit.UNREACHABLE)


def test_diag_never_exits_with_the_usage_code():
    from device.diag import runner
    from device.diag.checks import FAIL, OK, SKIP, WARN, Check

    assert runner.exit_code([Check("a", OK, ""), Check("b", SKIP, "")]) == Exit.OK
    assert runner.exit_code([Check("a", WARN, "x", "fix")]) == Exit.WARN
    assert runner.exit_code([Check("a", WARN, "x", "fix"), Check("b", FAIL, "x", "fix")]) == Exit.FAULTS
    assert Exit.USAGE not in set(runner.EXIT.values())


def test_config_errors_are_usage_and_an_unreachable_agent_is_unreachable():
    from device.control import ControlUnavailable

    assert errors.ConfigError("x").exit_code == Exit.USAGE
    assert ControlUnavailable("x").exit_code == Exit.UNREACHABLE
    assert FieldnodeError().exit_code == Exit.FAILED


def command_modules() -> list[str]:
    """``tools/cli.py`` and every module it loads a subcommand from (``_lazy("tools.repo.cli", ...)``)."""
    with open(os.path.join(ROOT, "tools", "cli.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = [n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id == "_lazy" and n.args and isinstance(n.args[0], ast.Constant)]
    assert "device.agent.daemon" in names and "tools.diag.cli" in names
    return [os.path.join("tools", "cli.py")] + sorted(os.path.join(*n.split(".")) + ".py" for n in names)


TOOL_MODULES = command_modules()


def literal_exits(tree: ast.AST) -> list[int]:
    """Lines of ``return N``, ``return N if ... else M`` and ``sys.exit(N)`` with an integer literal N."""

    def is_int(node) -> bool:
        if isinstance(node, ast.IfExp):
            return is_int(node.body) or is_int(node.orelse)
        return isinstance(node, ast.Constant) and type(node.value) is int

    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Return) and node.value is not None and is_int(node.value):
            out.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "exit" \
                and node.args and is_int(node.args[0]):
            out.append(node.lineno)
    return out


@pytest.mark.parametrize("path", TOOL_MODULES)
def test_every_tool_exits_through_the_table(path):
    """A tool's ``run`` (and the helpers it returns from) says ``Exit.X``, never a bare number."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    runs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("run", "main", "_config",
                                                                                    "_version", "_status",
                                                                                    "_simulate", "_watch")]
    found = [line for fn in runs for line in literal_exits(fn)]
    assert found == [], f"{path}: exit codes as bare numbers on lines {found}"
