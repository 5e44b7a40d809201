"""The support bundle of ``fieldnode diag --report``: the config with its secrets redacted, the agent's status,
the diagnosis, versions, the throttle history and recent logs, in one ``.tar.gz``."""

from __future__ import annotations

import io
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import time
from typing import TYPE_CHECKING, Any, Iterator

from device.errors import FieldnodeError

if TYPE_CHECKING:
    from device.config import Config

REDACTED = "<redacted>"
SECRET_RE = re.compile(r"password|token|secret", re.IGNORECASE)
JOURNAL_LINES = 1000


class ReportError(FieldnodeError):
    """The support bundle cannot be written where it was asked for."""

    code = "report_failed"


def check_report_path(path: str) -> None:
    """Refuses a bundle path whose directory is missing or not writable (``""``: the default name, here)."""
    d = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
    if not os.path.isdir(d):
        raise ReportError(f"--report {path}: the directory {d} does not exist")
    if not os.access(d, os.W_OK):
        raise ReportError(f"--report {path}: the directory {d} is not writable by this user")


def redact(obj: Any) -> Any:  # a JSON value: anything json.dumps takes
    """A copy of ``obj`` with the value of every key named like a password, token or secret replaced."""
    if isinstance(obj, dict):
        return {k: (REDACTED if SECRET_RE.search(str(k)) and obj[k] not in ("", None) else redact(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


# scheme://userinfo@host: the userinfo (user:password, or a token) of any URL, quoted or not, whole or in a message.
_URL_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)([^\s/?#@\"'<>]+)@")


def redact_urls(text: str) -> str:
    """``text`` with the userinfo of every URL in it replaced: ``https://user:TOKEN@host/`` becomes
    ``https://<redacted>@host/``. Works on raw text, so a config that does not load is redacted too."""
    return _URL_USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)


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


def write_report(path: str, cfg: Config, diag: dict, text: str, *, config_path: str | None = None) -> str:
    """Writes the support bundle ``path`` (a tar.gz) atomically: temporary file, fsync, rename.

    Members (under one directory named after the device id): ``diag.json`` and ``diag.txt`` (this run),
    ``config.json`` (the effective config, redacted), ``config.toml`` (the file as written, redacted),
    ``status.json`` (the running agent's answer, or why there is none), ``versions.json``, ``throttle.json`` and
    ``journal.txt``. The password file's content is never read into it: any text equal to it is replaced too,
    wherever it appears; so is the userinfo (``user:TOKEN@``) of every URL in every member.

    Args:
        path: The bundle's file; ``""`` names it ``fieldnode-diag-<device>-<UTC time>.tar.gz`` in the current
            directory.

    Returns:
        The path written.

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
    path = path or f"{top}.tar.gz"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, body in members.items():
            if secret:
                body = body.replace(secret, REDACTED)
            data = redact_urls(body).encode("utf-8")
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
            tar.addfile(info, io.BytesIO(data))
    try:
        write_atomic(os.path.abspath(path), buf.getvalue(), mode=0o600)
    except OSError as exc:
        raise ReportError(f"--report {path}: cannot write it ({exc.strerror or exc})") from exc
    return path


def _password(cfg: Config) -> str:
    # Read only to scrub it from everything else; it never goes into the bundle itself.
    if not cfg.link.password_file:
        return ""
    from device.link.url import PasswordFileError, read_password

    try:
        return read_password(cfg.link.password_file)  # exactly what the link sends, trailing spaces included
    except PasswordFileError:
        return ""


def _agent_status(cfg: Config) -> dict:
    from device.diag.checks import ask_agent

    status, why = ask_agent(cfg, 2.0)
    return {"available": status is not None, "from": why, "status": status}


def _versions(cfg: Config) -> dict:
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


def _os_release(text: str) -> Iterator[tuple[str, str]]:
    for raw in text.splitlines():
        key, sep, value = raw.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            yield key.strip(), value.strip().strip('"').strip("'")


def _throttle(cfg: Config) -> dict:
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
    from device.diag.checks import which

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
