"""The one validation path: rules across keys run by config.load/loads/from_mapping, and `fieldnode config check`.

Every rule `fieldnode run` applies to the config (the broker URL, its TLS and password files, the topic prefix,
the order of the backoff delays and of the power thresholds) must be refused by the loader itself, so
`config check` and every tool see the same verdict, and each error names the config key at fault.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from device import config
from tools.cli import main
from device.errors import ConfigError
from power.config import PowerConfig
from power.policy import Policy

PEM_CERT = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
PEM_ENCRYPTED_KEY = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIF\n-----END ENCRYPTED PRIVATE KEY-----\n"


@pytest.fixture
def pem(tmp_path):
    """Readable TLS files: the loader checks they fit the URL and can be read, not that they parse."""
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "board.pem", "key": tmp_path / "board.key",
             "enc": tmp_path / "enc.key", "pw": tmp_path / "password"}
    files["ca"].write_text(PEM_CERT)
    files["cert"].write_text(PEM_CERT)
    files["key"].write_text(PEM_KEY)
    files["enc"].write_text(PEM_ENCRYPTED_KEY)
    files["pw"].write_text("s3cret\n")
    return {k: str(v) for k, v in files.items()}


SENSOR = '[drivers]\nsensor_url = "/dev/ttyAMA0"\n'


def refused_before_run(toml: str) -> ConfigError:
    """Loads (every tool may), but what `run` and `config check` ask refuses it."""
    cfg = config.loads(SENSOR + toml, source="site.toml")
    with pytest.raises(ConfigError) as info:
        config.check_agent(cfg)
    assert str(info.value).startswith(f"site.toml: {info.value.key_path}: ")
    return info.value


def refused(toml: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config.loads(toml, source="site.toml")
    assert info.value.source == "site.toml"
    assert str(info.value).startswith(f"site.toml: {info.value.key_path}: ")
    return info.value


# ------------------------------------------------------------------------------------------- [link]


@pytest.mark.parametrize("toml, key, words", [
    ('broker = "http://broker.lan"', "link.broker", "scheme 'http'"),
    ('broker = "mqtt://"', "link.broker", "empty host"),
    ('broker = "mqtt://broker.lan:99999"', "link.broker", "port 99999"),
    ('broker = "mqtt://ops:pw@broker.lan"', "link.broker", "credentials"),
    ('prefix = "a/#"', "link.prefix", "'a/#'"),
    ('prefix = "site/+/x"', "link.prefix", "'site/+/x'"),
    ('prefix = "/lead"', "link.prefix", "'/lead'"),
    ('prefix = "a//b"', "link.prefix", "'a//b'"),
    ('prefix = "trail/"', "link.prefix", "'trail/'"),
    ("backoff_min_s = 10\nbackoff_max_s = 5", "link.backoff_min_s", "link.backoff_max_s (5), got 10"),
    ('broker = "mqtts://broker.lan"', "link.ca_file", "no CA file"),
], ids=["http", "no-host", "port", "credentials", "prefix-hash", "prefix-plus", "prefix-lead", "prefix-empty-level",
        "prefix-trail", "backoff-order", "mqtts-no-ca"])
def test_link_rules_are_config_errors_naming_the_key(toml, key, words):
    err = refused("[link]\n" + toml + "\n")
    assert err.key_path == key
    assert words in str(err)
    assert ":pw@" not in str(err)


def test_a_bad_prefix_is_reported_under_prefix_even_with_a_broker():
    err = refused('[link]\nbroker = "mqtt://broker.lan"\nprefix = "a/#"\n')
    assert err.key_path == "link.prefix"


@pytest.mark.parametrize("files, key, words, at_load", [
    ({"ca": "missing"}, "link.ca_file", "cannot read it", False),
    ({"ca": "dir"}, "link.ca_file", "cannot read it", False),
    ({"ca": "ca", "cert": "cert"}, "link.key_file", "client certificate", True),
    ({"ca": "ca", "key": "key"}, "link.cert_file", "client key", True),
    ({"ca": "ca", "cert": "missing", "key": "key"}, "link.cert_file", "cannot read it", False),
    ({"ca": "ca", "cert": "cert", "key": "missing"}, "link.key_file", "cannot read it", False),
    ({"ca": "ca", "cert": "cert", "key": "enc"}, "link.key_file", "encrypted", False),
], ids=["ca-missing", "ca-directory", "cert-without-key", "key-without-cert", "cert-missing", "key-missing",
        "key-encrypted"])
def test_tls_files_are_checked_naming_their_key(pem, tmp_path, files, key, words, at_load):
    """Rules between the URL and the files given refuse the config at load; whether a file can be read is asked
    by `run` and `config check` only (a technician's `fieldnode version` must not need the agent's key)."""
    paths = {**pem, "missing": str(tmp_path / "absent.pem"), "dir": str(tmp_path)}
    keys = {"ca": "ca_file", "cert": "cert_file", "key": "key_file"}
    lines = ['broker = "mqtts://broker.lan"'] + [f'{keys[role]} = "{paths[which]}"' for role, which in files.items()]
    toml = "[link]\n" + "\n".join(lines) + "\n"
    err = refused(toml) if at_load else refused_before_run(toml)
    assert err.key_path == key
    assert words in str(err)


def test_tools_other_than_run_load_a_config_whose_files_they_cannot_read(tmp_path, capsys):
    path = write(tmp_path, SENSOR + f'[link]\nbroker = "mqtts://broker.lan"\nca_file = "{tmp_path / "absent.pem"}"\n')
    assert main(["version", "--config", path, "--json"]) == 0
    capsys.readouterr()
    assert main(["config", "check", "--json", "--config", path]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["key"] == "link.ca_file"


def test_tls_files_for_a_plain_broker_are_refused_under_broker(pem):
    err = refused(f'[link]\nbroker = "mqtt://broker.lan"\nca_file = "{pem["ca"]}"\n')
    assert err.key_path == "link.broker" and "mqtts://" in str(err)


def test_messages_speak_of_config_keys_not_of_another_tools_flags(pem, tmp_path):
    # Each of these used to say "--ca", "--cert" or "--key" (fieldnode send's flags) to a config author.
    for toml in ('broker = "mqtts://broker.lan"',
                 f'broker = "mqtts://broker.lan"\nca_file = "{pem["ca"]}"\ncert_file = "{pem["cert"]}"',
                 f'broker = "mqtts://broker.lan"\nca_file = "{pem["ca"]}"\nkey_file = "{pem["key"]}"'):
        err = refused("[link]\n" + toml + "\n")
        assert "--" not in str(err), str(err)


def test_password_file_must_be_readable(pem, tmp_path):
    err = refused_before_run(f'[link]\nbroker = "mqtt://broker.lan"\npassword_file = "{tmp_path / "nope"}"\n')
    assert err.key_path == "link.password_file" and "cannot read it" in str(err)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes to it: the check must not hang on it
    err = refused_before_run(f'[link]\nbroker = "mqtt://broker.lan"\npassword_file = "{fifo}"\n')
    assert err.key_path == "link.password_file" and "not a regular file" in str(err)


def test_a_valid_link_section_loads(pem):
    cfg = config.loads(f'[link]\nbroker = "mqtts://broker.lan"\nca_file = "{pem["ca"]}"\n'
                       f'cert_file = "{pem["cert"]}"\nkey_file = "{pem["key"]}"\npassword_file = "{pem["pw"]}"\n'
                       f'prefix = "plant-3/fieldnode/pump-07"\nbackoff_min_s = 2\nbackoff_max_s = 2\n')
    assert cfg.link.prefix == "plant-3/fieldnode/pump-07"


def test_files_are_only_checked_when_there_is_a_broker(tmp_path):
    # No broker, no link: a leftover file setting does not stop `fieldnode demo` on a bench.
    cfg = config.loads(f'[link]\nca_file = "{tmp_path / "absent.pem"}"\npassword_file = "{tmp_path / "x"}"\n')
    assert cfg.link.broker == ""


def test_rules_run_for_every_way_in(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text('[link]\nbroker = "mqtts://broker.lan"\n')
    with pytest.raises(ConfigError) as info:
        config.load(str(path), environ={})
    assert (info.value.key_path, info.value.source) == ("link.ca_file", str(path))
    with pytest.raises(ConfigError) as info:
        config.from_mapping({"link": {"prefix": "a//b"}})
    assert info.value.key_path == "link.prefix"
    with pytest.raises(ConfigError) as info:
        config.Config().with_overrides({"link.backoff_min_s": 100})
    assert info.value.key_path == "link.backoff_min_s"


# ------------------------------------------------------------------------------------------ [power]


@pytest.mark.parametrize("toml, key", [
    ("[power.saver]\nenter_battery_pct = 60\n", "power.saver.enter_battery_pct"),
    ("[power.critical]\nenter_battery_pct = 25\n", "power.critical.enter_battery_pct"),
    ("[power.saver]\nenter_temp_c = 70\n", "power.saver.enter_temp_c"),
    ("[power.critical]\nenter_temp_c = 80\n", "power.critical.enter_temp_c"),
    ("[power]\nthermal_target_c = 80\n", "power.thermal_target_c"),
])
def test_power_threshold_order_is_checked_by_the_loader(toml, key):
    err = refused(toml)
    assert err.key_path == key
    assert "must be" in str(err)


def test_policy_from_config_applies_the_same_rules_to_a_power_config_built_in_code():
    pc = PowerConfig()
    bad = dataclasses.replace(pc, saver=dataclasses.replace(pc.saver, enter_battery_pct=60.0))
    assert bad.validate()[0][0] == "power.saver.enter_battery_pct"
    with pytest.raises(ConfigError) as info:
        Policy.from_config(bad)
    assert info.value.key_path == "power.saver.enter_battery_pct"
    assert str(info.value) == ("power.saver.enter_battery_pct: must be below power.balanced.enter_battery_pct (50), "
                               "got 60")


def test_defaults_pass_every_rule():
    assert config.cross_check(config.Config()) == []


# ---------------------------------------------------------------------------------- fieldnode config


def write(tmp_path, text: str) -> str:
    path = tmp_path / "fieldnode.toml"
    path.write_text(text)
    return str(path)


def test_config_check_refuses_what_run_refuses(tmp_path, capsys):
    path = write(tmp_path, "[power.saver]\nenter_battery_pct = 60\n")
    assert main(["config", "check", "--config", path]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (f"fieldnode config: error [config_invalid]: {path}: power.saver.enter_battery_pct: must be below "
                   f"power.balanced.enter_battery_pct (50), got 60\n")


def test_config_check_ok(tmp_path, capsys):
    path = write(tmp_path, '[runtime]\nthreads = 3\n[drivers]\nsensor_url = "/dev/ttyAMA0"\n')
    assert main(["config", "check", "--config", path]) == 0
    assert capsys.readouterr().out == f"{path}: ok\n"
    assert main(["config", "check", "--json", "--config", path]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "source": path}


def test_config_check_refuses_what_run_refuses_a_board_without_a_sensor(tmp_path, capsys):
    path = write(tmp_path, "[runtime]\nthreads = 3\n")  # loads for every tool, but the agent cannot start
    assert main(["config", "check", "--json", "--config", path]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert err["key"] == "drivers.sensor_url" and "--sim" in err["message"]
    sim = write(tmp_path, '[drivers]\nvirtual_board = "rpi4"\n')
    assert main(["config", "check", "--config", sim]) == 0  # simulation asked for is a valid board config


@pytest.mark.parametrize("toml, key, message", [
    ('[link]\nbroker = "mqtts://broker.lan"\n', "link.ca_file", "mqtts://broker.lan:8883 uses TLS but no CA file"),
    ("[runtime]\nthreads = 0\n", "runtime.threads", "expected an integer from 1 to 64, got 0"),
    ("[runtime\n", "", "invalid TOML"),
])
def test_config_check_json_error_object(tmp_path, capsys, toml, key, message):
    path = write(tmp_path, toml)
    assert main(["config", "check", "--json", "--config", path]) == 2
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert out.count("\n") == 1  # one object on one line; people get the usual line on stderr
    assert err.startswith("fieldnode config: error [config_invalid]: ") and err.count("\n") == 1
    assert doc["ok"] is False and set(doc["error"]) == {"code", "key", "message", "source"}
    assert doc["error"]["code"] == "config_invalid"
    assert doc["error"]["key"] == key and doc["error"]["source"] == path
    assert doc["error"]["message"].startswith(message)
    assert path not in doc["error"]["message"]


def test_config_check_json_missing_file(tmp_path, capsys):
    path = str(tmp_path / "absent.toml")
    assert main(["config", "check", "--json", "--config", path]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"ok": False, "error": {"code": "config_invalid", "key": "", "source": path,
                                          "message": "config file not found (given with --config)"}}


def test_config_show_json_error_and_keys_refuse_json(tmp_path, capsys):
    path = write(tmp_path, '[link]\nprefix = "a/#"\n')
    assert main(["config", "show", "--json", "--config", path]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["key"] == "link.prefix"
    assert main(["config", "keys", "--json"]) == 2
    assert "--json applies to check and show" in capsys.readouterr().err


def test_config_check_json_through_the_console_script(tmp_path):
    # The installed entry point, in its own process, from a neutral directory.
    script = Path(sys.executable).with_name("fieldnode")
    assert script.exists(), f"no console script next to {sys.executable}; install the package (make venv)"
    path = write(tmp_path, '[link]\nbroker = "mqtt://broker.lan"\nbackoff_min_s = 9\nbackoff_max_s = 3\n')
    env = {k: v for k, v in os.environ.items() if k != "FIELDNODE_CONFIG"}
    proc = subprocess.run([str(script), "config", "check", "--json", "--config", path], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and doc["error"]["key"] == "link.backoff_min_s"
    proc = subprocess.run([str(script), "config", "check", "--config", path], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"fieldnode config: error [config_invalid]: {path}: link.backoff_min_s: ")
    assert "Traceback" not in proc.stderr
