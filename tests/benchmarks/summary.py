"""The table at the end of ``make bench``: every figure, its target, and met / not met.

``make bench`` runs each ``tests/benchmarks/bench_*.py``, keeps what it printed on stdout in ``<name>.jsonl`` and
its exit status in ``<name>.rc`` beside it, then runs ``python tests/benchmarks/summary.py DIR/*.jsonl``.

The convention every benchmark follows (docs/benchmarks.md, "Reading the results"):

* stdout is one JSON object per line and nothing else (logs go to stderr); one line per figure set.
* ``bench`` names the benchmark (default: the file name without ``bench_``); ``scenario``, ``profile``,
  ``isolation`` and ``model``, where present, say which figure set of it the line is.
* ``target_<figure>`` is the target of the number ``<figure>`` on the same line, written ``"<op> <number>"``
  with ``<op>`` one of ``<``, ``<=``, ``>``, ``>=`` (``"target_ratio": ">= 0.8"``). The summary compares the two
  itself. A figure that is null could not be measured on this machine: "n/a".
* ``figures``, optional: a list of more figures to show, with no target (``"figures": ["zygote_ms"]``).
* ``met`` is the line's own verdict: true, false or null (no target applies). When it disagrees with the
  figures' verdicts (it also counts a condition that is not a figure), the table shows it as a row of its own.
* ``error``: a figure set that could not run says why here, and exits non-zero.
* The exit status: non-zero when the output is wrong (outputs that differ, a scenario that could not run, a
  crash). A figure that is not met is not a failure: the table says "not met" and the status stays 0.

This script exits 1 when a benchmark failed (its status, an ``error`` line) or its output breaks the convention,
after printing the table of everything else; a figure not met does not change its status.
"""

from __future__ import annotations

import json
import math
import operator
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt,
}
LABELS = ("scenario", "profile", "isolation", "model")
MET, NOT_MET, NA, FAILED = "met", "NOT MET", "n/a", "FAILED"


class SummaryError(ValueError):
    """A benchmark's output does not follow the convention (the message names the file, line and key)."""


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    bench: str
    figure: str
    value: str
    target: str
    verdict: str


def parse_target(key: str, text: object) -> tuple[str, float]:
    """Reads a target written ``"<op> <number>"``.

    Args:
        key: The ``target_<figure>`` key, for the error message.
        text: Its value.

    Returns:
        The operator (a key of :data:`OPS`) and the bound.

    Raises:
        SummaryError: Not a string, no known operator in front, or no finite number after it.
    """
    if not isinstance(text, str):
        raise SummaryError(f"{key}: {json.dumps(text)} is not a string \"<op> <number>\" (write \">= 0.8\" or "
                           f"\"<= 0.8\")")
    stripped = text.strip()
    op = next((o for o in OPS if stripped.startswith(o)), None)  # "<=" is tried before "<"
    if op is None:
        raise SummaryError(f"{key}: {text!r} does not start with one of {', '.join(OPS)}")
    try:
        bound = float(stripped[len(op):])
    except ValueError:
        raise SummaryError(f"{key}: {text!r} has no number after {op!r}") from None
    if not math.isfinite(bound):
        raise SummaryError(f"{key}: {text!r} is not a finite bound")
    return op, bound


def _number(key: str, value: object) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SummaryError(f"{key}: {json.dumps(value)} is not a number or null")
    return float(value)


def _show(value: Optional[float]) -> str:
    if value is None:
        return "null"
    return f"{value:g}" if abs(value) < 1e6 else f"{value:.0f}"


