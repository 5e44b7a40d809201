"""Log lines that fit where they land: the journal under systemd, a terminal, or a log shipper.

:func:`setup` configures the root logger once early (``fieldnode`` with its defaults) and again when ``fieldnode
run`` has read its config (``device.log_level``, ``device.log_format``); each call replaces the handler the
previous one installed, so no line is written twice. Three formats:

``journal``
    systemd's stream protocol: ``<N>`` (the syslog priority: debug 7, info 6, warning 4, error 3, critical 2),
    then ``logger: message``, no timestamp (the journal has its own). journald reads the prefix line by line
    and makes every line its own entry, at ``SyslogLevel=`` (info) when the line has no prefix; so every line
    of a multi-line message (a traceback) carries the same prefix and an error's traceback is filtered,
    coloured and alerted on as an error. A NUL byte would break a line too, and journald splits lines longer
    than its ``LineMax=`` (48 KiB by default) with the rest unprefixed: both are taken care of here.
``text``
    For a terminal: ``2026-11-29 11:00:00.123 WARNING device.agent.agent: message`` in local time.
``json``
    One object per line: ``ts`` (ISO 8601 UTC with milliseconds), ``level``, ``logger``, ``message`` and
    ``exc`` (the traceback) when there is one.

``auto`` picks ``journal`` when ``$JOURNAL_STREAM`` names the very stream we write to (systemd sets it to
``DEV:INODE`` of the service's stderr; a child whose stderr is redirected elsewhere inherits the variable but
not the stream, and then writes ``text``), else ``text``. No formatter raises on a message whose arguments do
not fit its format or whose objects cannot be printed: the line says so instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Mapping

from device.errors import ConfigError

FORMATS = ("auto", "journal", "text", "json")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}

# Longest line given to journald in one piece, in characters: at most 4 bytes each in UTF-8, so a piece stays
# under journald's default LineMax= of 48 KiB, beyond which it splits a line and the rest has no prefix.
JOURNAL_LINE_CHARS = 8192


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (sd-daemon(3)'s ``SD_ERR`` and so on); a custom level takes the
    priority of the standard level at or below it."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def _message(record: logging.LogRecord) -> str:
    """``record.getMessage()``, or a line that says why it could not be formatted (never raises)."""
    try:
        return record.getMessage()
    except Exception as exc:  # a wrong %-format, or an object whose __str__ raises
        try:
            msg = repr(record.msg)
        except Exception:
            msg = f"<{type(record.msg).__name__} object>"
        try:
            args = repr(record.args)
        except Exception:
            args = "<unprintable arguments>"
        return f"{msg} {args} (log message could not be formatted: {type(exc).__name__}: {exc})"


class _Formatter(logging.Formatter):
    """A formatter whose :meth:`format` survives a message that cannot be formatted."""

    def _exc(self, record: logging.LogRecord) -> str:
        """The traceback and stack of a record, or ``""``."""
        parts = []
        try:
            if record.exc_info:
                if not record.exc_text:
                    record.exc_text = self.formatException(record.exc_info)
            if record.exc_text:
                parts.append(record.exc_text)
            if record.stack_info:
                parts.append(self.formatStack(record.stack_info))
        except Exception as exc:  # a traceback holding an object whose __str__ raises
            parts.append(f"(traceback could not be formatted: {type(exc).__name__})")
        return "\n".join(p.rstrip("\n") for p in parts)

    def format(self, record: logging.LogRecord) -> str:
        record.message = _message(record)
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        exc = self._exc(record)
        return f"{line}\n{exc}" if exc else line


class TextFormatter(_Formatter):
    """``2026-11-29 11:00:00.123 WARNING device.agent.agent: message`` (local time), for a terminal."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(record.created))
        return f"{stamp}.{int(record.msecs):03d}"


class JournalFormatter(_Formatter):
    """systemd's stream protocol: ``<N>logger: message``, every line of the record with the same ``<N>``."""

    def __init__(self):
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        text = super().format(record).replace("\0", "\\0")  # a NUL ends a journal entry as a newline does
        out = []
        for line in text.splitlines():
            line = line.rstrip()
            if not line:  # journald drops an empty entry anyway
                continue
            for start in range(0, len(line), JOURNAL_LINE_CHARS):
                out.append(prefix + line[start:start + JOURNAL_LINE_CHARS])
        return "\n".join(out) or f"{prefix}{record.name}:"


