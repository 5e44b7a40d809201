"""``fieldnode update``: model updates on this board (check, install, status, rollback)."""

from __future__ import annotations

import argparse

ACTIONS = ("check", "install", "status", "rollback")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the ``update`` actions and their options."""
    from device.cli import positive_int, subcommand_parents

    sub = p.add_subparsers(dest="update_action", metavar="ACTION", required=True)
    for name in ACTIONS:
        a = sub.add_parser(name, parents=subcommand_parents())
        a.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "install":
            a.add_argument("--version", type=positive_int, metavar="N")
            a.add_argument("--force", action="store_true")
        if name == "rollback":
            a.add_argument("--reason", default="rolled back from the command line")


def run(args: argparse.Namespace) -> int:
    """Runs one ``update`` action."""
    from device.errors import FieldnodeError

    raise FieldnodeError("fieldnode update is not built yet")
