"""Tests of the Pi throttle flags and Jetson nvpmodel readers (drivers.throttle).

The command-line tools are real scripts written to tmp_path and put first on PATH, so the readers run
them through the real subprocess path.
"""

from __future__ import annotations

import builtins
import errno
import os
import subprocess

import pytest

from drivers import throttle
from drivers.errors import SysfsError
from drivers.sysfs import Sysfs
from drivers.throttle import (
    PowerMode,
    ThrottleBit,
    ThrottleFlags,
    parse_nvpmodel,
    parse_throttled_node,
    parse_vcgencmd,
    read_nvpmodel,
    read_throttled,
)
from tests.drivers.sysfs_tree import pi4, write

PI4_NODE = "sys/devices/platform/soc/soc:firmware/get_throttled"


@pytest.fixture
def tools(tmp_path, monkeypatch):
    """Returns ``install(name, body)``, which writes an executable shell script into a PATH directory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")

    def install(name, body):
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
        return script

    return install


@pytest.fixture
def no_tools(tmp_path, monkeypatch):
    """A PATH with nothing on it."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


@pytest.fixture
def real_root_without_node(monkeypatch):
    """The real root "/", with the firmware node looked for where no machine has one, so the vcgencmd
    fallback is exercised the same way on a Pi as anywhere else."""
    monkeypatch.setattr(throttle, "FIRMWARE_NODES", ("sys/devices/platform/fieldnode-test-absent/get_throttled",))
    return Sysfs("/")


# ----------------------------------------------------------------------------- decoding


def test_zero_is_all_clear():
    flags = ThrottleFlags(0x0)
    assert not any(getattr(flags, name) for name in (
        "under_voltage", "freq_capped", "throttled", "soft_temp_limit", "under_voltage_occurred",
        "freq_capped_occurred", "throttled_occurred", "soft_temp_limit_occurred"))
    assert flags.active == () and flags.occurred_only == ()
    assert flags.describe() == "no throttling"


def test_0x50005_under_voltage_and_throttled_now():
    flags = ThrottleFlags(0x50005)
    assert (flags.under_voltage, flags.freq_capped, flags.throttled, flags.soft_temp_limit) == (
        True, False, True, False)
    assert (flags.under_voltage_occurred, flags.freq_capped_occurred, flags.throttled_occurred,
            flags.soft_temp_limit_occurred) == (True, False, True, False)
    assert flags.active == ("under-voltage", "throttled")
    assert flags.occurred_only == ()
    assert flags.describe() == "under-voltage now; throttled now"


def test_0x80008_soft_temperature_limit_now():
    flags = ThrottleFlags(0x80008)
    assert flags.soft_temp_limit and flags.soft_temp_limit_occurred
    assert not (flags.under_voltage or flags.throttled or flags.freq_capped)
    assert flags.active == ("soft temperature limit",)
    assert flags.describe() == "soft temperature limit now"


def test_0xE0000_only_history():
    flags = ThrottleFlags(0xE0000)
    assert flags.active == ()
    assert (flags.under_voltage_occurred, flags.freq_capped_occurred, flags.throttled_occurred,
            flags.soft_temp_limit_occurred) == (False, True, True, True)
    assert flags.describe() == "frequency capped occurred; throttled occurred; soft temperature limit occurred"


def test_describe_now_before_history():
    assert ThrottleFlags(0x80001).describe() == "under-voltage now; soft temperature limit occurred"
    assert ThrottleFlags(0x10002).describe() == "frequency capped now; under-voltage occurred"


def test_unknown_bits_are_kept_and_ignored():
    flags = ThrottleFlags(0x100010 | 0x2)
    assert flags.raw == 0x100012
    assert flags.active == ("frequency capped",)
    assert flags.describe() == "frequency capped now"


def test_bits_by_enum():
    flags = ThrottleFlags(0x40001)
    assert flags.now(ThrottleBit.UNDER_VOLTAGE) and not flags.occurred(ThrottleBit.UNDER_VOLTAGE)
    assert flags.occurred(ThrottleBit.THROTTLED) and not flags.now(ThrottleBit.THROTTLED)
    assert [b.label for b in ThrottleBit] == [
        "under-voltage", "frequency capped", "throttled", "soft temperature limit"]


