"""``fieldnode diag`` as a whole: the runner (order, budget, a check that raises or hangs), the exit code, the
``--json`` shape, a whole simulated run through the command line, a config that does not load, and the
``--report`` support bundle (its members, and that a password never appears in it)."""

from __future__ import annotations

import argparse
import json
import pathlib
import tarfile
import threading

import pytest

from device.diag import runner
from tools.diag import cli as diag
from tools.diag import report
from device.diag.checks import FAIL, OK, SKIP, WARN, Check, Spec
from device.errors import Exit

pytestmark = pytest.mark.timeout(60)
PASSWORD = "hunter2-Sup3r-s3cret"


def parse(argv):
    from device.cliargs import subcommand_parents

    p = argparse.ArgumentParser(prog="fieldnode diag", parents=subcommand_parents())
    diag.add_arguments(p)
    return p.parse_args(argv)


def write_config(tmp_path: pathlib.Path, extra: str = "") -> str:
    path = tmp_path / "fieldnode.toml"
    path.write_text(f'[device]\nid = "dev-a"\nstate_dir = "{tmp_path / "state"}"\n'
                    f'runtime_dir = "{tmp_path / "run"}"\n\n[link]\ntrust_dir = "{tmp_path / "trust"}"\n{extra}')
    return str(path)


def test_exit_code_is_the_worst_status():
    assert runner.exit_code([]) == 0
    assert runner.exit_code([Check("a", OK, ""), Check("b", SKIP, "")]) == 0
    assert runner.exit_code([Check("a", OK, ""), Check("b", WARN, "x", "fix")]) == Exit.WARN == 5
    assert runner.exit_code([Check("a", FAIL, "x", "fix"), Check("b", WARN, "x", "fix")]) == Exit.FAULTS == 6
    with pytest.raises(ValueError, match="needs a remedy"):
        Check("a", WARN, "no remedy")


def test_a_check_that_raises_or_hangs_is_a_fail_not_a_crash(tmp_path, monkeypatch):
    from device import config

    release = threading.Event()

    def boom(ctx):
        raise RuntimeError("the sensor driver blew up")

    def hang(ctx):
        release.wait(30)
        return Check("hang", OK, "late")

    runner.load_checks()
    monkeypatch.setattr(runner, "CHECKS", {"boom": Spec("boom", boom), "hang": Spec("hang", hang),
                                         "fine": Spec("fine", lambda ctx: Check("fine", OK, "all good"))})
    seen = []
    try:
        checks = runner.run_checks(config.Config(), budget_s=0.5, on_check=seen.append)
    finally:
        release.set()
    assert [c.name for c in checks] == ["boom", "hang", "fine"] == [c.name for c in seen]
    boom_c, hang_c, fine_c = checks
    assert boom_c.status == FAIL and "RuntimeError: the sensor driver blew up" in boom_c.detail and boom_c.remedy
    assert hang_c.status == FAIL and "did not finish within 0.5 s" in hang_c.detail  # the budget, by construction
    assert fine_c.status == OK
    assert runner.exit_code(checks) == Exit.FAULTS


@pytest.fixture
def roomy_budget(monkeypatch):
    """A budget no loaded CI core can overrun: these tests check the verdicts, not the 10 s bound (the runner's
    own tests do that by outcome)."""
    import functools

    monkeypatch.setattr(diag, "run_checks", functools.partial(runner.run_checks, budget_s=120.0))


def sensor_ok_or_slow(check) -> bool:
    """The simulated sensor's verdict: OK, or a WARN only for its rate (the pty MCU runs in real time, and a loaded
    machine may deliver under 80 % of it), never for CRC errors or gaps."""
    return check["status"] == OK or (check["status"] == WARN and " 0 CRC errors, 0 gaps" in check["detail"])


