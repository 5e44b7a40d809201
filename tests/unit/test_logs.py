"""Log formats: journald's stream protocol (every line of a record at its priority), text for a terminal, JSON
lines; ``auto`` decided by ``$JOURNAL_STREAM`` against the stream really written to."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from device import logs
from device.errors import ConfigError


@pytest.fixture
def root_logger():
    """Puts the root logger and the thread hook back as they were (pytest's capture handlers included)."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, threading.excepthook)
    yield root
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    threading.excepthook = saved[2]


def _record(level=logging.ERROR, msg="boom", args=(), exc=False, name="device.agent", created=None):
    exc_info = None
    if exc:
        try:
            raise ValueError("bad value\nsecond line of the error")
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)
    if created is not None:
        rec.created, rec.msecs = created, (created - int(created)) * 1000
    return rec


def journald_entries(data: str, default: int = 6) -> list[tuple[int, str]]:
    """What journald makes of a stream (journald-stream.c): one entry per line ended by a newline or a NUL,
    a leading ``<N>`` taken as the priority (else ``SyslogLevel=``, info), empty entries dropped."""
    entries = []
    for line in re.split("[\n\0]", data):
        prio, m = default, re.match(r"<([0-7])>", line)
        if m:
            prio, line = int(m.group(1)), line[m.end():]
        if line:
            entries.append((prio, line))
    return entries


@pytest.mark.parametrize("level,prio", [(logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4),
                                        (logging.ERROR, 3), (logging.CRITICAL, 2), (25, 6), (5, 7)])
def test_syslog_priorities(level, prio):
    assert logs.syslog_priority(level) == prio
    assert logs.JournalFormatter().format(_record(level)).startswith(f"<{prio}>device.agent: boom")


def test_journal_traceback_keeps_its_priority_on_every_line():
    out = logs.JournalFormatter().format(_record(exc=True))
    lines = out.split("\n")
    assert lines[0] == "<3>device.agent: boom"
    assert len(lines) > 4 and all(line.startswith("<3>") for line in lines)
    assert lines[-2:] == ["<3>ValueError: bad value", "<3>second line of the error"]
    assert not re.search(r"\d\d:\d\d:\d\d", out)  # the journal stamps entries itself
    assert {prio for prio, _ in journald_entries(out + "\n")} == {3}


def test_journal_nul_and_overlong_lines_do_not_escape_the_prefix():
    long = "x" * (logs.JOURNAL_LINE_CHARS * 2 + 10)
    out = logs.JournalFormatter().format(_record(logging.WARNING, "a\0b\n\n" + long))
    entries = journald_entries(out + "\n")
    assert entries[0] == (4, "device.agent: a\\0b")
    assert [p for p, _ in entries] == [4] * 4 and "".join(text for _, text in entries[1:]) == long
    assert all(len(line.encode()) < 48 * 1024 for line in out.split("\n"))


def test_text_has_a_local_timestamp_with_milliseconds():
    created = 1795950000.25  # exact in binary: logging's own msecs of .123 may be 122.99...
    out = logs.TextFormatter().format(_record(logging.WARNING, "sensor %s", ("fault",), created=created))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
    assert out == f"{stamp}.250 WARNING device.agent: sensor fault"


def test_json_line_fields_and_exception():
    created = 1795950000.5
    out = logs.JsonFormatter().format(_record(created=created, exc=True))
    assert "\n" not in out
    doc = json.loads(out)
    assert doc["ts"] == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + ".500Z"
    assert (doc["level"], doc["logger"], doc["message"]) == ("error", "device.agent", "boom")
    assert doc["exc"].startswith("Traceback") and doc["exc"].endswith("second line of the error")
    assert "exc" not in json.loads(logs.JsonFormatter().format(_record()))


class Unprintable:
    def __str__(self):
        raise RuntimeError("no str")

    __repr__ = __str__


@pytest.mark.parametrize("formatter", [logs.JournalFormatter, logs.TextFormatter, logs.JsonFormatter])
@pytest.mark.parametrize("msg,args,broken", [
    ("%d items", ("x",), True), ("%s and %s", ("one",), True), ("%s", (Unprintable(),), True),
    (Unprintable(), (), True), ("bytes %s", (b"\xff\x00",), False), ("\udcff surrogate", (), False)])
def test_odd_messages_never_raise(formatter, msg, args, broken):
    out = formatter().format(_record(logging.WARNING, msg, args))
    text = json.loads(out)["message"] if formatter is logs.JsonFormatter else out
    assert ("log message could not be formatted" in text) == broken
    if formatter is logs.JsonFormatter:
        out.encode("ascii")  # escaped: writable to any stream


