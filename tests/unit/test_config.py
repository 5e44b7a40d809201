"""Tests of device.config: path resolution, loading, schema validation, overrides and describe()."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from device import config
from device.config import Config, ConfigError
from device.errors import FieldnodeError

# ------------------------------------------------------------------------------------ path resolution


def test_default_path_missing_gives_all_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.toml"))
    cfg = config.load(environ={})
    assert cfg == Config()
    assert cfg.source == "<defaults>"
    assert cfg.runtime.threads == 2
    assert cfg.runtime.delegate == "auto"
    assert cfg.device.state_dir == "/var/lib/fieldnode"


def test_default_path_is_used_when_present(monkeypatch, tmp_path):
    default = tmp_path / "fieldnode.toml"
    default.write_text("[runtime]\nthreads = 3\n")
    monkeypatch.setattr(config, "DEFAULT_PATH", str(default))
    cfg = config.load(environ={})
    assert cfg.runtime.threads == 3
    assert cfg.source == str(default)


def test_resolve_path_default():
    assert config.resolve_path(None, {}) == (config.DEFAULT_PATH, False)
    assert config.DEFAULT_PATH == "/etc/fieldnode/fieldnode.toml"


def test_resolve_path_env_and_explicit_precedence():
    env = {"FIELDNODE_CONFIG": "/from/env.toml"}
    assert config.resolve_path(None, env) == ("/from/env.toml", True)
    assert config.resolve_path("/explicit.toml", env) == ("/explicit.toml", True)
    assert config.resolve_path(None, {"FIELDNODE_CONFIG": ""}) == (config.DEFAULT_PATH, False)


def test_explicit_missing_path_errors_naming_path(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        config.load(str(missing), environ={})
    assert info.value.source == str(missing)
    assert str(missing) in str(info.value)
    assert "not found" in str(info.value)


def test_env_missing_path_errors_naming_path(tmp_path):
    missing = tmp_path / "env-nope.toml"
    with pytest.raises(ConfigError) as info:
        config.load(environ={"FIELDNODE_CONFIG": str(missing)})
    assert info.value.source == str(missing)
    assert str(missing) in str(info.value)
    assert "FIELDNODE_CONFIG" in str(info.value)


def test_env_var_used_over_default(tmp_path):
    env_file = tmp_path / "env.toml"
    env_file.write_text("[runtime]\nthreads = 5\n")
    cfg = config.load(environ={"FIELDNODE_CONFIG": str(env_file)})
    assert cfg.runtime.threads == 5
    assert cfg.source == str(env_file)


def test_explicit_path_beats_env_var(tmp_path):
    env_file = tmp_path / "env.toml"
    env_file.write_text("[runtime]\nthreads = 5\n")
    cli_file = tmp_path / "cli.toml"
    cli_file.write_text("[runtime]\nthreads = 7\n")
    cfg = config.load(str(cli_file), environ={"FIELDNODE_CONFIG": str(env_file)})
    assert cfg.runtime.threads == 7
    assert cfg.source == str(cli_file)


def test_invalid_toml_names_source(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[runtime\nthreads = 2\n")
    with pytest.raises(ConfigError) as info:
        config.load(str(bad), environ={})
    assert info.value.source == str(bad)
    assert str(bad) in str(info.value)
    assert "invalid TOML" in str(info.value)
    assert "line 1" in str(info.value)  # the parser's own message is kept


def test_non_utf8_file_is_config_error(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[device]\nid = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        config.load(str(bad), environ={})
    assert info.value.source == str(bad)
    assert "UTF-8" in str(info.value)


def test_directory_as_config_is_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(str(tmp_path), environ={})
    assert info.value.source == str(tmp_path)
    assert "cannot read" in str(info.value)


def test_config_error_is_a_fieldnode_error():
    with pytest.raises(FieldnodeError) as info:
        config.loads("[runtime]\nthreads = 0\n")
    assert info.value.code == "config_invalid"


# ------------------------------------------------------------------------------------ unknown keys


def test_unknown_section():
    with pytest.raises(ConfigError) as info:
        config.loads("[runtim]\nthreads = 1\n", source="t.toml")
    assert info.value.key_path == "runtim"
    assert info.value.source == "t.toml"
    assert "unknown section" in str(info.value)
    assert "did you mean 'runtime'" in str(info.value)


def test_unknown_key_with_suggestion():
    with pytest.raises(ConfigError) as info:
        config.loads("[runtime]\nthread = 1\n")
    err = info.value
    assert err.key_path == "runtime.thread"
    assert "unknown key" in str(err)
    assert "did you mean 'runtime.threads'" in str(err)
    assert "backend, deadline_ms, delegate" in str(err)


def test_unknown_key_without_close_match_lists_known_keys():
    with pytest.raises(ConfigError) as info:
        config.loads("[demo]\nzzzz = 1\n")
    assert info.value.key_path == "demo.zzzz"
    assert "did you mean" not in str(info.value)
    assert "(known keys in [demo]: seconds)" in str(info.value)


def test_section_given_as_scalar():
    with pytest.raises(ConfigError) as info:
        config.loads("runtime = 3\n")
    assert info.value.key_path == "runtime"
    assert "expected a table, got 3 (integer)" in str(info.value)


# ------------------------------------------------------------------------------------ type errors


@pytest.mark.parametrize(
    "toml, key_path, got",
    [
        ("[runtime]\nthreads = true", "runtime.threads", "got true (boolean)"),
        ("[runtime]\nthreads = '4'", "runtime.threads", "got '4' (string)"),
        ("[runtime]\nthreads = 4.0", "runtime.threads", "got 4.0 (number)"),
        ("[demo]\nseconds = false", "demo.seconds", "got false (boolean)"),
        ("[demo]\nseconds = '5'", "demo.seconds", "got '5' (string)"),
        ("[runtime]\nmodel = 5", "runtime.model", "got 5 (integer)"),
        ("[runtime]\ndelegate = 1", "runtime.delegate", "got 1 (integer)"),
        ("[runtime]\nmodel = ['a']", "runtime.model", "got an array"),
    ],
)
def test_wrong_types(toml, key_path, got):
    with pytest.raises(ConfigError) as info:
        config.loads(toml)
    assert info.value.key_path == key_path
    assert got in str(info.value)
    assert "expected " in str(info.value)


def test_bool_for_int_message():
    with pytest.raises(ConfigError) as info:
        config.loads("[runtime]\nthreads = true\n")
    assert str(info.value) == "<string>: runtime.threads: expected an integer from 1 to 64, got true (boolean)"


def test_int_for_bool_rejected():
    # No bool key exists yet, so exercise the validator on a throwaway section built from the same parts.
    @dataclasses.dataclass(frozen=True)
    class Flags:
        enabled: bool = config.setting(False, "A switch.")

    with pytest.raises(ConfigError) as info:
        config._build(Flags, {"enabled": 1}, "flags", "t")
    assert info.value.key_path == "flags.enabled"
    assert "expected a boolean, got 1 (integer)" in str(info.value)
    assert config._build(Flags, {"enabled": True}, "flags", "t").enabled is True


def test_int_accepted_for_float():
    cfg = config.loads("[runtime]\nstart_timeout_s = 10\n[demo]\nseconds = 0\n")
    assert cfg.runtime.start_timeout_s == 10.0
    assert isinstance(cfg.runtime.start_timeout_s, float)
    assert isinstance(cfg.demo.seconds, float)


def test_nan_rejected_for_float():
    with pytest.raises(ConfigError) as info:
        config.loads("[demo]\nseconds = nan\n")
    assert info.value.key_path == "demo.seconds"


# ------------------------------------------------------------------------------------ values


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[runtime]\nthreads = 0", "runtime.threads: expected an integer from 1 to 64, got 0"),
        ("[runtime]\nthreads = 65", "runtime.threads: expected an integer from 1 to 64, got 65"),
        ("[runtime]\ndeadline_ms = 600001", "runtime.deadline_ms: expected an integer from 1 to 600000, got 600001"),
        ("[runtime]\nstart_timeout_s = 0.5", "runtime.start_timeout_s: expected a number from 1 to 600, got 0.5"),
        ("[runtime]\nwarmup_runs = -1", "runtime.warmup_runs: expected an integer from 0 to 100, got -1"),
        ("[demo]\nseconds = 86400.5", "demo.seconds: expected a number from 0 to 86400, got 86400.5"),
    ],
)
def test_out_of_range(toml, message):
    with pytest.raises(ConfigError) as info:
        config.loads(toml)
    assert str(info.value) == f"<string>: {message}"


def test_range_bounds_are_inclusive():
    cfg = config.loads("[runtime]\nthreads = 64\nwarmup_runs = 0\n[demo]\nseconds = 86400\n")
    assert (cfg.runtime.threads, cfg.runtime.warmup_runs, cfg.demo.seconds) == (64, 0, 86400.0)


def test_bad_choice():
    with pytest.raises(ConfigError) as info:
        config.loads("[runtime]\ndelegate = 'tpu'\n")
    assert info.value.key_path == "runtime.delegate"
    assert str(info.value).endswith("runtime.delegate: expected one of 'auto', 'cpu', 'edgetpu', 'gpu', got 'tpu'")


def test_bad_log_level():
    with pytest.raises(ConfigError) as info:
        config.loads("[device]\nlog_level = 'INFO'\n")
    assert info.value.key_path == "device.log_level"
    assert "one of 'debug', 'info', 'warning', 'error'" in str(info.value)


@pytest.mark.parametrize("value", ["usb", "usb:0", "usb:12", "pci", "pci:1", ""])
def test_good_edgetpu_device(value):
    assert config.loads(f"[runtime]\nedgetpu_device = '{value}'\n").runtime.edgetpu_device == value


@pytest.mark.parametrize("value", ["usb:", "USB", "usb:x", "pcie", "usb:0 ", ":0", "usb:1:2"])
def test_bad_edgetpu_device(value):
    with pytest.raises(ConfigError) as info:
        config.loads(f"[runtime]\nedgetpu_device = '{value}'\n")
    assert info.value.key_path == "runtime.edgetpu_device"
    assert "usb, usb:N, pci or pci:N" in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", ["my box", "a" * 65, "node.local", "naïve", "id\n"])
def test_bad_device_id(value):
    with pytest.raises(ConfigError) as info:
        config.from_mapping({"device": {"id": value}})
    assert info.value.key_path == "device.id"
    assert "1-64 characters" in str(info.value)


@pytest.mark.parametrize("toml, message", [
    ('groups = "site-a"', "device.groups: expected an array, got 'site-a' (string)"),
    ('groups = ["site-a", "site-a"]', "device.groups: group 'site-a' is listed twice"),
    ('groups = ["ok", "site a"]', "device.groups: group 2 ('site a'): expected 1-64 characters from A-Z, a-z, 0-9, "
                                  "'_' and '-'"),
    ('groups = ["a/b"]', "device.groups: group 1 ('a/b'): expected 1-64"),
    ('groups = ["+"]', "device.groups: group 1 ('+'): expected 1-64"),
    ('groups = [""]', "device.groups: group 1 (''): expected 1-64"),
    ('groups = [7]', "device.groups: group 1 (7): expected 1-64"),
    (f'groups = ["{"x" * 65}"]', "device.groups: group 1 ('xxxxxxxx"),
    ("groups = [" + ", ".join(f'"g{i}"' for i in range(33)) + "]", "device.groups: at most 32 groups, got 33"),
])
def test_bad_device_groups(toml, message):
    with pytest.raises(ConfigError) as info:
        config.loads(f"[device]\n{toml}\n")
    assert info.value.key_path == "device.groups" and message in str(info.value)


def test_device_groups():
    assert Config().device.groups == ()
    cfg = config.loads('[device]\ngroups = ["site-a", "ring_1", "' + "A" * 64 + '"]\n')
    assert cfg.device.groups == ("site-a", "ring_1", "A" * 64)  # kept as a tuple: the section stays frozen
    assert config.from_mapping(cfg.to_dict()) == cfg and hash(cfg)
    assert cfg.with_overrides({"device.groups": ["x"]}).device.groups == ("x",)
    assert 'groups = []' in config.render_toml()


def test_good_device_id():
    assert config.from_mapping({"device": {"id": "Pi-4_b" + "x" * 58}}).device.id == "Pi-4_b" + "x" * 58


def test_empty_variant_rejected():
    with pytest.raises(ConfigError) as info:
        config.loads("[runtime]\nvariant = ''\n")
    assert info.value.key_path == "runtime.variant"


def test_full_file_loads():
    text = """
