"""``fieldnode fleet``: the operator's tools for many boards (``status`` now; rollouts are to come)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds ``fleet``'s subcommands.

    Args:
        p: The parser of the ``fleet`` subcommand.
    """
    from device.cliargs import subcommand_parents
    from tools.fleet import status

    sub = p.add_subparsers(dest="fleet_command", metavar="{status}")
    sub.required = True
    st = sub.add_parser("status", help="count and list the boards by their retained states",
                        description="count and list the boards by their retained states", parents=subcommand_parents())
    status.add_arguments(st)


def run(args: argparse.Namespace) -> int:
    """Runs the chosen ``fleet`` subcommand; returns its exit code."""
    from tools.fleet import status

    return status.run(args)