@pytest.mark.parametrize("raw", [-1, "0x5", 1.0, True, None])
def test_flags_reject_non_bitfields(raw):
    with pytest.raises(ValueError) as info:
        ThrottleFlags(raw)
    assert repr(raw) in str(info.value) and "non-negative integer" in str(info.value)


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("text, expected", [
    ("50005", 0x50005), ("0x50005", 0x50005), ("0X80008", 0x80008), ("0", 0), (" e0000 \n", 0xE0000),
])
def test_parse_throttled_node(text, expected):
    assert parse_throttled_node(text) == expected


@pytest.mark.parametrize("text", ["", "zz", "-5", "5_0", "0x", "throttled=0x5", "50005 1"])
def test_parse_throttled_node_garbage_names_the_text(text):
    with pytest.raises(SysfsError) as info:
        parse_throttled_node(text)
    assert repr(text) in str(info.value) and "get_throttled" in str(info.value)


@pytest.mark.parametrize("text, expected", [
    ("throttled=0x50005\n", 0x50005), ("throttled=0x0", 0), ("  throttled=0xe0000  ", 0xE0000),
    ("throttled=80008", 0x80008),
])
def test_parse_vcgencmd(text, expected):
    assert parse_vcgencmd(text) == expected


@pytest.mark.parametrize("text", [
    "", "throttled=", "throttled=0xZZ", "error=1 error_msg=\"Command not registered\"",
    "VCHI initialization failed", "throttled=0x5 extra",
])
def test_parse_vcgencmd_garbage_names_the_text(text):
    with pytest.raises(SysfsError) as info:
        parse_vcgencmd(text)
    assert repr(text) in str(info.value) and "throttled=0x<hex>" in str(info.value)


def test_parse_vcgencmd_long_garbage_is_shortened_in_the_message():
    with pytest.raises(SysfsError) as info:
        parse_vcgencmd("x" * 5000)
    assert "x" * 200 in str(info.value) and len(str(info.value)) < 400


# ----------------------------------------------------------------------------- reading the Pi


def test_pi4_firmware_node(tmp_path):
    assert read_throttled(Sysfs(str(pi4(tmp_path)))) == ThrottleFlags(0)
    write(tmp_path, {PI4_NODE: "50005"})
    assert read_throttled(Sysfs(str(tmp_path))) == ThrottleFlags(0x50005)
    write(tmp_path, {PI4_NODE: "0x80008"})
    assert read_throttled(Sysfs(str(tmp_path))).soft_temp_limit


def test_firmware_node_on_another_bus(tmp_path):
    write(tmp_path, {"sys/devices/platform/axi/axi:firmware/get_throttled": "e0000"})
    assert read_throttled(Sysfs(str(tmp_path))) == ThrottleFlags(0xE0000)


def test_fake_tree_never_runs_vcgencmd(tmp_path, tools):
    marker = tmp_path / "ran"
    tools("vcgencmd", f"touch '{marker}'\necho throttled=0x50005")
    assert read_throttled(Sysfs(str(tmp_path))) is None  # no node in the tree
    write(tmp_path, {PI4_NODE: "garbage"})
    assert read_throttled(Sysfs(str(tmp_path))) is None
    assert not marker.exists()


def test_unreadable_firmware_node_is_unknown(tmp_path, mocker):
    write(tmp_path, {PI4_NODE: "50005"})
    real_open = builtins.open

    def failing(path, *args, **kwargs):
        if str(path).endswith("get_throttled"):
            raise OSError(errno.EIO, "Input/output error")  # the firmware mailbox timed out
        return real_open(path, *args, **kwargs)

    mocker.patch("builtins.open", side_effect=failing)
    assert read_throttled(Sysfs(str(tmp_path))) is None


def test_vcgencmd_fallback_on_the_real_root(real_root_without_node, tools, tmp_path):
    args = tmp_path / "args"
    tools("vcgencmd", f"echo \"$@\" > '{args}'\necho throttled=0x50005")
    assert read_throttled(real_root_without_node) == ThrottleFlags(0x50005)
    assert args.read_text().strip() == "get_throttled"


