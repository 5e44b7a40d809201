"""``fieldnode diag``: the technician's verdict on this board, offline, in seconds.

The checks and their runner are :mod:`device.diag.runner`; this module prints them. The exit code is the
worst status: 0 all OK or SKIP, 1 a WARN, 2 a FAIL.

``--json`` prints one object (``checks``, ``summary``, ``exit``, ``simulated``); ``--report FILE.tar.gz``
also writes a support bundle (:func:`tools.diag.report.write_report`): the config with its secrets redacted,
the agent's status, the diag JSON, versions, the throttle history and recent logs. ``--sim PROFILE`` runs the
hardware checks on a fresh virtual board, and everything it prints says SIMULATED.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings

from device.diag.checks import FAIL, OK, SKIP, WARN, Check
from device.diag.runner import run_checks, to_json
from tools.diag.report import ReportError, check_report_path, write_report

__all__ = ["ReportError", "add_arguments", "line", "run"]


def line(c: Check) -> str:
    """``OK   name: detail``, and the remedy indented on the next line."""
    text = f"{c.status:<5}{c.name}: {c.detail}"
    return text + (f"\n     remedy: {c.remedy}" if c.remedy else "")


# ------------------------------------------------------------------------------------------------- the CLI


def add_arguments(p) -> None:
    from device.cliargs import sim_argument

    p.add_argument("--json", action="store_true", help="print one JSON object: checks, summary, exit, simulated")
    p.add_argument("--report", metavar="FILE.tar.gz",
                   help="also write a support bundle: the config (secrets redacted), the agent's status, this "
                        "diagnosis, versions, throttle history and recent logs")
    sim_argument(p, "check a fresh simulated board of this profile instead of this board's hardware (sensor, "
                    "sysfs, GPIO); the output says SIMULATED")


def run(args) -> int:
    from device import config
    from device.cliargs import load_config
    from device.errors import ConfigError

    if args.report:
        check_report_path(args.report)
    config_error = None
    try:
        cfg = load_config(args)
    except ConfigError as exc:  # a verdict, not the end: the other checks still run
        cfg, config_error = config.Config(), exc
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

    head = _header(cfg, sim, config_error)
    if not args.json:
        print(head, flush=True)
    t0 = time.monotonic()
    checks = run_checks(cfg, sim=sim, on_check=show, config_error=config_error)
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
    if args.report:
        write_report(args.report, cfg, out, "\n".join([head, *lines, tail]) + "\n", config_path=_config_path(args))
        print(f"support bundle written to {args.report}", file=sys.stderr if args.json else sys.stdout)
    return out["exit"]


def _header(cfg, sim, config_error) -> str:
    from device import __version__
    from device import config

    if sim:
        return (f"fieldnode {__version__} diag: SIMULATED board {sim} (a fresh virtual board stands for this "
                f"board's sensor, sysfs and GPIO; nothing of its hardware is checked)")
    who = "device unknown (the config did not load)" if config_error else f"device {config.device_id(cfg)}"
    return f"fieldnode {__version__} diag: {who}, config {cfg.source}"


def _config_path(args) -> str | None:
    from device import config

    path, explicit = config.resolve_path(getattr(args, "config", None))
    return path if explicit or os.path.exists(path) else None
