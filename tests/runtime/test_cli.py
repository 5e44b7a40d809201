"""The fieldnode command end to end, as a technician runs it (a real subprocess each time)."""

import json
import subprocess
import sys

from tests.conftest import EXPECTED_BACKEND, ROOT


def fieldnode(*args, timeout=180):
    cmd = [sys.executable, "-m", "tools.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def backend_args():
    return ["--backend", EXPECTED_BACKEND] if EXPECTED_BACKEND != "auto" else []


def test_bench_json_is_one_object_with_every_figure(vibration):
    r = fieldnode("bench", vibration.root, "--variant", "lite", "--runs", "30", "--warmup", "3",
                  "--threads", "1", "--json", *backend_args())
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # exactly one JSON document on stdout, progress goes to stderr
    for key in ("backend", "delegate", "isolation", "threads", "init_ms", "first_ms", "p50_ms", "p95_ms",
                "p99_ms", "rss_mb", "raw_p50_ms", "overhead_ratio"):
        assert key in report, key
    assert report["isolation"] == "process" and report["threads"] == 1 and report["variant"] == "lite"
    assert report["identical"] is True
    assert 0 < report["raw_p50_ms"] and 0 < report["p50_ms"] <= report["p99_ms"]
    assert report["overhead_ratio"] == round(report["p50_ms"] / report["raw_p50_ms"], 4)
    assert report["rss_mb"] > 0
    if EXPECTED_BACKEND != "auto":
        assert report["backend"] == EXPECTED_BACKEND


def test_bench_refuses_a_malformed_model_with_its_name(tmp_path):
    bad = tmp_path / "broken.tflite"
    bad.write_bytes(b"\x00" * 100)
    r = fieldnode("bench", str(bad), "--json", *backend_args())
    assert r.returncode == 1
    assert "model_invalid" in r.stderr and "broken.tflite" in r.stderr and "not a TFLite model" in r.stderr
    error = json.loads(r.stdout)  # --json: the error as one JSON object too
    assert error["ok"] is False and error["error"]["code"] == "model_invalid"
    assert "broken.tflite" in error["error"]["message"]


def test_selftest_passes_every_shipped_variant():
    r = fieldnode("selftest", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is True and {v["variant"] for v in report["variants"]} == {"full", "lite"}
    assert all(v["top_class_match"] and v["max_diff_steps"] <= 2 for v in report["variants"])
    if report["backend"] == "litert":  # XNNPACK reproduces the model maker's outputs exactly
        assert all(v["max_diff_steps"] == 0 for v in report["variants"])


def test_selftest_fails_when_outputs_do_not_match(tmp_path, vibration):
    # Swap the two variants' files: each now disagrees with its own expected outputs.
    import json
    import shutil

    for name in ("vibration_full.tflite", "vibration_lite.tflite", "vibration_testvectors.npz"):
        shutil.copyfile(f"{vibration.root}/{name}", tmp_path / name)
    manifest = json.load(open(f"{vibration.root}/model.json"))
    manifest["variants"]["full"]["file"], manifest["variants"]["lite"]["file"] = (
        "vibration_lite.tflite", "vibration_full.tflite")
    (tmp_path / "model.json").write_text(json.dumps(manifest))
    r = fieldnode("selftest", "--model", str(tmp_path), "--json")
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["ok"] is False and all(not v["ok"] and v["max_diff_steps"] > 2 for v in report["variants"])


def test_demo_runs_the_loop_on_the_virtual_board(tmp_path):
    """Sensor on a pty -> windows -> worker -> results, with the governor steering the runtime: on battery its
    planner hot-swaps to the cheap variant (the most weighted windows per joule) while inference goes on, and
    the battery crosses the balanced threshold."""
    cfg = tmp_path / "fieldnode.toml"
    cfg.write_text(f'[runtime]\nbackend = "{EXPECTED_BACKEND}"\n')
    r = fieldnode("demo", "--config", str(cfg), "--seconds", "4", "--speed", "120", "--battery", "50.6")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    ticks = [ln for ln in lines if ln.startswith("t=")]
    assert len(ticks) >= 3
    assert "level=balanced" in ticks[-1]
    assert any("variant=lite" in t for t in ticks)  # the planner's choice; a tick may catch it measuring another
    assert any(ln.startswith("event governor_level: from=performance, to=balanced, reason=battery") for ln in lines)
    assert any(ln.startswith("event variant_changed: from=full, to=lite") for ln in lines)
    done = lines[-1]
    assert done.startswith("done: ") and " 0 failures" in done and "crc errors 0, gaps 0" in done
    assert int(done.split()[1]) >= 8  # results: one per 256-sample window from the serial sensor


def test_config_error_exits_2_naming_the_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[runtime]\nisolation = \"container\"\n")
    r = fieldnode("demo", "--config", str(cfg), "--seconds", "1")
    assert r.returncode == 2
    assert "runtime.isolation" in r.stderr and "container" in r.stderr


def test_bench_paced_reports_its_pace_and_refuses_a_bad_one(vibration):
    r = fieldnode("bench", vibration.root, "--variant", "lite", "--runs", "20", "--warmup", "2",
                  "--pace-ms", "2", "--json", *backend_args())
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["pace_ms"] == 2.0 and report["identical"] is True and report["p50_ms"] > 0
    for bad in ("-1", "inf", "nan", "soon"):
        r = fieldnode("bench", vibration.root, "--pace-ms", bad, "--json")
        assert r.returncode == 2 and r.stdout == "", bad
        assert "--pace-ms" in r.stderr and bad in r.stderr, r.stderr


def test_bench_stages_say_where_the_time_goes(vibration):
    r = fieldnode("bench", vibration.root, "--variant", "lite", "--runs", "20", "--warmup", "2", "--stages",
                  "--json", *backend_args())
    assert r.returncode == 0, r.stderr
    stages = json.loads(r.stdout)["stages_us"]
    assert list(stages) == ["agent_in", "to_worker", "worker_in", "invoke", "worker_out", "to_agent", "agent_out"]
    assert stages["invoke"] > 0 and all(v >= 0 for v in stages.values())
    r = fieldnode("bench", vibration.root, "--runs", "5", "--stages", "--isolation", "inline", "--json",
                  *backend_args())
    assert r.returncode == 0 and "stages_us" not in json.loads(r.stdout)  # no second process, no stages


def test_bench_and_selftest_refuse_an_explicit_edgetpu_they_cannot_use_in_one_line(tpu_model, tmp_path):
    r = fieldnode("bench", tpu_model.root, "--delegate", "edgetpu", "--runs", "5", "--json", *backend_args())
    assert r.returncode == 1
    (line,) = r.stderr.splitlines()  # the reason, without -v, and nothing else
    assert line.startswith("fieldnode bench: error [delegate_unavailable]: ") and "libedgetpu.so.1" in line
    error = json.loads(r.stdout)
    assert error == {"ok": False, "error": {"code": "delegate_unavailable", "message": error["error"]["message"]}}
    assert "libedgetpu.so.1" in error["error"]["message"]
    r = fieldnode("bench", tpu_model.root, "--delegate", "edgetpu", "--runs", "5", *backend_args())
    assert r.returncode == 1 and r.stdout == "" and "[delegate_unavailable]" in r.stderr

    cfg = tmp_path / "edgetpu.toml"
    cfg.write_text('[runtime]\ndelegate = "edgetpu"\n')
    for json_flag in ((), ("--json",)):
        r = fieldnode("selftest", "--config", str(cfg), "--model", tpu_model.root, *json_flag)
        assert r.returncode == 1
        (line,) = r.stderr.splitlines()
        assert line.startswith("fieldnode selftest: error [delegate_unavailable]: ") and "libedgetpu.so.1" in line
        if json_flag:
            assert json.loads(r.stdout)["error"]["code"] == "delegate_unavailable"
        else:
            assert r.stdout == ""


def test_bench_with_delegate_fallback_runs_on_the_cpu_and_says_why(tpu_model):
    from tools.bench import run_bench

    report = run_bench(tpu_model.root, delegate="edgetpu", delegate_fallback=True, runs=5, warmup=0, threads=1,
                       backend=EXPECTED_BACKEND, raw=False)
    assert report["variant"] == "full" and report["delegate"] in ("xnnpack", "cpu")
    assert any("libedgetpu.so.1" in r for r in report["delegate_fallbacks"])


def test_selftest_reports_a_crashing_variant_and_still_checks_the_others(tmp_path, vibration):
    import shutil

    from tests.runtime.crashmodel import make_crashing_model

    for name in ("vibration_lite.tflite", "vibration_testvectors.npz", "model.json"):
        shutil.copyfile(f"{vibration.root}/{name}", tmp_path / name)
    (tmp_path / "vibration_full.tflite").write_bytes(
        make_crashing_model(open(f"{vibration.root}/vibration_full.tflite", "rb").read()))
    r = fieldnode("selftest", "--model", str(tmp_path), "--json")
    assert r.returncode == 1, r.stderr
    full, lite = json.loads(r.stdout)["variants"]
    assert full["ok"] is False and full["error"].startswith("[worker_crashed]") and "SIGSEGV" in full["error"]
    assert lite["ok"] is True and lite["top_class_match"]