def test_whole_simulated_run_json(tmp_path, capsys, roomy_budget):
    (tmp_path / "state").mkdir()
    code = diag.run(parse(["--config", write_config(tmp_path), "--sim", "rpi4", "--json"]))
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"checks", "summary", "exit", "simulated"}
    assert out["simulated"] is True and out["exit"] == code
    assert [c["name"] for c in out["checks"]] == list(runner.ORDER)
    for c in out["checks"]:
        assert set(c) == {"name", "status", "detail", "remedy"}
        assert c["status"] in (OK, WARN, FAIL, SKIP)
        assert bool(c["remedy"]) == (c["status"] in (WARN, FAIL)), c
        assert "the check itself failed" not in c["detail"], c
    by = {c["name"]: c for c in out["checks"]}
    for name in ("thermal", "throttle", "cpufreq", "gpio", "accelerators"):
        assert by[name]["status"] == OK and "SIMULATED" in by[name]["detail"], by[name]
    assert sensor_ok_or_slow(by["sensor"]) and "SIMULATED" in by["sensor"]["detail"], by["sensor"]
    assert by["models"]["status"] == OK and "test vectors pass" in by["models"]["detail"]
    assert "recorded as this board's baseline" in by["models"]["detail"]
    assert by["agent"]["status"] == SKIP  # nobody runs on the test's state directory
    assert sum(out["summary"].values()) == len(runner.ORDER)
    assert code == runner.EXIT[max((c["status"] for c in out["checks"]), key=lambda s: runner.EXIT[s])]
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["diag-baseline.json"]  # nothing else


def test_human_output_labels_simulation_and_indents_remedies(tmp_path, capsys, roomy_budget):
    """A config that asks for a virtual board (drivers.virtual_board) is diagnosed as simulated, without --sim."""
    config_path = write_config(tmp_path, '\n[drivers]\nled_pin = 17\nvirtual_board = "rpi5"\n')
    code = diag.run(parse(["--config", config_path]))
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith("fieldnode ") and "SIMULATED board rpi5" in lines[0]
    assert lines[-1].startswith("SIMULATED board: ") and lines[-1].endswith(f"exit {code}")
    assert any(ln.startswith("OK   gpio: SIMULATED board rpi5: backend sim") and "LED on line 17 flashed" in ln
               for ln in lines)
    assert any(ln.startswith(("OK   sensor: SIMULATED sensor MCU on a pty", "WARN sensor: SIMULATED sensor MCU on a pty"))
               and " 0 CRC errors, 0 gaps" in ln for ln in lines)
    for i, ln in enumerate(lines):
        if ln.startswith(("WARN ", "FAIL ")):
            assert lines[i + 1].startswith("     remedy: ")


def test_config_that_does_not_load_fails_once_and_names_what_did_not_run(tmp_path, capsys):
    path = write_config(tmp_path, "\n[runtime]\nthreads = 0\n")
    code = diag.run(parse(["--config", path, "--json"]))
    out = json.loads(capsys.readouterr().out)
    assert code == Exit.FAULTS == out["exit"]
    by = {c["name"]: c for c in out["checks"]}
    assert by["config"]["status"] == FAIL
    assert by["config"]["detail"].startswith(f"{path}: runtime.threads: expected an integer from 1 to 64, got 0 "
                                             f"(so these checks did not run: identity, keys, ")
    assert "runtime.threads" in by["config"]["remedy"]
    assert [c for c in out["checks"] if c["status"] == FAIL] == [by["config"]]  # one FAIL, no SKIP per check
    for name in ("keys", "broker", "models", "sensor", "spool"):
        assert name not in by and name in by["config"]["detail"]
    assert by["agent"]["status"] == WARN and str(tmp_path / "run") in by["agent"]["detail"]  # asked, on its socket
    assert "config did not load" not in json.dumps(out)


def test_empty_state_directory_gives_verdicts_not_tracebacks(tmp_path, capsys):
    (tmp_path / "state").mkdir()
    path = write_config(tmp_path, f'broker = "mqtt://127.0.0.1:1"\n\n[drivers]\nsensor_url = "{tmp_path / "tty"}"\n')
    code = diag.run(parse(["--config", path, "--json"]))
    out = json.loads(capsys.readouterr().out)
    by = {c["name"]: c for c in out["checks"]}
    assert code == Exit.FAULTS
    assert by["broker"]["status"] == FAIL and by["sensor"]["status"] == FAIL
    assert by["spool"]["status"] == SKIP and by["update_store"]["status"] == SKIP
    assert all("the check itself failed" not in c["detail"] for c in out["checks"])


