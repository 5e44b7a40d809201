"""The table at the end of ``make bench`` (tests/benchmarks/summary.py): each figure beside its target, and a
benchmark that failed or broke the output convention failing the run while the others are still shown."""

from __future__ import annotations

import json
import os

import pytest

from tests.benchmarks.summary import FAILED, MET, NA, NOT_MET, SummaryError, line_rows, main, parse_target, read_output


def write_output(directory: str, name: str, lines: list, rc: int | str | None = 0) -> str:
    path = os.path.join(directory, f"{name}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    if rc is not None:
        with open(os.path.join(directory, f"{name}.rc"), "w", encoding="utf-8") as f:
            f.write(f"{rc}\n")
    return path


@pytest.mark.parametrize("text, want", [(">= 0.8", (">=", 0.8)), ("<=1.25", ("<=", 1.25)), ("< 80", ("<", 80.0)),
                                        ("> 2", (">", 2.0))])
def test_a_target_is_an_operator_and_a_bound(text, want):
    assert parse_target("target_x", text) == want


@pytest.mark.parametrize("value, says", [
    (0.8, "is not a string"),
    ("0.8", "does not start with one of"),
    ("== 1", "does not start with one of"),
    (">= fast", "has no number after '>='"),
    (">= ", "has no number after '>='"),
    ("<= nan", "is not a finite bound"),
])
def test_a_malformed_target_is_refused_naming_its_key(value, says):
    with pytest.raises(SummaryError, match="target_ratio") as e:
        parse_target("target_ratio", value)
    assert says in str(e.value)


def test_each_target_gives_a_row_with_its_own_verdict():
    rows, failed = line_rows("update", {"bench": "install", "ratio": 0.9, "extra_rss_mb": 40.0,
                                        "target_ratio": ">= 0.8", "target_extra_rss_mb": "<= 32", "met": False})
    assert not failed
    assert [(r.bench, r.figure, r.value, r.target, r.verdict) for r in rows] == [
        ("install", "ratio", "0.9", ">= 0.8", MET), ("install", "extra_rss_mb", "40", "<= 32", NOT_MET)]


def test_labels_name_the_figure_set_and_the_file_names_the_benchmark_by_default():
    rows, _ = line_rows("governor", {"scenario": "hot", "profile": "rpi4", "max_temp_c": 76.6,
                                     "target_max_temp_c": "< 80", "met": True})
    assert rows[0].bench == "governor hot rpi4" and rows[0].verdict == MET


def test_a_figure_that_could_not_be_measured_is_na():
    rows, _ = line_rows("footprint", {"ratio": None, "target_ratio": "<= 1.5", "met": None})
    assert [(r.value, r.verdict) for r in rows] == [("null", NA)]


def test_figures_without_a_target_are_shown_na():
    rows, _ = line_rows("spawn", {"zygote_ms": 8.5, "figures": ["zygote_ms"], "met": None})
    assert [(r.figure, r.value, r.target, r.verdict) for r in rows] == [("zygote_ms", "8.5", "", NA)]


def test_a_verdict_of_its_own_that_differs_from_the_figures_gets_its_own_row():
    rows, _ = line_rows("governor", {"scenario": "battery", "runtime_ratio": 1.6, "target_runtime_ratio": ">= 1.5",
                                     "met": False})
    assert [(r.figure, r.verdict) for r in rows] == [("runtime_ratio", MET), ("met (its own verdict)", NOT_MET)]


def test_a_line_with_only_a_verdict_shows_it():
    rows, _ = line_rows("idle", {"met": True})
    assert [(r.figure, r.verdict) for r in rows] == [("met (its own verdict)", MET)]


def test_an_error_line_is_a_failure():
    rows, failed = line_rows("link", {"bench": "link", "error": "no broker: mosquitto not found"})
    assert failed and rows[0].verdict == FAILED and "mosquitto" in rows[0].value


@pytest.mark.parametrize("line, says", [
    ({"target_ratio": ">= 0.8"}, "target_ratio: the line has no figure 'ratio'"),
    ({"ratio": "fast", "target_ratio": ">= 0.8"}, "ratio: \"fast\" is not a number or null"),
    ({"ratio": True, "target_ratio": ">= 0.8"}, "ratio: true is not a number or null"),
    ({"figures": "rate"}, "figures: \"rate\" is not a list of figure names"),
    ({"figures": ["rate"]}, "figures: 'rate' is not on the line"),
    ({"met": "yes"}, "met: \"yes\" is not true, false or null"),
])
def test_a_line_that_breaks_the_convention_is_refused(line, says):
    with pytest.raises(SummaryError) as e:
        line_rows("x", line)
    assert says in str(e.value)


def test_an_output_file_reads_every_line_and_its_exit_status(tmp_path):
    path = write_output(str(tmp_path), "bench_age", [{"ratio": 0.9, "target_ratio": ">= 0.8", "met": True}])
    rows, failures = read_output(path)
    assert failures == [] and [(r.bench, r.verdict) for r in rows] == [("age", MET)]


@pytest.mark.parametrize("lines, rc, says", [
    ([{"ratio": 0.9, "target_ratio": ">= 0.8"}], 1, "age exited with status 1"),
    (["not json"], 0, "bench_age.jsonl:1: Expecting value"),
    (["[1, 2]"], 0, "bench_age.jsonl:1: not a JSON object"),
    ([{"ratio": 0.9, "target_ratio": "0.8"}], 0, "bench_age.jsonl:1: target_ratio: '0.8' does not start"),
    ([], 0, "age printed nothing"),
    ([{"error": "a trial wrote other plaintext"}], 1, "bench_age.jsonl:1: a trial wrote other plaintext"),
    ([{"ratio": 0.9, "target_ratio": ">= 0.8"}], "killed", "'killed' is not an exit status"),
])
def test_a_failed_or_malformed_output_is_a_failure(tmp_path, lines, rc, says):
    rows, failures = read_output(write_output(str(tmp_path), "bench_age", lines, rc))
    assert any(says in f for f in failures), failures
    assert any(r.verdict == FAILED for r in rows)


def test_a_missing_output_file_is_a_failure(tmp_path):
    rows, failures = read_output(str(tmp_path / "bench_gone.jsonl"))
    assert rows[0].verdict == FAILED and "bench_gone.jsonl" in failures[0]


def test_the_table_shows_every_benchmark_and_only_failures_fail(tmp_path, capsys):
    ok = write_output(str(tmp_path), "bench_age", [{"ratio": 0.7, "target_ratio": ">= 0.8", "met": False}])
    assert main([ok]) == 0  # not met is reported, not a failure
    out = capsys.readouterr().out
    assert "ratio" in out and NOT_MET in out and "1 not met" in out
    crashed = write_output(str(tmp_path), "bench_link", [], rc=1)
    assert main([ok, crashed]) == 1
    captured = capsys.readouterr()
    assert "age" in captured.out and "exit status" in captured.out  # the others are still shown
    assert "link exited with status 1" in captured.err


def test_the_table_is_aligned(tmp_path, capsys):
    path = write_output(str(tmp_path), "bench_update", [
        {"bench": "install", "ratio": 0.902, "target_ratio": ">= 0.8", "met": True},
        {"bench": "fleet", "bytes_ratio": 1.0, "target_bytes_ratio": "<= 1.1", "met": True}])
    main([path])
    lines = capsys.readouterr().out.splitlines()
    header, rule, first, second = lines[:4]
    assert header.split() == ["benchmark", "figure", "value", "target", "verdict"]
    assert set(rule) <= {"-", " "}
    assert first.index("0.902") == second.index("1") == header.index("value")


def test_no_arguments_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err