class JsonFormatter(_Formatter):
    """One JSON object a line: ``ts``, ``level``, ``logger``, ``message`` and ``exc`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        doc = {"ts": f"{ts}.{int(record.msecs):03d}Z", "level": record.levelname.lower(),
               "logger": record.name, "message": _message(record)}
        exc = self._exc(record)
        if exc:
            doc["exc"] = exc
        # ASCII escapes: a lone surrogate or an odd byte never makes the write fail.
        return json.dumps(doc, ensure_ascii=True, default=str)


FORMATTERS = {"journal": JournalFormatter, "text": TextFormatter, "json": JsonFormatter}


def journal_stream(stream, environ: Mapping | None = None) -> bool:
    """Whether ``stream`` is the journal stream systemd connected us to.

    systemd.exec(5): ``$JOURNAL_STREAM`` is ``DEV:INODE`` (decimal) of the stream it connected stdout or
    stderr to; comparing it with ``fstat`` of our stream tells a service from a child whose stderr was
    redirected to a file or a pipe, which inherits the variable but must not write ``<N>`` prefixes there.
    """
    env = os.environ if environ is None else environ
    raw = env.get("JOURNAL_STREAM") or ""
    try:
        dev, ino = (int(part) for part in raw.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, TypeError, AttributeError, OSError):  # unset or malformed, or a stream with no fd
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def resolve_format(fmt: str = "auto", stream=None, environ: Mapping | None = None) -> str:
    """The format ``fmt`` means on ``stream`` (default ``sys.stderr``): ``auto`` becomes ``journal`` or
    ``text``.

    Raises:
        ConfigError: ``fmt`` is not one of :data:`FORMATS` (key ``device.log_format``).
    """
    name = str(fmt).lower()
    if name not in FORMATS:
        raise ConfigError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}", "device.log_format")
    if name != "auto":
        return name
    return "journal" if journal_stream(sys.stderr if stream is None else stream, environ) else "text"


def _level(level: str) -> int:
    value = LEVELS.get(str(level).lower())
    if value is None:
        raise ConfigError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}", "device.log_level")
    return value


def _ours(handler: logging.Handler) -> bool:
    """A handler :func:`setup` replaces: its own, or the bare stderr/stdout one ``logging.basicConfig`` made.

    Other handlers (a file handler an embedding program added, pytest's capture) stay.
    """
    return getattr(handler, "_fieldnode", False) or type(handler) is logging.StreamHandler


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each record (as logging's last-resort handler does), so a
    handler installed once never writes to a stream that was replaced and closed since."""

    def __init__(self):
        logging.Handler.__init__(self)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.setStream: stderr is followed, not pinned
        pass


def _thread_excepthook(args) -> None:
    """An exception that ends a thread goes through logging (one record, in the format in force) instead of
    being printed bare to stderr, where the journal would keep each line of its traceback at info."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("device").critical("thread %s ended by an unhandled exception", name,
                                         exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def setup(level: str = "info", fmt: str = "auto", *, verbose: bool = False, environ: Mapping | None = None,
          stream=None) -> str:
    """Configures the root logger; returns the format in force (``journal``, ``text`` or ``json``).

    Idempotent: a later call replaces what an earlier one installed (and a ``logging.basicConfig`` handler).
    Also routes an exception that ends a thread through logging.

    Args:
        level: ``debug``, ``info``, ``warning``, ``error`` or ``critical`` (``device.log_level``).
        fmt: One of :data:`FORMATS` (``device.log_format`` or ``--log-format``).
        verbose: ``-v``: debug level whatever ``level`` says.
        environ: Where ``JOURNAL_STREAM`` is read (default: ours).
        stream: Where lines go (default: ``sys.stderr``, looked up at each line; ``auto`` looks at the one
            in place now).

    Raises:
        ConfigError: An unknown level or format.
    """
    levelno = logging.DEBUG if verbose else _level(level)
    name = resolve_format(fmt, sys.stderr if stream is None else stream, environ)
    handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    handler.setFormatter(FORMATTERS[name]())
    handler._fieldnode = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for old in list(root.handlers):
        if _ours(old):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(levelno)
    threading.excepthook = _thread_excepthook
    return name


def add_log_format_argument(parser) -> None:
    """Adds ``--log-format {auto,journal,text,json}`` (default ``None``: the config's ``device.log_format``)."""
    parser.add_argument("--log-format", choices=FORMATS, default=None,
                        help="log line format (default: device.log_format, auto): journal is <N> priority "
                             "prefixes without timestamps (auto picks it under systemd), text has timestamps, "
                             "json is one object a line")