def test_report_bundle_members_and_no_password(tmp_path, capsys):
    pw = tmp_path / "password"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    path = write_config(tmp_path, f'broker = "mqtt://127.0.0.1:1"\nusername = "dev-a"\npassword_file = "{pw}"\n'
                                  f'# a stray secret_token = "{PASSWORD}"\n\n[drivers]\nsensor_url = "loop://"\n')
    bundle = tmp_path / "out" / "bundle.tar.gz"
    bundle.parent.mkdir()
    code = diag.run(parse(["--config", path, "--json", "--report", str(bundle)]))
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["exit"] == code and "support bundle written" in captured.err
    with tarfile.open(bundle) as tar:
        names = {m.name.split("/", 1)[1] for m in tar.getmembers()}
        assert names == {"diag.json", "diag.txt", "config.json", "config.toml", "status.json", "versions.json",
                         "throttle.json", "journal.txt"}
        bodies = {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode() for m in tar.getmembers()}
    assert all(PASSWORD not in body for body in bodies.values())
    assert json.loads(bodies["diag.json"]) == out
    effective = json.loads(bodies["config.json"])
    assert effective["link"]["password_file"] == report.REDACTED and effective["link"]["username"] == "dev-a"
    assert 'password_file = "<redacted>"' in bodies["config.toml"]
    versions = json.loads(bodies["versions.json"])
    assert {"fieldnode", "python", "backend", "os_release", "kernel"} <= set(versions)
    assert json.loads(bodies["status.json"])["available"] is False
    assert bodies["journal.txt"].startswith("# journalctl -u fieldnode -n 1000 --no-pager")
    assert "available" in json.loads(bodies["throttle.json"])
    assert oct(bundle.stat().st_mode & 0o777) == "0o600"
    assert not [p for p in bundle.parent.iterdir() if p.name != "bundle.tar.gz"]  # no temporary left behind


def test_report_into_a_missing_directory_is_refused_before_checking(tmp_path):
    with pytest.raises(diag.ReportError, match="does not exist"):
        diag.run(parse(["--config", write_config(tmp_path), "--report", str(tmp_path / "no" / "x.tar.gz")]))


def test_redaction():
    assert report.redact({"a": {"api_token": "t", "password_file": "", "key_file": "/k"}, "secret": [1]}) == \
        {"a": {"api_token": report.REDACTED, "password_file": "", "key_file": "/k"}, "secret": report.REDACTED}
    assert report.redact_toml('password_file = "/p"\n  "my.token" = \'x\'\nkey_file = "/k"\n') == \
        'password_file = "<redacted>"\n  "my.token" = "<redacted>"\nkey_file = "/k"\n'
    # a multi-line secret: its later lines would escape a line-wise redaction, so the file is left out whole
    text = report.redact_toml('x = 1\nsecret = """first\nhunter2\n"""\n')
    assert "hunter2" not in text and "first" not in text and text.startswith("# left out")


def test_the_agent_diagnosing_itself_reads_what_it_holds_from_its_status(tmp_path):
    """The MQTT diag command: the agent's sensor port is never opened a second time."""
    from device import config

    cfg = config.load(write_config(tmp_path, '\n[drivers]\nsensor_url = "/dev/ttyAMA0"\n'))
    status = {"pid": 4242, "device": "dev-a", "faults": {},
              "sensor": {"state": "ok", "frames": 900, "crc_errors": 0, "seq_gaps": 0, "reconnects": 0}}
    out = runner.diagnose(cfg, agent_status=status)
    by = {c["name"]: c for c in out["checks"]}
    assert out["simulated"] is False and set(out) == {"checks", "summary", "exit", "simulated"}
    assert by["sensor"]["status"] == OK and "held by the agent" in by["sensor"]["detail"]
    assert by["agent"]["status"] == OK and "pid 4242" in by["agent"]["detail"]
