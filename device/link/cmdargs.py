"""A command's arguments: :class:`Arg` (one argument's type and constraints) and :func:`check_args`, which the
dispatcher and the local control socket both run before a handler (:mod:`device.link.commands`)."""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from device.configschema import ValueSpec, show
from device.link.errors import BadArgs

ARG_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


@dataclass(frozen=True)
class Arg:
    """One command argument: its JSON type and constraints, judged by the config's own checker.

    :class:`device.configschema.ValueSpec` does the checking, so a value means the same here as in the config:
    a boolean is not an integer; an integer is accepted (and passed on as a float) where only a number is
    expected; NaN and infinities are refused. ``minimum``/``maximum`` (inclusive) apply to numbers,
    ``choices`` to any value.

    Raises:
        ValueError: At definition: a bad name, an unsupported type (bool, int, float, str, dict, list), bounds
            without a numeric type, a required argument with a default, or a choice or default that is invalid.
    """

    name: str
    type: type | tuple[type, ...]
    required: bool = False
    default: Any = None
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        if not isinstance(self.name, str) or not ARG_NAME_RE.match(self.name):
            raise ValueError(f"argument name {self.name!r}: expected [A-Za-z_][A-Za-z0-9_]{{0,63}}")
        if self.required and self.default is not None:
            raise ValueError(f"argument {self.name!r}: a required argument cannot have a default")
        try:
            spec = ValueSpec(self.type, choices=self.choices, minimum=self.minimum, maximum=self.maximum,
                             default=self.default)
        except ValueError as exc:
            raise ValueError(f"argument {self.name!r}: {exc}") from None
        object.__setattr__(self, "_spec", spec)  # not a field: asdict(), == and describe() leave it out
        object.__setattr__(self, "default", spec.normalize(self.default))  # 1 -> 1.0 for a float argument

    def expected(self) -> str:
        """What a valid value looks like, e.g. ``an integer from 1 to 64`` or ``one of 'full', 'lite'``."""
        return self._spec.expected()

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not valid for this argument (for a message), or None when it is."""
        return self._spec.problem(value)

    def describe(self) -> dict:
        """A JSON-able description (``fieldnode send --help`` and the docs show it)."""
        return {**dataclasses.asdict(self), "type": self._spec.type_text(), "choices": list(self.choices)}

    def _normalize(self, value: Any) -> Any:
        """``value`` as passed to the handler when its type is accepted, else None."""
        return self._spec.normalize(value)


def check_args(specs: tuple[Arg, ...], given: dict) -> dict:
    """The arguments a handler gets: ``given`` checked against ``specs``, defaults filled in.

    Raises:
        BadArgs: An unknown argument, a missing required one, or an invalid value; the message names it.
    """
    known = {a.name: a for a in specs}
    unknown = [k for k in given if k not in known]
    if unknown:
        hint = f"known: {', '.join(known)}" if known else "this command takes no arguments"
        raise BadArgs(f"unknown argument(s) {listed(unknown)}; {hint}")
    out = {}
    for a in specs:
        if a.name in given:
            why = a.problem(given[a.name])
            if why is not None:
                raise BadArgs(f"argument '{a.name}': {why}")
            out[a.name] = a._normalize(given[a.name])
        elif a.required:
            raise BadArgs(f"missing required argument '{a.name}' ({a.expected()})")
        elif a.default is not None:
            out[a.name] = copy.deepcopy(a.default)  # a handler mutating a list default must not change it
    return out


def listed(keys: list) -> str:
    """The first few of ``keys`` for a message: ``'a', 'b', ...``."""
    return ", ".join(show(k, typed=False) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
