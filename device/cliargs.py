"""What every subcommand's arguments share: typed numbers with clear errors, ``--sim``, the global options of
nested subcommands, the config a command reads, values printed for people, and the one way a command prints an
error (:func:`print_error`).

The commands live where their code does (``fieldnode run`` in :mod:`device.agent.daemon`, the tools in
``tools/``); the entry point that registers them is :mod:`tools.cli`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Callable, TextIO

from device.errors import Exit, FieldnodeError, error_json

if TYPE_CHECKING:
    from device.config import Config


def print_error(command: str, exc: FieldnodeError, *, as_json: bool = False, exit_code: Exit | None = None,
                out: TextIO | None = None, err: TextIO | None = None) -> Exit:
    """Prints a command's error the one way every ``fieldnode`` command does, and says what to exit with.

    One line on stderr, ``fieldnode COMMAND: error [code]: message``; with ``as_json`` (the command's ``--json``)
    also one JSON object on stdout, :func:`device.errors.error_json`'s ``{"ok": false, "error": {...}}``.

    Args:
        command: The command as typed after ``fieldnode`` (``keys sign``).
        exc: The error.
        as_json: Print the JSON object on stdout too.
        exit_code: The exit code, when the command's own table says otherwise than ``exc.exit_code``.
        out: Where the JSON goes (default ``sys.stdout``). err: Where the line goes (default ``sys.stderr``).

    Returns:
        The exit code: ``exit_code``, else the error class's :attr:`~device.errors.FieldnodeError.exit_code`.
    """
    print(f"fieldnode {command}: error [{exc.code}]: {exc}", file=err or sys.stderr, flush=True)
    if as_json:  # after the line: a reader of stdout that went away must not take the line with it
        print(json.dumps(error_json(exc)), file=out or sys.stdout, flush=True)
    return Exit(exc.exit_code if exit_code is None else exit_code)


def load_config(args: argparse.Namespace) -> Config:
    from device import config

    return config.load(getattr(args, "config", None))


def number(kind: type = float, *, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, what: str | None = None) -> Callable[[str], float]:
    """An argparse ``type`` for a finite number in bounds whose error says what is expected.

    Args:
        kind: ``int`` or ``float``.
        minimum: Inclusive lower bound. maximum: Inclusive upper bound. above: Exclusive lower bound.
        what: What the number is, for the message (default ``an integer`` or ``a number``).

    Returns:
        A converter raising :class:`argparse.ArgumentTypeError` (``argument --runs: expected an integer >= 1,
        got '0'``) for anything else.
    """
    import math

    what = what or ("an integer" if kind is int else "a number")
    if minimum is not None and maximum is not None:
        expected = f"{what} from {minimum:g} to {maximum:g}"
    else:
        limits = [f"> {above:g}" if above is not None else "", f">= {minimum:g}" if minimum is not None else "",
                  f"<= {maximum:g}" if maximum is not None else ""]
        expected = " ".join([what] + [x for x in limits if x])

    def convert(text: str) -> float:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not math.isfinite(value) or (minimum is not None and value < minimum) \
                or (maximum is not None and value > maximum) or (above is not None and value <= above):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    convert.__name__ = expected  # what argparse would print if it ever named the type
    return convert


positive_int = number(int, minimum=1)
nonnegative_float = number(float, minimum=0)
positive_seconds = number(float, above=0, what="a number of seconds")


def for_people(value: object, unit: str = "", none: str = "unknown") -> str:
    """A value as a person reads it, not as Python prints it: ``yes``/``no``, ``0-3`` for consecutive CPUs, a list
    joined with ``; ``, a mapping as ``key value, ...``, ``none`` for an empty list and ``none`` (the argument)
    for a missing value."""
    if value is None:
        return none
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k} {for_people(v, none=none)}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value) \
                and list(value) == list(range(value[0], value[0] + len(value))):
            return f"{value[0]}-{value[-1]}" if len(value) > 1 else str(value[0])
        return "; ".join(for_people(v, none=none) for v in value) or "none"
    return f"{value}{unit}"


def sim_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help: str, *,
                 default_profile: str | None = "rpi4") -> None:
    """Adds ``--sim [PROFILE]``, the one flag that asks for a simulated board in ``run``, ``demo`` and ``power``.

    Args:
        parser: An argparse parser or group.
        help: What the simulation means for this command.
        default_profile: The profile of a bare ``--sim``; ``None`` makes the profile required.
    """
    from drivers.sim.profiles import PROFILES

    extra = {"nargs": "?", "const": default_profile} if default_profile else {}
    parser.add_argument("--sim", choices=sorted(PROFILES), default=None, metavar="PROFILE",
                        help=f"{help}; one of {', '.join(sorted(PROFILES))}", **extra)


def common_options(suppress: bool) -> argparse.ArgumentParser:
    # Subcommands repeat the global options with SUPPRESS defaults, so `fieldnode --config X bench` and
    # `fieldnode bench --config X` both work and neither erases the other.
    d = {"default": argparse.SUPPRESS} if suppress else {}
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", help="config file (default: $FIELDNODE_CONFIG, then "
                                                         "/etc/fieldnode/fieldnode.toml)", **d)
    common.add_argument("-v", "--verbose", action="store_true", help="log debug messages", **d)
    return common


def subcommand_parents() -> list[argparse.ArgumentParser]:
    """Parents for a nested sub-subcommand parser, so ``fieldnode power status --config X`` works too."""
    return [common_options(True)]
