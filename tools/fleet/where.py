"""``--where``: comma-separated conditions on a board's retained state, all of which must hold.

``key OP value`` with OP one of ``=``, ``!=``, ``<``, ``<=``, ``>``, ``>=`` on the keys:

* ``model`` and ``version``: one of the board's models (its name, its version); the conditions on both hold for the
  same model (``model=vibration,version<1.2`` is a board whose vibration model is older than 1.2). Versions compare
  as dotted numbers when both are (``1.10 > 1.9``), else as strings;
* ``state`` (``online``, ``offline``, ``lost``), ``update`` (the update state), ``variant``, ``level``: ``=`` and
  ``!=``;
* ``group`` and ``fault``: ``=`` is "among the board's", ``!=`` "not among them".

Only ``version`` takes ``<``, ``<=``, ``>`` and ``>=``. A bad expression is refused naming what is wrong.
"""

from __future__ import annotations

import argparse
import operator
import re
from dataclasses import dataclass
from typing import Callable

from device.agent.summary import UPDATE_STATES
from device.link import wire
from tools.fleet.states import Board

KEYS = ("model", "version", "variant", "state", "update", "group", "level", "fault")
_OPS: dict[str, Callable[[object, object], bool]] = {
    "<=": operator.le, ">=": operator.ge, "!=": operator.ne, "=": operator.eq, "<": operator.lt, ">": operator.gt}
_COND_RE = re.compile(r"\s*([A-Za-z_]+)\s*(<=|>=|!=|=|<|>)(.*)\Z")
_NUMERIC_RE = re.compile(r"\d+(\.\d+)*\Z")


@dataclass(frozen=True)
class Condition:
    key: str
    op: str
    value: str


def parse_where(text: str) -> tuple[Condition, ...]:
    """The conditions of a ``--where`` expression.

    Raises:
        ValueError: An empty condition, an unknown key or operator, an empty value, an ordering on a key other
            than ``version``, a state or update state that does not exist; the message names the condition.
    """
    if not text.strip():
        raise ValueError("empty expression; expected key=value[,key<value...]")
    out = []
    for i, part in enumerate(text.split(","), 1):
        m = _COND_RE.match(part)
        if not part.strip():
            raise ValueError(f"condition {i} is empty (two commas, or one at either end)")
        if m is None:
            raise ValueError(f"condition {i} ({part.strip()!r}): expected KEY OP VALUE with OP one of "
                             f"=, !=, <, <=, >, >=")
        key, op, value = m.group(1), m.group(2), m.group(3).strip()
        if key not in KEYS:
            raise ValueError(f"condition {i} ({part.strip()!r}): unknown key {key!r}; expected one of "
                             f"{', '.join(KEYS)}")
        if not value or any(c in value for c in "<>=!"):
            raise ValueError(f"condition {i} ({part.strip()!r}): expected one value after {op!r}")
        if op not in ("=", "!=") and key != "version":
            raise ValueError(f"condition {i} ({part.strip()!r}): {op!r} compares versions only; {key} takes "
                             f"= and !=")
        for name, allowed in (("state", wire.STATES), ("update", UPDATE_STATES)):
            if key == name and value not in allowed:
                raise ValueError(f"condition {i} ({part.strip()!r}): {value!r} is not a {name}; expected one "
                                 f"of {', '.join(allowed)}")
        out.append(Condition(key, op, value))
    return tuple(out)


def where_argument(text: str) -> tuple[Condition, ...]:
    """:func:`parse_where` as an argparse ``type`` (a bad expression: argparse's usage error, exit 2)."""
    try:
        return parse_where(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def compare_versions(a: str, op: str, b: str) -> bool:
    """``a OP b``: as dotted numbers when both are, else as strings."""
    if _NUMERIC_RE.match(a) and _NUMERIC_RE.match(b):
        return _OPS[op](tuple(int(x) for x in a.split(".")), tuple(int(x) for x in b.split(".")))
    return _OPS[op](a, b)


def matches(board: Board, conditions: tuple[Condition, ...]) -> bool:
    """Whether ``board`` meets every condition (see the module docstring)."""
    model_conds = [c for c in conditions if c.key in ("model", "version")]
    if model_conds and not any(_model_matches(name, version, model_conds) for name, version in board.models()):
        return False
    for c in conditions:
        if c.key in ("group", "fault"):
            among = c.value in (board.groups if c.key == "group" else list(board.get("faults") or []))
            if among != (c.op == "="):
                return False
        elif c.key not in ("model", "version"):
            value = board.state if c.key == "state" else (
                (board.get("update") or {}).get("state") if c.key == "update" else board.get(c.key))
            if (value == c.value) != (c.op == "="):
                return False
    return True


def _model_matches(name: str, version: str | None, conds: list[Condition]) -> bool:
    for c in conds:
        if c.key == "model" and (name == c.value) != (c.op == "="):
            return False
        if c.key == "version" and (version is None or not compare_versions(version, c.op, c.value)):
            return False
    return True
