"""Tests of the rooted sysfs seam (drivers.sysfs) on real files in tmp_path."""

from __future__ import annotations

import builtins
import errno
import os

import pytest

from drivers.errors import SysfsError, SysfsPermissionError
from drivers.sysfs import ENV_ROOT, Sysfs, resolve_root
from tests.drivers.sysfs_tree import write


def _fail_open_for(mocker, suffix, exc):
    """Makes builtins.open raise ``exc`` for paths ending in ``suffix`` only (narrow error injection)."""
    real_open = builtins.open

    def fake(path, *args, **kwargs):
        if str(path).endswith(suffix):
            raise exc
        return real_open(path, *args, **kwargs)

    mocker.patch("builtins.open", side_effect=fake)


def _fail_os_open_for(mocker, suffix, exc):
    """Makes os.open raise ``exc`` for paths ending in ``suffix`` only."""
    real_open = os.open

    def fake(path, flags, *args, **kwargs):
        if str(path).endswith(suffix):
            raise exc
        return real_open(path, flags, *args, **kwargs)

    mocker.patch("os.open", side_effect=fake)


# ----------------------------------------------------------------------------- root and paths


def test_resolve_root_prefers_environment_then_config_then_slash():
    assert resolve_root("/cfg", {ENV_ROOT: "/env"}) == "/env"
    assert resolve_root("/cfg", {}) == "/cfg"
    assert resolve_root("", {}) == "/"
    assert resolve_root("", {ENV_ROOT: ""}) == "/"


def test_resolve_root_reads_process_environment(monkeypatch):
    monkeypatch.setenv(ENV_ROOT, "/from/env")
    assert resolve_root("/cfg") == "/from/env"


def test_path_is_rooted_and_ignores_leading_slash(tmp_path):
    fs = Sysfs(str(tmp_path))
    assert fs.path("sys/class/thermal") == str(tmp_path / "sys/class/thermal")
    assert fs.path("/sys/class/thermal") == str(tmp_path / "sys/class/thermal")
    assert repr(fs) == f"Sysfs({str(tmp_path)!r})"


def test_root_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Sysfs("board").root == str(tmp_path / "board")
    assert Sysfs().root == "/"


def test_exists(tmp_path):
    write(tmp_path, {"sys/a/b": 1})
    fs = Sysfs(str(tmp_path))
    assert fs.exists("sys/a/b") and fs.exists("sys/a")
    assert not fs.exists("sys/a/c")


def test_glob_is_relative_and_in_natural_order(tmp_path):
    write(tmp_path, {f"sys/class/thermal/thermal_zone{n}/temp": 1 for n in (10, 2, 1, 0)})
    fs = Sysfs(str(tmp_path))
    assert fs.glob("sys/class/thermal/thermal_zone*") == [
        "sys/class/thermal/thermal_zone0", "sys/class/thermal/thermal_zone1",
        "sys/class/thermal/thermal_zone2", "sys/class/thermal/thermal_zone10",
    ]
    assert fs.glob("sys/class/power_supply/*") == []


# ----------------------------------------------------------------------------- reading


def test_read_text_strips(tmp_path):
    (tmp_path / "node").write_text("  cpu-thermal \n")
    assert Sysfs(str(tmp_path)).read_text("node") == "cpu-thermal"


