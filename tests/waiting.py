"""The one way a test waits for something that happens on another thread or in another process.

:func:`eventually` polls a predicate until it holds or a generous bound passes. The bound is not a claim about
speed: it only turns a hang into a failure that says what never happened. A negative check ("X never happens")
must not sleep and then look: wait for a positive event that comes after the moment X would have happened.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def eventually(predicate: Callable[[], T], timeout: float = 30.0, what: str | Callable[[], str] = "the condition",
               detail: Callable[[], object] | None = None, interval: float = 0.01) -> T:
    """Returns the first truthy value of ``predicate()``, polled every ``interval`` seconds.

    Args:
        predicate: Called until it returns something truthy; an exception it raises propagates.
        timeout: How long to wait before failing (a bound against hangs, never an assertion on speed).
        what: What is awaited, for the failure message (or a function that says it, called only on failure).
        detail: Called only on failure; what it returns is added to the message (the state that was seen).
        interval: Seconds between two calls.

    Returns:
        The truthy value the predicate returned.

    Raises:
        AssertionError: Nothing truthy came back within ``timeout`` seconds; the message names ``what``.
    """
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            said = what() if callable(what) else what
            more = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"{said} did not happen within {timeout:g} s{more}")
        time.sleep(interval)
