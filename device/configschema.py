"""The building blocks of the configuration schema: :func:`setting` and :func:`section`.

They live apart from :mod:`device.config` so that each package can declare its own section next to the
code that uses it (``power/config.py``, ``drivers/config.py``) and :mod:`device.config` assembles the tree.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def setting(
    default: Any, doc: str, *, choices: tuple[str, ...] = (), minimum: float | None = None,
    maximum: float | None = None, pattern: str | None = None, expect: str = "", allow_empty: bool = False,
) -> Any:
    """Declares one scalar key of a section.

    Args:
        default: The value used when the key is absent.
        doc: One-line description, shown by :func:`describe` and the docs.
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
