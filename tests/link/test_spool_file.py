"""The spool by composition: the file object (:class:`SpoolFile`) opens and recovers the file and returns what it
holds; the :class:`Spool` adopts it. Nothing outside spool.py writes the Spool's counters."""

from __future__ import annotations

import ast
import os

from device.link.spool import open as spoolopen
from device.link.spool.db import Kind
from device.link.spool.spool import Spool
from drivers.sim.clock import SimClock

SPOOL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "device", "link", "spool")
TOPIC = "fieldnode/v1/d/result"


def _spool_file(path: str, events: list) -> spoolopen.SpoolFile:
    return spoolopen.SpoolFile(path, 64 * 1024 * 1024, 0, SimClock(), lambda k, d: events.append((k, d)))


def test_the_spool_is_no_mixin():
    assert Spool.__mro__ == (Spool, object)


def test_no_module_of_the_spool_but_spool_py_assigns_to_another_objects_private_attribute():
    """Only ``self._x = ...`` inside a class's own methods: no ``spool._count = ...`` from another file."""
    bad = []
    for name in sorted(os.listdir(SPOOL_DIR)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(SPOOL_DIR, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(el, ast.Attribute) and el.attr.startswith("_") and not (
                            isinstance(el.value, ast.Name) and el.value.id == "self"):
                        bad.append(f"{name}:{node.lineno}")
    assert bad == []


def test_the_file_object_returns_what_the_file_holds(tmp_path):
    path = str(tmp_path / "spool" / "spool.db")
    with Spool(path, clock=SimClock()) as s:
        ids = [s.put(Kind.RESULT, TOPIC, b"r%d" % i) for i in range(3)] + [s.put(Kind.EVENT, TOPIC, b"e")]
    events: list = []
    f = _spool_file(path, events)
    try:
        opened = f.open()
        assert opened.outcome is None and events == []
        assert opened.state.counts[Kind.RESULT] == 3 and opened.state.counts[Kind.EVENT] == 1
        assert opened.state.last_id == max(ids)
        assert f.db is not None and f.disk is not None
    finally:
        f.close()
    assert f.db is None


def test_a_recovery_returns_its_outcome_and_the_id_floor_survives_it(tmp_path):
    path = str(tmp_path / "spool.db")
    with Spool(path, clock=SimClock()) as s:
        for i in range(2000):
            s.put(Kind.RESULT, TOPIC, b"%06d" % i + b"x" * 94)
        top = s.durable_id
    with open(path, "r+b") as fh:  # the header survives, the pages after it are garbage
        fh.seek(4096)
        fh.write(os.urandom(8 * 4096))
    events: list = []
    f = _spool_file(path, events)
    try:
        opened = f.open()
        assert opened.outcome is not None and [k for k, _ in events] == ["spool_corrupt"]
        floor = top + 1000
        again = f.recover(RuntimeError("found corrupt again"), last_id=floor)
        assert again.outcome is not None  # the floor is written to the file, not claimed as committed ids
        assert again.state.last_id < floor
    finally:
        f.close()
    with Spool(path, clock=SimClock()) as s:
        assert s.put(Kind.RESULT, TOPIC, b"next") > floor  # ids never go back across a recovery
