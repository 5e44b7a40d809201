"""The root of fieldnode's exceptions, the registry of their codes, and the exit codes of every tool.

Every error the agent raises on purpose derives from :class:`FieldnodeError`. Each package adds a family
below it (configuration, runtime, link, update, drivers...). Exceptions from dependencies (the interpreter,
OSError, sqlite3, paho, pyserial) are translated into these where they enter our code, with ``raise ... from``.
Each error carries a stable ``code`` string that replies, events, status and diag show.

**Codes.** One style (``snake_case``: ``^[a-z][a-z0-9_]*$``), one meaning each: a code belongs to one class,
and two classes share a code only when one subclasses the other (a finer Python type for the same condition,
which inherits its parent's code). :func:`registry` builds the table of codes from the classes themselves, and
``docs/errors.md`` explains each one (a test keeps the two equal).

**Exit codes.** :class:`Exit` is the one table every ``fieldnode`` command exits with.
"""

from __future__ import annotations

import enum
import importlib
import pkgutil
import re
from typing import Iterable

CODE_RE = re.compile(r"[a-z][a-z0-9_]*\Z")


class Exit(enum.IntEnum):
    """The exit code of every ``fieldnode`` command (``docs/errors.md`` has the table)."""

    OK = 0  #: done; every check OK or SKIP
    FAILED = 1  #: the command failed: an error, an error reply, a mismatch it measured
    USAGE = 2  #: bad input: an argument, the config, a file named on the command line
    TIMEOUT = 3  #: no answer within the time given
    UNREACHABLE = 4  #: could not connect: the broker, the agent's control socket
    WARN = 5  #: it ran, and found something to look at: a diag check WARNs
    FAULTS = 6  #: it ran, and found something wrong: a diag check FAILs, the agent reports faults
    INTERRUPTED = 130  #: Ctrl-C (128 + SIGINT, as the shell counts it)
    PIPE_CLOSED = 141  #: the reader of the output went away (``| head``; 128 + SIGPIPE, as the shell counts it)


class FieldnodeError(Exception):
    """Base of every error fieldnode raises on purpose (never raised itself)."""

    code = "error"
    #: What a command exits with when this error ends it.
    exit_code: Exit = Exit.FAILED

    def as_json(self) -> dict:
        """The error as data: ``{"code", "message"}`` (a family may add fields, such as the config's key)."""
        return {"code": self.code, "message": str(self)}


class ConfigError(FieldnodeError):
    """The configuration is malformed: unreadable file, bad TOML, unknown key, wrong type or range."""

    code = "config_invalid"
    exit_code = Exit.USAGE

    def __init__(self, message: str, key_path: str = "", source: str = ""):
        self.key_path = key_path
        self.source = source
        self.message = message  # without the source and key in front
        where = f"{source}: " if source else ""
        key = f"{key_path}: " if key_path else ""
        super().__init__(f"{where}{key}{message}")

    def as_json(self) -> dict:
        """``{"code", "key", "message", "source"}``: the dotted key (``""`` for the whole file), the message
        without the source and key in front, and the file."""
        return {"code": self.code, "key": self.key_path, "message": self.message, "source": self.source}


class UsageError(FieldnodeError):
    """The command was given something it cannot use: a combination of options, a path that is not what it must
    be (argparse itself reports a malformed argument, with the same exit code)."""

    code = "usage_invalid"
    exit_code = Exit.USAGE


class SystemCallFailed(FieldnodeError):
    """The operating system refused something a command needed (a file, a device, a directory): its message."""

    code = "os_error"

    @classmethod
    def from_os_error(cls, exc: OSError) -> SystemCallFailed:
        """``No such file or directory (/x)``: the OS's words and the file they are about."""
        where = f" ({exc.filename})" if exc.filename else ""
        return cls(f"{exc.strerror or exc}{where}")


class InternalError(FieldnodeError):
    """A defect: an exception nobody translated. The message names its type; the log (``-v``) its traceback."""

    code = "internal"


class Interrupted(FieldnodeError):
    """The command was interrupted (Ctrl-C) before it finished."""

    code = "interrupted"
    exit_code = Exit.INTERRUPTED


def error_json(exc: FieldnodeError) -> dict:
    """An error as every command's ``--json`` prints it: ``{"ok": false, "error": {"code", "message", ...}}``.

    (``fieldnode send`` prints its own failures in the shape of a board's error reply, which carries the same
    ``error`` object: see :func:`device.link.wire.error_reply`.)
    """
    return {"ok": False, "error": exc.as_json()}


def error_classes(packages: Iterable[str] = ()) -> list[type[FieldnodeError]]:
    """Every subclass of :class:`FieldnodeError` (the root included) defined in ``packages``, after importing
    every module of them so that none is missed; in a stable order (module, then class name).

    Args:
        packages: Names of our packages (``("device", "drivers", "power", "tools")``); empty: every subclass
            imported so far, wherever it is defined.
    """
    packages = tuple(packages)
    for name in packages:
        pkg = importlib.import_module(name)
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(info.name)
    found: dict[type, None] = {FieldnodeError: None}
    todo = [FieldnodeError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found[sub] = None
                todo.append(sub)
    ours = [c for c in found if not packages or c.__module__.split(".")[0] in packages]
    return sorted(ours, key=lambda c: (c.__module__, c.__qualname__))


def class_codes(cls: type) -> tuple[str, ...]:
    """The codes a class stands for: its ``code``, and the ``codes`` it declares when its instances carry one of
    several (``InstallError``: which part of the install failed)."""
    return (cls.code, *[c for c in cls.__dict__.get("codes", ()) if c != cls.code])


def registry(packages: Iterable[str] = (), *, classes: Iterable[type] | None = None) -> dict[str, type]:
    """The table of codes: each code and the class that owns it (the most general class carrying it).

    Args:
        packages: As for :func:`error_classes`.
        classes: These classes instead of :func:`error_classes`'s (anything with a ``code``).

    Raises:
        ValueError: A code out of style, or two classes sharing one although neither subclasses the other.
    """
    owners: dict[str, type] = {}
    found = error_classes(packages) if classes is None else list(classes)
    for cls in sorted(found, key=lambda c: len(c.__mro__)):  # a parent before its children
        for code in class_codes(cls):
            if not isinstance(code, str) or not CODE_RE.match(code):
                raise ValueError(f"{cls.__module__}.{cls.__qualname__}: code {code!r} is not snake_case")
            other = owners.get(code)
            if other is None or issubclass(other, cls):
                owners[code] = cls
            elif not issubclass(cls, other):
                raise ValueError(f"code {code!r} belongs to {other.__module__}.{other.__qualname__} and "
                                 f"{cls.__module__}.{cls.__qualname__}, and neither subclasses the other")
    return dict(sorted(owners.items()))
