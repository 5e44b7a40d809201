"""``fieldnode diag``: the technician's verdict on this board, offline, in seconds.

Every check (:data:`ORDER`; their code is in the ``tools/diag_checks_*`` modules) says ``OK``, ``WARN``,
``FAIL`` or ``SKIP`` with what it found and, for ``WARN`` and ``FAIL``, one line of remedy. The checks run side
by side, each bounded by the time left (:func:`run_checks`), so the whole run ends within ``budget_s`` (10 s)
whatever hangs: a check still running then is a ``FAIL`` saying so, and a check that raises is a ``FAIL``
with its error, never a traceback. The exit code is the worst status: 0 all OK or SKIP, 1 a WARN, 2 a FAIL.

``--json`` prints one object (``checks``, ``summary``, ``exit``, ``simulated``); ``--report FILE.tar.gz``
also writes a support bundle (:func:`write_report`): the config with its secrets redacted,
the agent's status, the diag JSON, versions, the throttle history and recent logs. ``--sim PROFILE`` runs the
hardware checks on a fresh virtual board, and everything it prints says SIMULATED. The agent answers the MQTT
``diag`` command with :func:`diagnose`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tarfile
import threading
import time
import warnings

from device.errors import FieldnodeError
from tools.diag_checks import CHECKS, FAIL, OK, SKIP, STATUSES, WARN, Check, Context, fail, skip

ORDER = ("config", "identity", "keys", "certificate", "clock", "broker", "trust", "accelerators", "delegates",
         "models", "update_store", "sensor", "gpio", "thermal", "battery", "throttle", "cpufreq", "disk", "spool",
         "service", "agent")
BUDGET_S = 10.0
MARGIN_S = 1.0  # the checks' own deadline comes this much before the runner's, so their bounded waits fit
EXIT = {OK: 0, SKIP: 0, WARN: 1, FAIL: 2}
REDACTED = "<redacted>"
SECRET_RE = re.compile(r"password|token|secret", re.IGNORECASE)
JOURNAL_LINES = 1000

__all__ = ["Check", "ORDER", "add_arguments", "diagnose", "exit_code", "run", "run_checks", "summary", "to_json",
           "write_report"]


class ReportError(FieldnodeError):
    """The support bundle cannot be written where it was asked for."""

    code = "report_failed"


def _load_checks() -> None:
    # Each module registers its checks in tools.diag_checks.CHECKS when imported.
    import tools.diag_checks_board  # noqa: F401
    import tools.diag_checks_config  # noqa: F401
    import tools.diag_checks_link  # noqa: F401
    import tools.diag_checks_model  # noqa: F401


def run_checks(cfg, *, sim: str | None = None, budget_s: float = BUDGET_S, sample_s: float = 2.0, on_check=None,
               config_error: Exception | None = None, agent_status: dict | None = None) -> list[Check]:
    """Runs every check, side by side, within ``budget_s``.

    Args:
        cfg: The configuration (with ``--sim``, ``drivers.virtual_board`` set as ``fieldnode run --sim`` does).
        sim: The virtual board profile the hardware checks run on, or None for this board's hardware.
        budget_s: The whole run's bound; each check's waits are bounded by what is left of it.
        sample_s: How long the sensor is sampled.
        on_check: Called with each :class:`Check` as soon as it and every check before it (in :data:`ORDER`)
            are done, so output streams in a stable order.
        config_error: The error the config file gave when it did not load (``cfg`` is then the defaults): the
            config check fails with it, and the checks that need the board's config are skipped.
        agent_status: The agent's own status when the agent itself runs the diagnosis (the MQTT ``diag``
            command): what it holds (sensor, GPIO, spool) is read from it, never opened a second time.

    Returns:
        One :class:`Check` per registered check, in :data:`ORDER`.
    """
    _load_checks()
    sim = sim or cfg.drivers.virtual_board or None  # a config that asks for a virtual board asks for simulation
    specs = [CHECKS[n] for n in ORDER if n in CHECKS] + [s for n, s in CHECKS.items() if n not in ORDER]
    start = time.monotonic()
    ctx = Context(cfg, sim=sim, deadline=start + max(0.5, budget_s - MARGIN_S), sample_s=sample_s)
    ctx.config_error = config_error
    if agent_status is not None:
        ctx.use_agent_status(agent_status)
    results: list[Check | None] = [None] * len(specs)
    cond = threading.Condition()

    def one(i: int, spec) -> None:
        if config_error is not None and spec.needs_config:
            c = skip(spec.name, "the config did not load (see the config check)")
        else:
            try:
                c = spec.fn(ctx)
                if not isinstance(c, Check) or c.name != spec.name:
                    c = fail(spec.name, f"the check returned {c!r}", "this is a defect of diag: report it with a "
                                                                    "diag --report bundle")
            except Exception as exc:  # a check's own failure is its verdict, never the end of diag
                logging.getLogger(__name__).debug("check %s raised", spec.name, exc_info=True)
                c = fail(spec.name, f"the check itself failed: {type(exc).__name__}: {exc}",
                         "this is a defect of diag or a broken install: send a diag --report bundle (-v shows more)")
        with cond:
            results[i] = c
            cond.notify_all()

    for i, spec in enumerate(specs):
        # Daemon threads: a check stuck past the budget must not keep the command from ending.
        threading.Thread(target=one, args=(i, spec), name=f"diag-{spec.name}", daemon=True).start()
    out: list[Check] = []
    try:
        while len(out) < len(specs):
            with cond:
                cond.wait_for(lambda: results[len(out)] is not None, max(0.0, start + budget_s - time.monotonic()))
                ready = []
                for c in results[len(out):]:
                    if c is None:
                        break
                    ready.append(c)
            if not ready:  # the budget is spent: whatever still runs has hung; the rest are done
                with cond:
                    late = list(results[len(out):])
                for spec, c in zip(specs[len(out):], late):
                    ready.append(c if c is not None else fail(
                        spec.name, f"did not finish within {budget_s:g} s",
                        "something it waits on hangs: run diag -v, and send a diag --report bundle"))
            for c in ready:
                out.append(c)
                if on_check is not None:
                    on_check(c)
    finally:
        ctx.close()
    return out


def exit_code(checks: list[Check]) -> int:
    """0 when every check is OK or SKIP, 1 on any WARN, 2 on any FAIL."""
    return max((EXIT[c.status] for c in checks), default=0)


def summary(checks: list[Check]) -> dict:
    """How many checks ended in each status: ``{"OK": n, "WARN": n, "FAIL": n, "SKIP": n}``."""
    return {s: sum(c.status == s for c in checks) for s in STATUSES}


def to_json(checks: list[Check], *, simulated: bool) -> dict:
    """The ``--json`` object: ``{"checks": [...], "summary": {...}, "exit": N, "simulated": bool}``."""
    return {"checks": [c.to_dict() for c in checks], "summary": summary(checks), "exit": exit_code(checks),
            "simulated": simulated}


def diagnose(cfg, *, sim: str | None = None, agent_status: dict | None = None) -> dict:
    """The whole diagnosis as the ``--json`` object: what the MQTT ``diag`` command replies, with the agent's
    own ``status()`` as ``agent_status`` (see :func:`run_checks`). A config with ``drivers.virtual_board`` is
    diagnosed on a virtual board of that profile, and says so."""
    sim = sim or cfg.drivers.virtual_board or None
    return to_json(run_checks(cfg, sim=sim, agent_status=agent_status), simulated=bool(sim))


def line(c: Check) -> str:
    """``OK   name: detail``, and the remedy indented on the next line."""
    text = f"{c.status:<5}{c.name}: {c.detail}"
    return text + (f"\n     remedy: {c.remedy}" if c.remedy else "")


# ------------------------------------------------------------------------------------------------- the CLI


def add_arguments(p) -> None:
    from device.cli import sim_argument

    p.add_argument("--json", action="store_true", help="print one JSON object: checks, summary, exit, simulated")
    p.add_argument("--report", metavar="FILE.tar.gz",
                   help="also write a support bundle: the config (secrets redacted), the agent's status, this "
                        "diagnosis, versions, throttle history and recent logs")
    sim_argument(p, "check a fresh simulated board of this profile instead of this board's hardware (sensor, "
                    "sysfs, GPIO); the output says SIMULATED")


def run(args) -> int:
    from device import config
    from device.cli import load_config
    from device.errors import ConfigError

    if args.report:
        _check_report_path(args.report)
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


# ---------------------------------------------------------------------------------------- support bundle


def _check_report_path(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise ReportError(f"--report {path}: the directory {d} does not exist")
    if not os.access(d, os.W_OK):
        raise ReportError(f"--report {path}: the directory {d} is not writable by this user")


def redact(obj):
    """A copy of ``obj`` with the value of every key named like a password, token or secret replaced."""
    if isinstance(obj, dict):
        return {k: (REDACTED if SECRET_RE.search(str(k)) and obj[k] not in ("", None) else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


_TOML_SECRET = re.compile(r"""^(\s*["']?[\w.-]*(?:password|token|secret)[\w.-]*["']?\s*=\s*)(.+)$""",
                          re.IGNORECASE | re.MULTILINE)


def redact_toml(text: str) -> str:
    """The config file's text with the value of every ``*password*``, ``*token*`` or ``*secret*`` key replaced; a
    file where such a key holds a multi-line string is left out whole (its later lines would escape the line-wise
    redaction)."""
    if _TOML_SECRET_MULTILINE.search(text):
        return "# left out: a password, token or secret key holds a multi-line string; config.json has the config\n"
    return _TOML_SECRET.sub(lambda m: f'{m.group(1)}"{REDACTED}"', text)


_TOML_SECRET_MULTILINE = re.compile(r"""(?im)^\s*["']?[\w.-]*(password|token|secret)[\w.-]*["']?\s*=\s*("{3}|'{3})""")


def write_report(path: str, cfg, diag: dict, text: str, *, config_path: str | None = None) -> None:
    """Writes the support bundle ``path`` (a tar.gz) atomically: temporary file, fsync, rename.

    Members (under one directory): ``diag.json`` and ``diag.txt`` (this run), ``config.json`` (the effective
    config, redacted), ``config.toml`` (the file as written, redacted), ``status.json`` (the running agent's
    answer, or why there is none), ``versions.json``, ``throttle.json`` and ``journal.txt``. The password
    file's content is never read into it: any text equal to it is replaced too, wherever it appears.

    Raises:
        ReportError: The bundle cannot be written.
    """
    from device import config
    from device.statefile import write_atomic

    members = {"diag.json": json.dumps(diag, indent=1), "diag.txt": text,
               "config.json": json.dumps({"source": cfg.source, **redact(cfg.to_dict())}, indent=1)}
    if config_path:
        try:
            with open(config_path, encoding="utf-8", errors="replace") as f:
                members["config.toml"] = redact_toml(f.read(1 << 20))
        except OSError as exc:
            members["config.toml"] = f"# {config_path}: cannot read it ({exc.strerror or exc})\n"
    members["status.json"] = json.dumps(redact(_agent_status(cfg)), indent=1, default=str)
    members["versions.json"] = json.dumps(_versions(cfg), indent=1)
    members["throttle.json"] = json.dumps(_throttle(cfg), indent=1)
    members["journal.txt"] = _journal()
    secret = _password(cfg)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    top = f"fieldnode-diag-{config.device_id(cfg)}-{stamp}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, body in members.items():
            if secret:
                body = body.replace(secret, REDACTED)
            data = body.encode("utf-8")
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
            tar.addfile(info, io.BytesIO(data))
    try:
        write_atomic(os.path.abspath(path), buf.getvalue(), mode=0o600)
    except OSError as exc:
        raise ReportError(f"--report {path}: cannot write it ({exc.strerror or exc})") from exc


def _password(cfg) -> str:
    # Read only to scrub it from everything else; it never goes into the bundle itself.
    if not cfg.link.password_file:
        return ""
    try:
        with open(cfg.link.password_file, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _agent_status(cfg) -> dict:
    from tools.diag_checks import ask_agent

    status, why = ask_agent(cfg, 2.0)
    return {"available": status is not None, "from": why, "status": status}


def _versions(cfg) -> dict:
    from device import __version__
    from device.runtime.backends import load_backend

    out: dict = {"fieldnode": __version__, "python": sys.version, "executable": sys.executable}
    try:
        b = load_backend(cfg.runtime.backend)
        out["backend"] = {"name": b.name, "version": b.version}
    except FieldnodeError as exc:
        out["backend"] = {"error": str(exc)}
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            out["os_release"] = dict(_os_release(f.read()))
    except OSError as exc:
        out["os_release"] = {"error": exc.strerror or str(exc)}
    u = platform.uname()
    out["kernel"] = {"system": u.system, "release": u.release, "version": u.version, "machine": u.machine,
                     "node": u.node}
    return out


def _os_release(text: str):
    for raw in text.splitlines():
        key, sep, value = raw.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            yield key.strip(), value.strip().strip('"').strip("'")


def _throttle(cfg) -> dict:
    from drivers import throttle
    from drivers.sysfs import Sysfs, resolve_root

    fs = Sysfs(resolve_root(cfg.drivers.sysfs_root))  # this machine's, even with --sim
    flags = throttle.read_throttled(fs)
    if flags is None:
        return {"available": False, "why": "no firmware throttle flags (not a Raspberry Pi, or vcgencmd missing)",
                "sysfs_root": fs.root}
    return {"available": True, "raw": f"0x{flags.raw:x}", "now": list(flags.active),
            "occurred_since_boot": [b.label for b in throttle.ThrottleBit if flags.occurred(b)],
            "describe": flags.describe(), "sysfs_root": fs.root}


def _journal() -> str:
    from tools.diag_checks import which

    tool = which("journalctl")
    argv = ["journalctl", "-u", "fieldnode", "-n", str(JOURNAL_LINES), "--no-pager"]
    if tool is None:
        return f"# {' '.join(argv)}: journalctl is not installed here; no logs collected\n"
    try:
        proc = subprocess.run([tool, *argv[1:]], capture_output=True, text=True, timeout=5.0, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"# {' '.join(argv)}: could not run it ({exc}); no logs collected\n"
    note = f"# {' '.join(argv)}: exit {proc.returncode}\n"
    if proc.stderr.strip():
        note += "".join(f"# {ln}\n" for ln in proc.stderr.strip().splitlines())
    return note + proc.stdout
