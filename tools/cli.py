"""``fieldnode``: the one console entry point, with subcommands.

The commands that read this board's config take ``--config PATH`` (else ``FIELDNODE_CONFIG``, else
/etc/fieldnode/fieldnode.toml) before or after the command's name, and so does every top-level command; the
operator's tools that work on files of their own (``keys``, ``repo``) read no board config. Subcommands register
in :data:`COMMANDS`; most are loaded by name only when used (:func:`_lazy`), so ``fieldnode run`` carries none
of the tools' imports.

:func:`main` is where every command ends: it prints whatever error ended it the one way
(:func:`device.cliargs.print_error`: ``fieldnode CMD: error [code]: message``, and the JSON error object with
``--json``), and exits with :class:`device.errors.Exit` (``docs/errors.md``). A reader that closes the pipe early
(``fieldnode config keys | head``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Callable, Sequence

from device import __version__
from device.cliargs import common_options, load_config, print_error
from device.errors import Exit, FieldnodeError, InternalError, Interrupted, SystemCallFailed, UsageError

# name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[str, tuple[str, Callable, Callable]] = {}


def command(name: str, help: str):
    """Registers a subcommand: decorate ``run(args)``; set ``run.arguments = fn(parser)`` to add options."""

    def deco(run):
        COMMANDS[name] = (help, getattr(run, "arguments", lambda p: None), run)
        return run

    return deco


def _version_args(p):
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _version(args) -> int:
    from device.runtime.backends import load_backend

    info = {"fieldnode": __version__, "python": sys.version.split()[0]}
    cfg = load_config(args)  # a config that cannot be read is an error (Exit.USAGE), not a missing backend
    try:
        b = load_backend(cfg.runtime.backend)
        info["backend"], info["backend_version"] = b.name, b.version
    except FieldnodeError as exc:
        info["backend"], info["backend_error"] = None, str(exc)
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k}: {v}")
    return Exit.OK


_version.arguments = _version_args
command("version", "show the agent, Python and interpreter backend versions")(_version)


def _config_args(p):
    p.add_argument("action", nargs="?", default="show", choices=("show", "check", "defaults", "keys"),
                   help="show the effective config (JSON), check it, print a file of defaults, or list keys")
    p.add_argument("--json", action="store_true",
                   help="check and show: print an invalid config's error as one JSON object, {\"ok\": false, "
                        "\"error\": {...}}; check prints {\"ok\": true, \"source\": ...} when valid")


def _config(args) -> int:
    from device import config

    if args.action in ("defaults", "keys"):
        if args.json:
            raise UsageError(f"--json applies to check and show, not {args.action}")
        print(config.render_toml() if args.action == "defaults" else config.render_markdown())
        return Exit.OK
    cfg = load_config(args)  # an invalid config: main prints the error (as JSON too with --json), Exit.USAGE
    if cfg.source == config.DEFAULTS_SOURCE and not args.json:  # the first line says that no file was found
        print(config.describe_source(cfg), file=sys.stderr if args.action == "show" else sys.stdout, flush=True)
    if args.action == "check":
        from device.configfiles import service_identity

        config.check_agent(cfg, service_identity())  # what fieldnode run would refuse, as the service's user
        print(json.dumps({"ok": True, "source": cfg.source}) if args.json else f"{cfg.source}: ok")
        return Exit.OK
    print(json.dumps({"source": cfg.source, **cfg.to_dict()}, indent=2))
    return Exit.OK


_config.arguments = _config_args
command("config", "show, check or list the configuration")(_config)


def _lazy(module: str, name: str, help: str) -> None:
    """Registers a subcommand implemented in another module, imported only when used."""

    def run(args):
        import importlib

        return importlib.import_module(module).run(args)

    def arguments(p):
        import importlib

        importlib.import_module(module).add_arguments(p)

    run.arguments = arguments
    command(name, help)(run)


_lazy("tools.bench", "bench", "benchmark a model against the bare interpreter (like benchmark_model)")
_lazy("tools.demo", "demo", "run inference on the virtual board's simulated vibration sensor")
_lazy("device.runtime.selftest", "selftest", "check every variant of a model against its shipped test vectors")
_lazy("tools.power", "power", "the power governor: read this board's state, or simulate a policy on a virtual board")
_lazy("tools.keys", "keys", "operator keys for signed commands: generate, id, sign")
_lazy("device.agent.daemon", "run", "run the agent in the foreground: sensor, inference, governor, MQTT link")
_lazy("tools.send", "send", "send one command to a board and print its reply")
_lazy("tools.fleet.cli", "fleet", "the fleet: count and list boards by their retained states (fleet status)")
_lazy("tools.repo.cli", "repo", "the operator's update repository: init, add-model, grant, publish, rotate, export")
_lazy("tools.update", "update", "model updates on this board: check, install, status, rollback")
_lazy("tools.status", "status", "ask the running agent what it is doing (local control socket, no broker)")
_lazy("tools.install.cli", "install", "install the agent as a service, here or into a mounted image root (--root)")
_lazy("tools.diag.cli", "diag", "the technician's verdict: every check OK/WARN/FAIL/SKIP with a remedy, offline, in seconds")
_lazy("tools.provision", "provision", "make this board's own keys (update identity, TLS key, CSR) and write its device id into the config")


def chosen_command(argv: Sequence[str]) -> str:
    """The subcommand ``argv`` names (the first word that is neither an option nor ``--config``'s value), or ``""``."""
    words = iter(argv)
    for word in words:
        if word == "--config":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return ""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; with ``only``, only that subcommand's options are built (each tool's module is imported
    to build them, and ``fieldnode run`` must not carry every tool's imports for its whole life)."""
    parser = argparse.ArgumentParser(prog="fieldnode", parents=[common_options(False)],
                                     description="fieldnode: the sensor-board agent and its tools")
    parser.add_argument("--version", action="version", version=f"fieldnode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common_options(True)])
        if only is None or name == only:
            add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI.

    Returns:
        The exit code (:class:`device.errors.Exit`): the command's own, else the one of the error that ended it
        (``USAGE`` for bad input and configuration errors, ``FAILED`` for most others, ``INTERRUPTED`` for Ctrl-C,
        ``PIPE_CLOSED`` when the reader of stdout went away).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=chosen_command(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return Exit.USAGE
    from device import logs

    logs.setup("warning", "auto", verbose=args.verbose)  # `run` sets the configured level and format again
    try:
        code = int(args._run(args) or Exit.OK)
        sys.stdout.flush()  # a closed pipe must show here, not when the interpreter flushes at exit
        return code
    except BrokenPipeError:
        return _pipe_closed()
    except KeyboardInterrupt:
        return _report(args, Interrupted("interrupted"))
    except FieldnodeError as exc:
        return _report(args, exc)
    except OSError as exc:  # a file or device the user named, or the state directory
        return _report(args, SystemCallFailed.from_os_error(exc))
    except Exception as exc:  # a defect: one line for the technician, the traceback with -v
        logging.getLogger("tools.cli").debug("internal error", exc_info=True)
        return _report(args, InternalError(f"{type(exc).__name__}: {exc} (this is a defect; run with -v for the "
                                           f"traceback and report it)"))


def _report(args, exc: FieldnodeError) -> int:
    """Prints the error that ended the command (with ``--json``, the JSON object too) and returns its exit code."""
    try:
        return print_error(args.command, exc, as_json=bool(getattr(args, "json", False)))
    except BrokenPipeError:  # the JSON object's reader is gone too
        return _pipe_closed()


def _pipe_closed() -> int:
    """The reader of stdout went away (``| head``): nothing more is written there, and Python's flush at exit
    must not fail on it either (``Exception ignored ... BrokenPipeError``), so stdout points at /dev/null."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file (a test's capture): nothing is left to flush
        pass
    return Exit.PIPE_CLOSED


if __name__ == "__main__":
    sys.exit(main())