[device]
id = "pump-07"
state_dir = "/data/fieldnode"
log_level = "debug"

[runtime]
backend = "tflite"
delegate = "edgetpu"
edgetpu_device = "usb:0"
gpu_delegate = "libtensorflowlite_gpu_delegate.so"
isolation = "inline"
threads = 4
deadline_ms = 250
start_timeout_s = 12.5
quarantine_after = 5
warmup_runs = 0
model = "models/vibration"
variant = "int8"

[demo]
seconds = 5
"""
    cfg = config.loads(text, source="full.toml")
    assert cfg.source == "full.toml"
    assert cfg.device == config.DeviceConfig("pump-07", "/data/fieldnode", "debug")
    assert cfg.runtime.edgetpu_device == "usb:0"
    assert cfg.runtime.isolation == "inline"
    assert cfg.runtime.start_timeout_s == 12.5
    assert cfg.demo == config.DemoConfig(5.0)


# ------------------------------------------------------------------------------------ nesting


@dataclasses.dataclass(frozen=True)
class _Tls:
    port: int = config.setting(8883, "Port.", minimum=1, maximum=65535)


@dataclasses.dataclass(frozen=True)
class _Link:
    host: str = config.setting("localhost", "Host.")
    tls: _Tls = config.section(_Tls, "TLS.")


def test_nested_key_path_in_error():
    with pytest.raises(ConfigError) as info:
        config._build(_Link, {"tls": {"port": 0}}, "link", "n.toml")
    assert info.value.key_path == "link.tls.port"
    assert str(info.value) == "n.toml: link.tls.port: expected an integer from 1 to 65535, got 0"


def test_nested_unknown_key_and_defaults():
    with pytest.raises(ConfigError) as info:
        config._build(_Link, {"tls": {"prot": 1}}, "link", "n.toml")
    assert info.value.key_path == "link.tls.prot"
    assert "did you mean 'link.tls.port'" in str(info.value)
    link = config._build(_Link, {"tls": {"port": 1883}}, "link", "n.toml")
    assert link == _Link("localhost", _Tls(1883))
    assert config._to_dict(link) == {"host": "localhost", "tls": {"port": 1883}}


def test_nested_keys_are_described():
    paths = [path for path, _tp, _f in config._walk(_Link, "link")]
    assert paths == ["link.host", "link.tls.port"]


# ------------------------------------------------------------------------------------ overrides / dict


def test_with_overrides_replaces_and_keeps_source():
    base = config.loads("[runtime]\nthreads = 4\n", source="base.toml")
    cfg = base.with_overrides({"runtime.threads": 1, "demo.seconds": 2})
    assert cfg.runtime.threads == 1
    assert cfg.demo.seconds == 2.0
    assert cfg.source == "base.toml"
    assert base.runtime.threads == 4  # the original is untouched
    assert cfg.runtime.delegate == base.runtime.delegate


def test_with_overrides_merges_section_mapping():
    cfg = Config().with_overrides({"runtime": {"threads": 8}})
    assert cfg.runtime.threads == 8
    assert cfg.runtime.deadline_ms == 5000


@pytest.mark.parametrize(
    "overrides, key_path",
    [
        ({"runtime.threads": 0}, "runtime.threads"),
        ({"runtime.threads": True}, "runtime.threads"),
        ({"runtime.thread": 1}, "runtime.thread"),
        ({"runtim.threads": 1}, "runtim"),
        ({"runtime.threads.x": 1}, "runtime.threads"),
        ({"runtime..threads": 1}, "runtime..threads"),
    ],
)
def test_with_overrides_validates(overrides, key_path):
    with pytest.raises(ConfigError) as info:
        Config().with_overrides(overrides)
    assert info.value.key_path == key_path
    assert info.value.source == "<overrides>"


def test_configs_are_frozen():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.runtime.threads = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.runtime = config.RuntimeConfig()  # type: ignore[misc]


def test_to_dict_round_trip():
    cfg = config.loads("[device]\nid = 'n1'\n[runtime]\nthreads = 3\ndelegate = 'cpu'\n[demo]\nseconds = 1.5\n")
    data = cfg.to_dict()
    assert data["runtime"]["threads"] == 3
    assert data["device"]["id"] == "n1"
    assert isinstance(data["runtime"], dict)
    assert config.from_mapping(data) == cfg
    assert config.from_mapping(Config().to_dict()) == Config()


def test_to_dict_has_no_source_and_all_sections():
    data = Config().to_dict()
    assert set(data) == {"device", "runtime", "demo", "drivers", "power", "link", "update"}
    assert "source" not in data


# ------------------------------------------------------------------------------------ describe / docs


def test_describe_lists_every_key():
    rows = config.describe()
    described = [row[0] for row in rows]

    def leaves(data, prefix=""):
        for key, value in data.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                yield from leaves(value, path + ".")
            else:
                yield path

    assert sorted(described) == sorted(leaves(Config().to_dict()))
    assert len(described) == len(set(described)) == 110
    by_path = {path: (type_text, default, doc) for path, type_text, default, doc in rows}
    assert by_path["runtime.threads"][:2] == ("an integer from 1 to 64", 2)
    assert by_path["runtime.delegate"][0] == "one of 'auto', 'cpu', 'edgetpu', 'gpu'"
    assert by_path["drivers.virtual_board"][0].startswith("one of '', 'rpi4'")  # the empty choice shows
    assert by_path["demo.seconds"][1] == 30.0
    assert all(doc for _t, _d, doc in by_path.values())


def test_render_markdown_has_a_row_per_key():
    table = config.render_markdown()
    for path, _t, _d, _doc in config.describe():
        assert f"| `{path}` |" in table


def test_render_toml_is_the_defaults():
    text = config.render_toml()
    assert config.loads(text) == Config()
    assert "[runtime]" in text and "threads = 2" in text


# ------------------------------------------------------------------------------------ device id


def test_device_id_from_config():
    cfg = config.from_mapping({"device": {"id": "pump-07"}})
    assert config.device_id(cfg, machine_id_path="/nonexistent", hostname="h") == "pump-07"


def test_device_id_from_machine_id(tmp_path):
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789ABCDEF0123456789abcdef\n")
    assert config.device_id(Config(), machine_id_path=str(machine_id), hostname="h") == "0123456789ab"


def test_device_id_falls_back_to_hostname(tmp_path):
    assert config.device_id(Config(), machine_id_path=str(tmp_path / "none"), hostname="pi.local") == "pi-local"
    empty = tmp_path / "machine-id"
    empty.write_text("\n")
    assert config.device_id(Config(), machine_id_path=str(empty), hostname="board_1") == "board_1"
    assert config.device_id(Config(), machine_id_path=str(empty), hostname="") == "fieldnode"


def test_docs_table_is_current():
    doc = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert config.render_markdown() in doc.read_text(encoding="utf-8"), "regenerate with: python -m device.config"


def test_docs_example_is_valid():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text(encoding="utf-8")
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    cfg = config.loads(example, source="docs example")
    assert cfg.runtime.delegate == "edgetpu"
    assert cfg.runtime.edgetpu_device == "usb:0"
