"""``fieldnode diag``: the technician's verdict on this board, offline, in seconds.

The checks and their runner are :mod:`device.diag.runner`; this module prints them. The exit code is the
worst status (:class:`device.errors.Exit`): 0 all OK or SKIP, 5 a WARN, 6 a FAIL; 2 for bad arguments.

``--json`` prints one object (``checks``, ``summary``, ``exit``, ``simulated``); ``--report [FILE.tar.gz]``
also writes a support bundle (:func:`tools.diag.report.write_report`): the config with its secrets redacted,
the agent's status, the diag JSON, versions, the throttle history and recent logs. ``--sim PROFILE`` runs the
hardware checks on a fresh virtual board, and everything it prints says SIMULATED.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import time
import warnings
from typing import TYPE_CHECKING

from device.diag.checks import FAIL, OK, SKIP, WARN, Check, Who, whoami
from device.diag.runner import run_checks, to_json
from device.errors import Exit
from tools.diag.report import ReportError, check_report_path, write_report

if TYPE_CHECKING:
    from device.config import Config

__all__ = ["ReportError", "add_arguments", "fallback_config", "header", "line", "run"]


def line(c: Check) -> str:
    """``OK   name: detail``, and the remedy indented on the next line."""
    text = f"{c.status:<5}{c.name}: {c.detail}"
    return text + (f"\n     remedy: {c.remedy}" if c.remedy else "")


# ------------------------------------------------------------------------------------------------- the CLI


def add_arguments(p) -> None:
    from device.cliargs import sim_argument

    p.add_argument("--json", action="store_true", help="print one JSON object: checks, summary, exit, simulated")
    p.add_argument("--report", metavar="FILE.tar.gz", nargs="?", const="",
                   help="also write a support bundle: the config (secrets redacted), the agent's status, this "
                        "diagnosis, versions, throttle history and recent logs (without FILE: "
                        "fieldnode-diag-<device>-<UTC time>.tar.gz here)")
    sim_argument(p, "check a fresh simulated board of this profile instead of this board's hardware (sensor, "
                    "sysfs, GPIO); the output says SIMULATED")


def run(args, *, who: Who | None = None) -> int:
    """Runs the diagnosis and prints it; ``who`` stands for :func:`device.diag.checks.whoami` (tests)."""
    from device import config
    from device.cliargs import load_config
    from device.errors import ConfigError

    if args.report is not None:
        check_report_path(args.report)
    config_error = None
    try:
        cfg = load_config(args)
    except ConfigError as exc:  # a verdict, not the end: the checks that need no config still run
        # The keys that find the running agent and name the board, where the file has them right.
        cfg, config_error = fallback_config(exc.source or config.resolve_path(getattr(args, "config", None))[0]), exc
    who = who or whoami()
    if args.sim:
        cfg = cfg.with_overrides({"drivers.virtual_board": args.sim})
    sim = args.sim or cfg.drivers.virtual_board or None  # --sim, or a config that asks for a virtual board
    if not getattr(args, "verbose", False):
        # Every fallback and fault the drivers log is a check's detail here; -v shows the log as well.
        logging.getLogger().setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
    lines: list[str] = []

    def show(c: Check) -> None:
        lines.append(line(c))
        if not args.json:
            print(lines[-1], flush=True)

    head = header(cfg, sim, config_error)
    if who.limited:
        head += "\n" + who.limited_line()
    if not args.json:
        print(head, flush=True)
    t0 = time.monotonic()
    checks = run_checks(cfg, sim=sim, on_check=show, config_error=config_error, who=who)
    out = to_json(checks, simulated=bool(sim))
    s = out["summary"]
    tail = (f"{'SIMULATED board: ' if sim else ''}{s[OK]} OK, {s[WARN]} WARN, {s[FAIL]} FAIL, {s[SKIP]} SKIP "
            f"in {time.monotonic() - t0:.1f} s: exit {out['exit']}")
    if args.json:
        print(json.dumps(out))
    else:
        print(tail)
    if out["exit"]:  # a script that keeps only stderr still learns why diag failed
        bad = [c.name for c in checks if c.status in (WARN, FAIL)]
        print(f"fieldnode diag: {s[FAIL]} FAIL, {s[WARN]} WARN ({', '.join(bad)})", file=sys.stderr)
    if args.report is not None:
        path = write_report(args.report, cfg, out, "\n".join([head, *lines, tail]) + "\n",
                            config_path=_config_path(args))
        print(f"support bundle written to {path}", file=sys.stderr if args.json else sys.stdout)
    return Exit(out["exit"])


def header(cfg, sim, config_error) -> str:
    """The first line: the simulated board, or the device and where its config came from (or that none was
    found, or that it does not load)."""
    from device import __version__
    from device import config

    if sim:
        return (f"fieldnode {__version__} diag: SIMULATED board {sim} (a fresh virtual board stands for this "
                f"board's sensor, sysfs and GPIO; nothing of its hardware is checked)")
    if config_error is not None:
        name = f"device {cfg.device.id}" if cfg.device.id else "device unknown"
        return f"fieldnode {__version__} diag: {name}, config {cfg.source} DOES NOT LOAD (see the config check)"
    if cfg.source == config.DEFAULTS_SOURCE:
        return f"fieldnode {__version__} diag: {config.describe_source(cfg)} (device {config.device_id(cfg)})"
    return f"fieldnode {__version__} diag: device {config.device_id(cfg)}, config {cfg.source}"


def _config_path(args) -> str | None:
    from device import config

    path, explicit = config.resolve_path(getattr(args, "config", None))
    return path if explicit or os.path.exists(path) else None


# The keys that find the running agent (and name the board) when its config does not load.
_FALLBACK_KEYS = ("id", "state_dir", "runtime_dir")


def fallback_config(path: str) -> Config:
    """The defaults, with ``device.id``, ``device.state_dir`` and ``device.runtime_dir`` taken from the file at
    ``path`` where each is valid on its own: what ``diag`` uses to reach the running agent (and name its report)
    when that file does not load. Never raises: a file that cannot be read or parsed gives the defaults.

    Returns:
        The config, its ``source`` being ``path``.
    """
    from device import config
    from device.errors import ConfigError

    values: dict = {}
    try:
        with open(path, "rb") as fh:
            text = fh.read(1 << 20).decode("utf-8", errors="replace")
    except OSError:
        text = ""
    try:
        table = config.tomllib.loads(text).get("device", {})
    except config.tomllib.TOMLDecodeError:  # a typo elsewhere: read the [device] lines alone
        table = _device_lines(text)
    for key in _FALLBACK_KEYS:
        value = table.get(key) if isinstance(table, dict) else None
        try:
            config.from_mapping({"device": {key: value}})
        except ConfigError:
            continue
        values[key] = value
    return dataclasses.replace(config.from_mapping({"device": values}), source=path)


def _device_lines(text: str) -> dict:
    # Invalid TOML (the typo may be anywhere): the [device] table's plain string lines, read one by one.
    out: dict = {}
    table = None
    for line in text.splitlines():
        head = re.match(r"\s*\[\s*([A-Za-z0-9_.-]+)\s*\]", line)
        if head:
            table = head.group(1)
            continue
        m = re.match(r'\s*([a-z_]+)\s*=\s*"([^"\\]*)"\s*(#.*)?$', line)
        if table == "device" and m and m.group(1) in _FALLBACK_KEYS:
            out[m.group(1)] = m.group(2)
    return out