def test_setup_replaces_its_handler_and_basic_config_but_keeps_others(root_logger, tmp_path):
    before = logging.StreamHandler(io.StringIO())  # what logging.basicConfig makes: replaced
    root_logger.addHandler(before)
    kept = logging.FileHandler(tmp_path / "other.log")
    root_logger.addHandler(kept)
    first, second = io.StringIO(), io.StringIO()
    assert logs.setup("warning", "json", stream=first) == "json"
    assert logs.setup("info", "text", stream=second) == "text"
    ours = [h for h in root_logger.handlers if getattr(h, "_fieldnode", False)]
    assert len(ours) == 1 and kept in root_logger.handlers
    assert before not in root_logger.handlers
    logging.getLogger("device.agent").info("once")
    assert first.getvalue() == before.stream.getvalue() == "" and second.getvalue().count("device.agent: once") == 1
    assert root_logger.level == logging.INFO
    kept.close()


def test_default_stream_follows_sys_stderr(root_logger, monkeypatch):
    logs.setup("info", "journal")
    for _ in range(2):  # a replaced stderr (pytest's capture, a daemon's redirect) is followed, never pinned
        now = io.StringIO()
        monkeypatch.setattr(sys, "stderr", now)
        logging.getLogger("device.x").warning("here")
        assert now.getvalue() == "<4>device.x: here\n"


def test_setup_levels(root_logger):
    stream = io.StringIO()
    logs.setup("error", "journal", stream=stream)
    logging.getLogger("device.x").warning("hidden")
    logging.getLogger("device.x").error("shown")
    assert stream.getvalue() == "<3>device.x: shown\n"
    logs.setup("error", "journal", verbose=True, stream=stream)
    assert root_logger.level == logging.DEBUG
    with pytest.raises(ConfigError, match="device.log_level: unknown log level 'loud'"):
        logs.setup("loud", stream=stream)
    with pytest.raises(ConfigError, match="device.log_format: unknown log format 'xml'"):
        logs.setup("info", "xml", stream=stream)


def _stream_id(f) -> str:
    st = os.fstat(f.fileno())
    return f"{st.st_dev}:{st.st_ino}"


def test_auto_is_journal_only_on_the_stream_journal_stream_names(tmp_path):
    with open(tmp_path / "journal", "w") as journal, open(tmp_path / "elsewhere", "w") as other:
        env = {"JOURNAL_STREAM": _stream_id(journal)}
        assert logs.resolve_format("auto", journal, env) == "journal"
        assert logs.resolve_format("auto", other, env) == "text"  # stderr redirected away from the journal
        assert logs.resolve_format("auto", journal, {}) == "text"
        for bad in ("", "1", "a:b", "1:2:3", ":"):
            assert logs.resolve_format("auto", journal, {"JOURNAL_STREAM": bad}) == "text"
        assert logs.resolve_format("auto", io.StringIO(), env) == "text"  # no file descriptor
        assert logs.resolve_format("json", journal, env) == "json"


CHILD = textwrap.dedent("""
    import logging, threading
    from device import logs
    print(logs.setup(), flush=True)
    logging.getLogger("device.agent").warning("sensor fault: cannot open /dev/ttyUSB9")
    def die():
        raise RuntimeError("loop hung up")
    t = threading.Thread(target=die, name="inference")
    t.start()
    t.join()
""")


def test_a_real_process_under_journal_stream_and_redirected(tmp_path):
    """systemd hands the service its stream and ``JOURNAL_STREAM``; a child redirected elsewhere inherits only
    the variable."""
    with open(tmp_path / "journal", "w+") as journal, open(tmp_path / "file", "w+") as other:
        env = {**os.environ, "JOURNAL_STREAM": _stream_id(journal)}
        for stderr, want in ((journal, "journal"), (other, "text")):
            done = subprocess.run([sys.executable, "-c", CHILD], stderr=stderr, stdout=subprocess.PIPE, env=env,
                                  text=True, timeout=60)
            assert done.returncode == 0 and done.stdout.strip() == want
        journal.seek(0)
        entries = journald_entries(journal.read())
        assert entries[0] == (4, "device.agent: sensor fault: cannot open /dev/ttyUSB9")
        # The thread's traceback: one record, every line at critical, none at the journal's default.
        assert entries[1] == (2, "device: thread inference ended by an unhandled exception")
        assert entries[-1] == (2, "RuntimeError: loop hung up") and {p for p, _ in entries[1:]} == {2}
        other.seek(0)
        text = other.read()
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} WARNING device.agent: sensor fault", text)
        assert "<4>" not in text and "RuntimeError: loop hung up" in text


def test_log_format_argument():
    p = argparse.ArgumentParser()
    logs.add_log_format_argument(p)
    assert p.parse_args([]).log_format is None  # the config decides
    assert p.parse_args(["--log-format", "json"]).log_format == "json"
    with pytest.raises(SystemExit):
        p.parse_args(["--log-format", "xml"])