@pytest.mark.parametrize("body", [
    "echo 'VCHI initialization failed' >&2\nexit 255",  # not in the video group
    "echo 'error=2 error_msg=\"Invalid arguments\"'",
    "printf '\\377\\376 binary'",
    "exit 0",
])
def test_vcgencmd_failures_are_unknown(real_root_without_node, tools, body):
    tools("vcgencmd", body)
    assert read_throttled(real_root_without_node) is None


def test_vcgencmd_missing_is_unknown(real_root_without_node, no_tools):
    assert read_throttled(real_root_without_node) is None


def test_vcgencmd_timeout_is_unknown(real_root_without_node, tools):
    tools("vcgencmd", "exec sleep 60")
    assert read_throttled(real_root_without_node, timeout_s=0.3) is None


def test_run_seam_gets_the_two_second_timeout(real_root_without_node, tools):
    tools("vcgencmd", "exit 9")  # present on PATH; never run here
    calls = []

    def run(argv, **kwargs):
        calls.append((argv, kwargs))
        return subprocess.CompletedProcess(argv, 0, b"throttled=0x2\n", b"")

    assert read_throttled(real_root_without_node, run=run) == ThrottleFlags(0x2)
    ((argv, kwargs),) = calls
    assert os.path.basename(argv[0]) == "vcgencmd" and argv[1:] == ["get_throttled"]
    assert kwargs["timeout"] == 2.0 and kwargs["check"] is False


def test_run_seam_raising_is_unknown(real_root_without_node, tools):
    tools("vcgencmd", "exit 9")

    def run(argv, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", argv[0])

    assert read_throttled(real_root_without_node, run=run) is None


# ----------------------------------------------------------------------------- Jetson nvpmodel


@pytest.mark.parametrize("text, expected", [
    ("NV Power Mode: MAXN\n0\n", PowerMode(0, "MAXN")),
    ("NV Fan Mode:quiet\nNV Power Mode: 15W\n1\n", PowerMode(1, "15W")),
    ("NVPM WARN: fan mode is not set!\nNV Power Mode: MAXN_SUPER\n\n2\n", PowerMode(2, "MAXN_SUPER")),
    ("NV Power Mode: 7W", PowerMode(None, "7W")),
    ("NV Power Mode: 5W\nNV Fan Mode:cool\n", PowerMode(None, "5W")),
])
def test_parse_nvpmodel(text, expected):
    assert parse_nvpmodel(text) == expected


@pytest.mark.parametrize("text, problem", [
    ("", "no 'NV Power Mode:' line"),
    ("NV Fan Mode:quiet\n", "no 'NV Power Mode:' line"),
    ("nvpmodel: command failed\n", "no 'NV Power Mode:' line"),
    ("NV Power Mode:\n0\n", "without a name"),
])
def test_parse_nvpmodel_garbage_names_the_text(text, problem):
    with pytest.raises(SysfsError) as info:
        parse_nvpmodel(text)
    assert problem in str(info.value) and repr(text) in str(info.value)
    assert str(info.value).startswith("nvpmodel -q: ")


def test_read_nvpmodel(tools):
    tools("nvpmodel", '[ "$1" = "-q" ] || exit 3\nprintf "NV Fan Mode:quiet\\nNV Power Mode: 15W\\n1\\n"')
    assert read_nvpmodel() == PowerMode(1, "15W")


def test_read_nvpmodel_not_a_jetson(no_tools):
    assert read_nvpmodel() is None


@pytest.mark.parametrize("body", [
    "echo 'NVPM ERROR: failed to read PARAM' >&2\nexit 1",
    "echo 'something else entirely'",
])
def test_read_nvpmodel_failures_are_unknown(tools, body):
    tools("nvpmodel", body)
    assert read_nvpmodel() is None


def test_read_nvpmodel_timeout_is_unknown(tools):
    tools("nvpmodel", "exec sleep 60")
    assert read_nvpmodel(timeout_s=0.3) is None