def test_read_text_absent_is_none(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    fs = Sysfs(str(tmp_path))
    assert fs.read_text("missing") is None
    assert fs.read_text("file/below") is None  # NotADirectoryError
    assert fs.read_text("dir") is None  # IsADirectoryError


def test_read_text_replaces_undecodable_bytes(tmp_path):
    (tmp_path / "node").write_bytes(b"ab\xffcd\n")
    assert Sysfs(str(tmp_path)).read_text("node") == "ab\ufffdcd"


def test_read_text_permission_denied_is_none(tmp_path, mocker):
    (tmp_path / "secret").write_text("1")
    _fail_open_for(mocker, "secret", PermissionError(errno.EACCES, "Permission denied"))
    assert Sysfs(str(tmp_path)).read_text("secret") is None


@pytest.mark.parametrize("code", [errno.ENODEV, errno.ENXIO, errno.EAGAIN, errno.ENODATA, errno.EINVAL])
def test_read_text_driver_with_nothing_to_say_is_none(tmp_path, mocker, code):
    (tmp_path / "temp").write_text("1")
    _fail_open_for(mocker, "temp", OSError(code, os.strerror(code)))
    assert Sysfs(str(tmp_path)).read_text("temp") is None


def test_read_text_io_error_raises_naming_the_node(tmp_path, mocker):
    (tmp_path / "capacity").write_text("1")
    _fail_open_for(mocker, "capacity", OSError(errno.EIO, "Input/output error"))
    with pytest.raises(SysfsError) as info:
        Sysfs(str(tmp_path)).read_text("capacity")
    assert "capacity" in str(info.value) and "Input/output error" in str(info.value)
    assert info.value.path == "capacity"
    assert isinstance(info.value.__cause__, OSError)


def test_read_optional_treats_an_unreadable_node_as_unknown(tmp_path, mocker):
    write(tmp_path, {"capacity": 55, "status": "Charging", "empty": ""})
    fs = Sysfs(str(tmp_path))
    assert fs.read_optional("status") == "Charging"
    assert fs.read_optional("empty") is None and fs.read_optional("absent") is None
    _fail_open_for(mocker, "capacity", OSError(errno.EIO, "Input/output error"))
    assert fs.read_optional("capacity") is None  # read_text raises here (see above); the reading is unknown
    assert fs.read_optional_int("capacity") is None


def test_read_optional_int_is_decimal_unless_0x(tmp_path):
    write(tmp_path, {"lead": "050", "hex": "0x1f", "neg": -3, "junk": "abc"})
    fs = Sysfs(str(tmp_path))
    assert (fs.read_optional_int("lead"), fs.read_optional_int("hex"), fs.read_optional_int("neg")) == (50, 31, -3)
    assert fs.read_optional_int("junk") is None and fs.read_optional_int("absent") is None


def test_read_int_decimal_hex_and_negative(tmp_path):
    write(tmp_path, {"dec": 48686, "hex": "0x50005", "neg": -420000})
    fs = Sysfs(str(tmp_path))
    assert fs.read_int("dec") == 48686
    assert fs.read_int("hex") == 0x50005
    assert fs.read_int("neg") == -420000


def test_read_int_garbage_or_absent_is_none(tmp_path):
    write(tmp_path, {"garbage": "abc", "empty": "", "float": "1.5"})
    fs = Sysfs(str(tmp_path))
    assert fs.read_int("garbage") is None
    assert fs.read_int("empty") is None
    assert fs.read_int("float") is None
    assert fs.read_int("missing") is None


# ----------------------------------------------------------------------------- writing


def test_write_text_truncates_and_adds_newline(tmp_path):
    write(tmp_path, {"scaling_max_freq": 1500000})
    fs = Sysfs(str(tmp_path))
    fs.write_text("scaling_max_freq", 600000)
    assert (tmp_path / "scaling_max_freq").read_text() == "600000\n"
    assert fs.read_int("scaling_max_freq") == 600000


def test_write_text_missing_node_names_it(tmp_path):
    with pytest.raises(SysfsError) as info:
        Sysfs(str(tmp_path)).write_text("sys/nothing/here", 1)
    assert not isinstance(info.value, SysfsPermissionError)
    assert "sys/nothing/here" in str(info.value) and "no such node" in str(info.value)
    assert not (tmp_path / "sys/nothing/here").exists()  # never created


def test_write_text_permission_denied(tmp_path, mocker):
    write(tmp_path, {"scaling_max_freq": 1500000})
    _fail_os_open_for(mocker, "scaling_max_freq", PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(SysfsPermissionError) as info:
        Sysfs(str(tmp_path)).write_text("scaling_max_freq", 600000)
    assert "scaling_max_freq" in str(info.value) and "permission denied" in str(info.value)
    assert info.value.code == "sysfs_permission"


def test_write_text_read_only_file_system_is_a_permission_problem(tmp_path, mocker):
    write(tmp_path, {"node": 1})
    _fail_os_open_for(mocker, "node", OSError(errno.EROFS, "Read-only file system"))
    with pytest.raises(SysfsPermissionError, match="node: read-only file system"):
        Sysfs(str(tmp_path)).write_text("node", 2)


def test_write_text_other_open_error(tmp_path, mocker):
    write(tmp_path, {"node": 1})
    _fail_os_open_for(mocker, "node", OSError(errno.EBUSY, "Device or resource busy"))
    with pytest.raises(SysfsError, match="node: cannot open for writing: Device or resource busy") as info:
        Sysfs(str(tmp_path)).write_text("node", 2)
    assert not isinstance(info.value, SysfsPermissionError)


def test_write_rejected_by_kernel_names_the_value(tmp_path, mocker):
    write(tmp_path, {"scaling_governor": "ondemand"})
    mocker.patch("os.write", side_effect=OSError(errno.EINVAL, "Invalid argument"))
    with pytest.raises(SysfsError) as info:
        Sysfs(str(tmp_path)).write_text("scaling_governor", "turbo")
    assert "scaling_governor" in str(info.value) and "'turbo'" in str(info.value)
    assert "Invalid argument" in str(info.value)


def test_write_refused_at_write_time_is_a_permission_problem(tmp_path, mocker):
    write(tmp_path, {"node": 1})
    mocker.patch("os.write", side_effect=OSError(errno.EPERM, "Operation not permitted"))
    with pytest.raises(SysfsPermissionError, match="node: permission denied"):
        Sysfs(str(tmp_path)).write_text("node", 2)


def test_write_closes_the_descriptor_on_failure(tmp_path, mocker):
    write(tmp_path, {"node": 1})
    mocker.patch("os.write", side_effect=OSError(errno.EINVAL, "Invalid argument"))
    closed = mocker.spy(os, "close")
    with pytest.raises(SysfsError):
        Sysfs(str(tmp_path)).write_text("node", 2)
    assert closed.call_count == 1
