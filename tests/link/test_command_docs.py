"""docs/mqtt.md's command table lists exactly the commands the agent registers, each with its privilege and
whether the local control socket answers it (the table once named a ``restart`` command that never existed)."""

from __future__ import annotations

import os
import re

from device.agent.commands import build_registry
from tests.unit.test_control_router import ops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def documented() -> dict[str, tuple[bool, bool]]:
    """``{command: (privileged, local)}`` from the command table of docs/mqtt.md."""
    with open(os.path.join(ROOT, "docs", "mqtt.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    head = lines.index("| command | privileged | local | args | result |")
    rows = {}
    for line in lines[head + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = re.fullmatch(r"`([a-z][a-z0-9_.-]*)`", cells[0])
        assert name, f"docs/mqtt.md: a command row that does not start with a `name`: {line}"
        assert cells[1] in ("yes", "no") and cells[2] in ("yes", "no"), line
        assert name.group(1) not in rows, f"docs/mqtt.md lists {name.group(1)} twice"
        rows[name.group(1)] = (cells[1] == "yes", cells[2] == "yes")
    return rows


def test_the_command_table_lists_exactly_the_registry():
    registry = build_registry(ops())
    actual = {n: (registry.get(n).privileged, registry.get(n).local) for n in registry.names()}
    docs = documented()
    assert sorted(set(docs) - set(actual)) == [], "documented in docs/mqtt.md, but no such command"
    assert sorted(set(actual) - set(docs)) == [], "registered, but missing from docs/mqtt.md's table"
    assert docs == actual  # privileged and local as registered


def test_the_module_table_lists_exactly_the_registry_too():
    import device.agent.commands as module

    names = re.findall(r"^\| ``([a-z][a-z0-9_.-]*)`` \|", module.__doc__, flags=re.M)
    assert sorted(names) == build_registry(ops()).names()
