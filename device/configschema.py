"""The configuration schema's building blocks, and the one checker of typed values.

:func:`setting` and :func:`section` live apart from :mod:`device.config` so that each package can declare its
own section next to the code that uses it (``power/config.py``, ``drivers/config.py``) and
:mod:`device.config` assembles the tree. A section dataclass may also define ``validate(self)``, returning
``[(key path, message), ...]`` for the rules no single key can check (one threshold above another, a TLS
broker without its CA file); :mod:`device.config` runs them after every key has passed its own checks.

:class:`ValueSpec` is the typed-value checker shared by the configuration (one spec per key) and by the MQTT
command arguments (:class:`device.link.commands.Arg`), so a value is judged and described the same way
wherever it comes from: a boolean is never an integer, an integer is accepted (as a float) where only a number
is, NaN and infinities are refused, bounds are inclusive. :func:`show` renders a value for a message.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

# JSON's words, which are also TOML's (a TOML table is a JSON object).
TYPE_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string", dict: "object", list: "array"}

_SHOW_LIMIT = 60  # characters of a value shown in a message; values may come from the network


def setting(
    default: Any, doc: str, *, choices: tuple[str, ...] = (), minimum: float | None = None,
    maximum: float | None = None, pattern: str | None = None, expect: str = "", allow_empty: bool = False,
) -> Any:
    """Declares one scalar key of a section; its type is the field's annotation.

    Args:
        default: The value used when the key is absent.
        doc: One-line description, shown by ``describe()`` and the docs.
        choices: If given, the value must be one of these.
        minimum: Inclusive lower bound for numbers.
        maximum: Inclusive upper bound for numbers.
        pattern: Regular expression the whole string value must match.
        expect: What a valid value looks like, for messages (required with ``pattern``).
        allow_empty: With ``pattern``: the empty string is also accepted (it means "automatic").

    Returns:
        A dataclass field carrying the constraints in its metadata.
    """
    if pattern is not None and not expect:
        raise ValueError("a pattern needs an 'expect' text for error messages")
    meta = {"doc": doc, "choices": tuple(choices), "min": minimum, "max": maximum, "pattern": pattern,
            "expect": expect, "allow_empty": allow_empty}
    return field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
    """Declares a nested sub-table whose keys are the fields of the section dataclass ``cls``.

    Args:
        cls: A frozen dataclass built from :func:`setting` and :func:`section` fields.
        doc: One-line description of the table.

    Returns:
        A dataclass field whose default is ``cls()``.
    """
    return field(default_factory=cls, metadata={"doc": doc, "section": True})


def spec_of(tp: Any, meta: Mapping[str, Any], default: Any = None) -> ValueSpec:
    """The :class:`ValueSpec` of a key declared with :func:`setting` and annotated with type ``tp``.

    Raises:
        ValueError: The declaration is inconsistent (an unsupported type, bounds on a string, a default or
            choice that is not valid for the key).
    """
    return ValueSpec(tp, choices=meta.get("choices", ()), minimum=meta.get("min"), maximum=meta.get("max"),
                     pattern=meta.get("pattern"), expect=meta.get("expect", ""),
                     allow_empty=meta.get("allow_empty", False), default=default)


@dataclass(frozen=True)
class ValueSpec:
    """What a valid value is: its type(s) and constraints. Checks values and says what was expected.

    Attributes:
        types: The accepted types, from bool, int, float, str, dict and list (one type or a tuple).
        choices: If given, the value must equal one of these (a boolean only ever equals a boolean).
        minimum: Inclusive lower bound for numbers.
        maximum: Inclusive upper bound for numbers.
        pattern: Regular expression a string value must match as a whole.
        expect: What a string matching ``pattern`` looks like, for messages.
        allow_empty: With ``pattern``: the empty string is accepted too.
        default: A default to check against the spec at definition; None means none.

    Raises:
        ValueError: At definition: an unsupported type, bounds without a numeric type, a pattern without the
            str type or without ``expect``, or a choice or default that is not valid.
    """

    types: Any
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    pattern: str | None = None
    expect: str = ""
    allow_empty: bool = False
    default: Any = None

    def __post_init__(self) -> None:
        types = self.types if isinstance(self.types, tuple) else (self.types,)
        object.__setattr__(self, "types", types)
        object.__setattr__(self, "choices", tuple(self.choices))
        if not types or any(not isinstance(t, type) or t not in TYPE_NAMES for t in types):
            raise ValueError(f"type must be bool, int, float, str, dict, list or a tuple of them, got "
                             f"{self.types!r}")
        if (self.minimum is not None or self.maximum is not None) and not {int, float} & set(types):
            raise ValueError("minimum/maximum need an int or float type")
        if self.pattern is not None:
            if str not in types or not self.expect:
                raise ValueError("a pattern needs the str type and an 'expect' text for messages")
            try:
                object.__setattr__(self, "_regex", re.compile(self.pattern))
            except re.error as exc:
                raise ValueError(f"pattern {self.pattern!r}: {exc}") from None
        for c in self.choices:
            if self.normalize(c) is None:
                raise ValueError(f"choice or default {c!r} is not {self._kind()}")
        if self.default is not None and self.problem(self.default):
            raise ValueError(f"choice or default {self.default!r} is not {self.expected()}")

    def normalize(self, value: Any) -> Any:
        """``value`` in its accepted form (an int as a float where only float is accepted; a tuple is accepted
        where a list is), or None when its type is not accepted. None itself is never a valid value."""
        for t in self.types:
            if t is list and isinstance(value, tuple):
                return value  # a frozen section's default (a list cannot be a dataclass default)
            if t is bool or not isinstance(value, bool):  # a boolean is only ever a boolean
                if t is float and isinstance(value, int) and not isinstance(value, bool) and int not in self.types:
                    try:
                        value = float(value)
                    except OverflowError:  # a JSON integer with hundreds of digits
                        return None
                if isinstance(value, t) and (t is not float or math.isfinite(value)):
                    return value
        return None

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not valid (``expected ..., got ...``), or None when it is.

        The value is shown with its type when the type is wrong, and alone when a constraint fails.
        """
        v = self.normalize(value)
        if v is None:
            return f"expected {self.expected()}, got {show(value)}"
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if (
            (number and ((self.minimum is not None and v < self.minimum)
                         or (self.maximum is not None and v > self.maximum)))
            or (self.choices and not any(v == c and isinstance(c, bool) == isinstance(v, bool)
                                         for c in self.choices))
            or (self.pattern is not None and isinstance(v, str) and not (self.allow_empty and v == "")
                and not self._regex.fullmatch(v))
        ):
            return f"expected {self.expected()}, got {show(value, typed=False)}"
        return None

    def expected(self) -> str:
        """What a valid value looks like, e.g. ``an integer from 1 to 64`` or ``one of 'full', 'lite'``."""
        if self.choices:
            return "one of " + ", ".join(show(c, typed=False) for c in self.choices)
        return self._kind()

    def _kind(self) -> str:
        """What a valid value looks like, leaving the choices aside."""
        words = []
        for t in self.types:
            if t is str and self.pattern is not None:
                words.append(f"'' or {self.expect}" if self.allow_empty else self.expect)
            else:
                words.append(("an " if TYPE_NAMES[t][0] in "aeiou" else "a ") + TYPE_NAMES[t])
        text = " or ".join(words)
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            return f"{text} from {_num(lo)} to {_num(hi)}"
        return f"{text} >= {_num(lo)}" if lo is not None else f"{text} <= {_num(hi)}" if hi is not None else text

    def type_text(self) -> str:
        """The type names joined by ``or``, e.g. ``integer or string`` (for descriptions)."""
        return " or ".join(TYPE_NAMES[t] for t in self.types)


def show(value: Any, typed: bool = True) -> str:
    """Renders a value for a message: bounded, JSON's words, never recursing into containers.

    Args:
        value: Any value, possibly from a file or the network.
        typed: Append the type in parentheses, e.g. ``'4' (string)``; containers and null name themselves.

    Returns:
        ``'text'``, ``4.0 (number)``, ``true (boolean)``, ``null``, ``an object`` or ``an array``.
    """
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, bool):
        text = "true" if value else "false"
    else:
        try:
            text = repr(value) if isinstance(value, str) else str(value)
        except ValueError:  # an integer past Python's digit limit for str()
            text = f"an integer of {value.bit_length()} bits"
        if len(text) > _SHOW_LIMIT:
            text = text[:_SHOW_LIMIT - 3] + "..."
    if typed:
        text += f" ({TYPE_NAMES.get(type(value), type(value).__name__)})"
    return text


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))