def line_rows(default_bench: str, line: dict) -> tuple[list[Row], bool]:
    """The rows of one output line, and whether the line reports a failure (an ``error`` key).

    Args:
        default_bench: The benchmark's name when the line has no ``bench``.
        line: The parsed JSON object.

    Raises:
        SummaryError: A target, figure or ``met`` that breaks the convention.
    """
    bench = str(line.get("bench", default_bench))
    name = " ".join([bench] + [str(line[k]) for k in LABELS if line.get(k) not in (None, "")])
    if "error" in line:
        return [Row(name, "error", str(line["error"])[:60], "", FAILED)], True
    rows, verdicts = [], []
    for key in line:
        if not key.startswith("target_"):
            continue
        figure = key[len("target_"):]
        if figure not in line:
            raise SummaryError(f"{key}: the line has no figure {figure!r} beside it")
        op, bound = parse_target(key, line[key])
        value = _number(figure, line[figure])
        ok = None if value is None else OPS[op](value, bound)
        verdicts.append(ok)
        rows.append(Row(name, figure, _show(value), f"{op} {bound:g}", NA if ok is None else MET if ok else NOT_MET))
    extra = line.get("figures", [])
    if not isinstance(extra, list) or not all(isinstance(f, str) for f in extra):
        raise SummaryError(f"figures: {json.dumps(extra)} is not a list of figure names")
    for figure in extra:
        if figure not in line:
            raise SummaryError(f"figures: {figure!r} is not on the line")
        rows.append(Row(name, figure, _show(_number(figure, line[figure])), "", NA))
    met = line.get("met")
    if met not in (True, False, None):
        raise SummaryError(f"met: {json.dumps(met)} is not true, false or null")
    known = [v for v in verdicts if v is not None]
    if met is not None and (not known or all(known) != met):
        rows.append(Row(name, "met (its own verdict)", json.dumps(met), "", MET if met else NOT_MET))
    if not rows:
        rows.append(Row(name, "(no figures)", "", "", NA))
    return rows, False


def read_output(path: str) -> tuple[list[Row], list[str]]:
    """The rows of one benchmark's saved stdout (``<name>.jsonl``) and the failures it shows.

    The exit status is read from ``<name>.rc`` beside it when that file exists.

    Returns:
        The rows, and one message per failure (empty when the benchmark ran and printed well-formed lines).
    """
    stem = os.path.basename(path).rsplit(".", 1)[0]
    default_bench = stem[len("bench_"):] if stem.startswith("bench_") else stem
    rows: list[Row] = []
    failures: list[str] = []
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        return [Row(default_bench, "output", "unreadable", "", FAILED)], [f"{path}: {e.strerror}"]
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            if not isinstance(line, dict):
                raise SummaryError("not a JSON object")
            got, failed = line_rows(default_bench, line)
        except (ValueError, SummaryError) as e:  # json.JSONDecodeError is a ValueError
            rows.append(Row(default_bench, f"line {number}", "malformed", "", FAILED))
            failures.append(f"{path}:{number}: {e}")
            continue
        rows.extend(got)
        if failed:
            failures.append(f"{path}:{number}: {line['error']}")
    rc_path = os.path.join(os.path.dirname(path), stem + ".rc")
    if os.path.exists(rc_path):
        with open(rc_path, encoding="utf-8") as f:
            rc_text = f.read().strip()
        if not rc_text.lstrip("-").isdigit():
            failures.append(f"{rc_path}: {rc_text!r} is not an exit status")
            rows.append(Row(default_bench, "exit status", rc_text[:20], "0", FAILED))
        elif int(rc_text) != 0:
            failures.append(f"{path}: {default_bench} exited with status {rc_text}")
            rows.append(Row(default_bench, "exit status", rc_text, "0", FAILED))
    if not rows:
        failures.append(f"{path}: {default_bench} printed nothing")
        rows.append(Row(default_bench, "output", "none", "", FAILED))
    return rows, failures


def render(rows: list[Row]) -> str:
    """The rows as an aligned text table with a header."""
    table = [("benchmark", "figure", "value", "target", "verdict")] + [
        (r.bench, r.figure, r.value, r.target, r.verdict) for r in rows]
    widths = [max(len(cells[i]) for cells in table) for i in range(5)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in table]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str]) -> int:
    """Prints the table of the given outputs; 1 when a benchmark failed or broke the convention."""
    if not argv:
        print("usage: summary.py BENCH_OUTPUT.jsonl ...", file=sys.stderr)
        return 2
    rows: list[Row] = []
    failures: list[str] = []
    for path in argv:
        got, failed = read_output(path)
        rows.extend(got)
        failures.extend(failed)
    print(render(rows))
    counts = {v: sum(1 for r in rows if r.verdict == v) for v in (MET, NOT_MET, NA, FAILED)}
    print(f"\n{counts[MET]} met, {counts[NOT_MET]} not met, {counts[NA]} n/a, {counts[FAILED]} failed")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
