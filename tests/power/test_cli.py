"""``fieldnode power``: status on a virtual board and on a bad root, and a short simulation."""

from __future__ import annotations

import json

import pytest

from tools.cli import main


def test_status_reads_a_virtual_board(capsys):
    assert main(["power", "status", "--sim", "rpi5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["snapshot"]["temp_source"] == "cpu-thermal" and out["snapshot"]["temp_c"] > 20
    assert out["cpufreq"][0]["max_khz"] == 2400000
    assert out["throttle"] == "no throttling"
    assert out["level"] == "performance" and out["plan"]["cpu_max_khz"] == 2400000


def test_status_reads_a_given_root_and_says_what_the_policy_calls_for(tmp_path, capsys):
    from drivers.sim.board import VirtualBoard

    VirtualBoard(str(tmp_path), "rpi4", battery_mah=2000, soc_pct=20, mains=False)
    assert main(["power", "status", "--root", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "battery: 20.0 %, charging: no, external power: no" in text  # for people, not Python values
    assert "cpus 0-3" in text
    assert "policy calls for: saver (battery 20% <= 25% and not charging)" in text


def test_status_refuses_a_missing_root(tmp_path, capsys):
    assert main(["power", "status", "--root", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_status_refuses_an_invalid_policy(tmp_path, capsys):
    cfg = tmp_path / "f.toml"
    cfg.write_text("[power.saver]\nenter_temp_c = 60\n")
    assert main(["power", "status", "--sim", "rpi4", "--config", str(cfg)]) == 2
    assert "power.saver.enter_temp_c: must be above power.balanced.enter_temp_c" in capsys.readouterr().err


def test_simulate_plug_returns_to_performance_within_one_dwell(capsys):
    assert main(["power", "simulate", "--scenario", "plug", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["scenario"] == "plug" and out["met"] is True and out["return_s"] <= 60.0
    assert out["target_return_s"] == "<= 60"


def test_simulate_says_what_it_compared_in_words(capsys):
    assert main(["power", "simulate", "--scenario", "plug"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SIMULATED rpi4, scenario plug") and "back to performance after" in out


def test_simulate_refuses_an_unknown_scenario(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["power", "simulate", "--scenario", "battery"])
    assert exc.value.code == 2
    assert "invalid choice: 'battery'" in capsys.readouterr().err




def test_simulate_a_scenario_against_every_baseline_prints_one_line_with_the_ratios(capsys):
    assert main(["power", "simulate", "--sim", "jetson-orin-nano", "--scenario", "rate-light", "--quick",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["scenario"], out["profile"], out["figure"]) == ("rate-light", "jetson-orin-nano", "runtime h")
    assert out["best_static"].startswith("static ") and out["best_kernel"].startswith("kernel ")
    assert out["ratio_vs_best_static"] == pytest.approx(out["governed"] / out["best_static_value"], abs=0.002)
    assert out["ratio_vs_best_kernel"] == pytest.approx(out["governed"] / out["best_kernel_value"], abs=0.002)
    assert out["os_default"] == "kernel schedutil 6t full" and out["kept_up"] >= 0.99
    assert out["met"] is None  # a light load: every plan ties, and the line says so
    assert out["target_ratio_vs_best_static"] == ">= 1.0"
