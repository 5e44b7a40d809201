"""The files in ``systemd/`` checked by systemd's own tools, not by reading them back.

``systemd-analyze verify`` and ``security --offline`` run against a throwaway root that holds the unit, stub
executables for its ``Exec*=`` lines and stub targets; ``systemd-sysusers`` and ``systemd-tmpfiles`` do a real
run into a throwaway root. systemd 252 has no ``udevadm verify``, so the udev rule goes through a small parser
of the udev rules grammar (udev(7)). The tools are required: a machine without them fails these tests.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

SYSTEMD_DIR = pathlib.Path(__file__).resolve().parents[2] / "systemd"
SERVICE = SYSTEMD_DIR / "fieldnode.service"
SYSUSERS = SYSTEMD_DIR / "fieldnode.sysusers"
TMPFILES = SYSTEMD_DIR / "fieldnode.tmpfiles"
UDEV_RULES = SYSTEMD_DIR / "99-fieldnode-edgetpu.rules"
MAX_EXPOSURE = 2.0
# The targets a service's default dependencies and [Install] section name; verify wants them to exist.
STUB_UNITS = ("sysinit.target", "basic.target", "shutdown.target", "network-online.target", "multi-user.target")
CPUFREQ = "sys/devices/system/cpu/cpufreq"


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/bin:/usr/sbin:/sbin")
    assert path, f"{name} is missing: install systemd (Debian package 'systemd') to check the units"
    return path


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def _unit_root(tmp_path: pathlib.Path, text: str, name: str = "fieldnode.service") -> pathlib.Path:
    """A root holding the unit, a stub for every executable its Exec*= lines name, and stub targets."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system" / name).write_text(text)
    for m in re.finditer(r"^Exec\w+=[-@:+!]*(/\S+)", text, re.MULTILINE):
        exe = root / m.group(1).lstrip("/")
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    units = root / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    for stub in STUB_UNITS:
        (units / stub).write_text("[Unit]\nDescription=stub\n")
    return root


def _verify(tmp_path: pathlib.Path, text: str) -> tuple[int, str]:
    root = _unit_root(tmp_path, text)
    proc = _run([_tool("systemd-analyze"), "verify", f"--root={root}", "fieldnode.service"])
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def _exposure(tmp_path: pathlib.Path, text: str) -> tuple[float, str]:
    root = _unit_root(tmp_path, text)
    proc = _run([_tool("systemd-analyze"), "security", "--offline=true", f"--root={root}", "fieldnode.service"])
    out = proc.stdout + proc.stderr
    m = re.search(r"Overall exposure level for fieldnode\.service:\s*([0-9.]+)", out)
    assert m, f"no exposure level in systemd-analyze security output (exit {proc.returncode}):\n{out}"
    return float(m.group(1)), out


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_verify_is_clean_on_the_service(tmp_path):
    rc, out = _verify(tmp_path, SERVICE.read_text())
    assert rc == 0 and out == "", f"systemd-analyze verify (exit {rc}):\n{out}"


def test_verify_catches_a_broken_unit(tmp_path):
    # The harness is not blind: a misspelt value and an unknown directive are reported.
    broken = SERVICE.read_text().replace("Type=notify", "Type=notyfy").replace("UMask=", "UMsk=")
    rc, out = _verify(tmp_path, broken)
    assert "notyfy" in out and "UMsk" in out, out


def test_security_exposure_is_at_most_2(tmp_path, capsys):
    score, out = _exposure(tmp_path, SERVICE.read_text())
    with capsys.disabled():
        print(f"\nsystemd-analyze security --offline=true fieldnode.service: overall exposure {score}")
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}:\n{out}"


def test_security_score_rises_without_the_sandbox(tmp_path):
    # The parsed number is the real one: dropping the device and syscall limits must cost exposure.
    text = SERVICE.read_text()
    loose = "\n".join(l for l in text.splitlines() if not l.startswith(("DevicePolicy", "DeviceAllow", "SystemCall")))
    score, _ = _exposure(tmp_path / "a", text)
    loose_score, out = _exposure(tmp_path / "b", loose)
    assert loose_score > score and loose_score > MAX_EXPOSURE, out


def test_service_keeps_the_choices_docs_explain():
    d = _directives(SERVICE.read_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"] and d["WatchdogSec"] == ["90s"]
    assert d["ExecStart"] == ["/opt/fieldnode/venv/bin/fieldnode run"]
    assert d["User"] == ["fieldnode"] and d["Group"] == ["fieldnode"]
    assert d["CapabilityBoundingSet"] == [""] and d["AmbientCapabilities"] == [""]
    # The governor writes scaling_max_freq: /sys is read-only but for the cpufreq tree.
    assert d["ProtectKernelTunables"] == ["yes"] and d["ReadWritePaths"] == [f"-/{CPUFREQ}"]
    # Accelerator discovery reads /proc/cpuinfo and /proc/device-tree.
    assert d["ProcSubset"] == ["all"]
    assert "MemoryDenyWriteExecute" not in d  # XNNPACK may need W+X pages: see docs/systemd.md
    assert d["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0] for v in d["DeviceAllow"]}
    assert {"char-ttyAMA", "char-ttyUSB", "char-gpiochip", "char-apex", "char-usb_device"} <= allowed


# A child that says "ready", then "HUP" when SIGHUP arrives, and exits 0.
HUP_CHILD = ("import signal, sys\n"
             "signal.signal(signal.SIGHUP, lambda *a: (print('HUP', flush=True), sys.exit(0)))\n"
             "print('ready', flush=True)\n"
             "while True: signal.pause()\n")


def test_reload_sends_sighup_without_a_kill_binary(tmp_path):
    # A minimal Debian image (debootstrap --variant=minbase) has no procps, so no /bin/kill: the reload must use
    # what every Debian and Raspberry Pi OS system has, the shell (dash, essential) and its builtin kill.
    argv = shlex.split(_directives(SERVICE.read_text())["ExecReload"][0])
    assert argv[0] == "/bin/sh", argv
    child = subprocess.Popen([sys.executable, "-c", HUP_CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        # As systemd runs it: $MAINPID in the environment; no kill program anywhere on PATH (an empty directory).
        empty = tmp_path / "empty"
        empty.mkdir()
        proc = subprocess.run(argv, env={"MAINPID": str(child.pid), "PATH": str(empty)}, capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        assert child.stdout.readline().strip() == "HUP"
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()


def test_sysusers_creates_the_account_and_its_groups(tmp_path):
    (tmp_path / "etc").mkdir()
    proc = _run([_tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS)])
    assert proc.returncode == 0 and "Failed" not in proc.stderr, proc.stderr
    passwd = {l.split(":")[0]: l.split(":") for l in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {l.split(":")[0]: l.split(":") for l in (tmp_path / "etc/group").read_text().splitlines()}
    assert passwd["fieldnode"][6] == "/usr/sbin/nologin"
    assert passwd["fieldnode"][3] == groups["fieldnode"][2]
    # Every SupplementaryGroups= group of the unit exists and has the account as a member.
    for group in _directives(SERVICE.read_text())["SupplementaryGroups"][0].split():
        assert "fieldnode" in groups[group][3].split(","), (group, groups.get(group))


def test_sysusers_rejects_a_bad_line(tmp_path):
    # The tool really parses: the same run on a garbled copy fails.
    (tmp_path / "etc").mkdir()
    bad = tmp_path / "bad.conf"
    bad.write_text(SYSUSERS.read_text() + "u fieldnode2 notanumber\n")
    proc = _run([_tool("systemd-sysusers"), "--dry-run", f"--root={tmp_path}", str(bad)])
    assert proc.returncode != 0, proc.stderr


def _cpufreq_root(tmp_path: pathlib.Path) -> tuple[pathlib.Path, list[pathlib.Path]]:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    assert _run([_tool("systemd-sysusers"), f"--root={root}", str(SYSUSERS)]).returncode == 0
    nodes = []
    for policy in ("policy0", "policy4"):  # a big.LITTLE board has one policy per cluster
        d = root / CPUFREQ / policy
        d.mkdir(parents=True)
        for name in ("scaling_max_freq", "scaling_min_freq"):
            (d / name).write_text("1500000\n")
            (d / name).chmod(0o644)
        nodes.append(d / "scaling_max_freq")
    return root, nodes


def test_tmpfiles_makes_every_policy_cap_group_writable(tmp_path):
    root, nodes = _cpufreq_root(tmp_path)
    proc = _run([_tool("systemd-tmpfiles"), f"--root={root}", "--create", str(TMPFILES)])
    if os.geteuid() == 0:
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        gid = next(int(l.split(":")[2]) for l in (root / "etc/group").read_text().splitlines()
                   if l.startswith("fieldnode:"))
        for node in nodes:
            st = node.stat()
            assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o664, 0, gid), node
    else:
        # Without root the chown is refused, but the line parsed and its glob matched every policy.
        errors = [l for l in proc.stderr.splitlines() if l.strip()]
        assert len(errors) == len(nodes) and all("Operation not permitted" in e for e in errors), proc.stderr
        assert {str(n) for n in nodes} == {re.search(r"of (\S+) failed", e).group(1) for e in errors}
    # scaling_min_freq is left alone: the governor only caps.
    assert all((n.parent / "scaling_min_freq").stat().st_mode & 0o777 == 0o644 for n in nodes)


def test_tmpfiles_rejects_a_bad_line(tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_text("z /sys/devices/system/cpu/cpufreq/policy*/scaling_max_freq 9999 root fieldnode -\n")
    root, _ = _cpufreq_root(tmp_path)
    proc = _run([_tool("systemd-tmpfiles"), f"--root={root}", "--create", str(bad)])
    assert proc.returncode != 0 and "9999" in proc.stderr, proc.stderr


# udev(7): keys that only match, keys that only assign, keys that do both, and those taking {name}.
UDEV_MATCH = {"ACTION", "DEVPATH", "KERNEL", "KERNELS", "NAME", "SYMLINK", "SUBSYSTEM", "SUBSYSTEMS", "DRIVER",
              "DRIVERS", "ATTR", "ATTRS", "SYSCTL", "ENV", "CONST", "TAG", "TAGS", "TEST", "PROGRAM", "RESULT"}
UDEV_ASSIGN = {"NAME", "SYMLINK", "OWNER", "GROUP", "MODE", "SECLABEL", "ATTR", "SYSCTL", "ENV", "TAG", "RUN",
               "LABEL", "GOTO", "IMPORT", "OPTIONS"}
UDEV_WITH_ATTR = {"ATTR", "ATTRS", "SYSCTL", "ENV", "CONST", "TEST", "RUN", "IMPORT", "SECLABEL"}
UDEV_PAIR = re.compile(r'\s*([A-Z]+)(?:\{([^{}"]+)\})?\s*(==|!=|\+=|-=|:=|=)\s*"((?:[^"\\]|\\.)*)"\s*(,?)')


def parse_udev_rules(text: str) -> list[list[tuple[str, str | None, str, str]]]:
    """Each rule as (key, attribute, operator, value) tuples; ValueError naming the line when one is wrong."""
    rules = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pairs, pos = [], 0
        while pos < len(line):
            m = UDEV_PAIR.match(line, pos)
            if not m:
                raise ValueError(f"line {number}: not key==\"value\" at column {pos + 1}: {line[pos:]!r}")
            key, attr, op, value, sep = m.groups()
            matching = op in ("==", "!=")
            if key not in (UDEV_MATCH if matching else UDEV_ASSIGN):
                raise ValueError(f"line {number}: {key} cannot be used with {op}")
            if (attr is not None) != (key in UDEV_WITH_ATTR) and key not in ("RUN", "IMPORT"):
                raise ValueError(f"line {number}: {key} {'needs' if attr is None else 'takes no'} {{attribute}}")
            if key == "MODE" and not re.fullmatch(r"0[0-7]{3}", value):
                raise ValueError(f"line {number}: MODE {value!r} is not an octal mode")
            pairs.append((key, attr, op, value))
            pos = m.end()
            if not sep and pos < len(line):
                raise ValueError(f"line {number}: missing comma at column {pos + 1}")
        if not any(op in ("==", "!=") for _, _, op, _ in pairs):
            raise ValueError(f"line {number}: a rule with no match applies to every device")
        rules.append(pairs)
    return rules


def test_udev_rule_parses_and_covers_every_edge_tpu():
    rules = parse_udev_rules(UDEV_RULES.read_text())
    usb_ids = set()
    for pairs in rules:
        match = {(k, a): v for k, a, op, v in pairs if op == "=="}
        assign = {k: v for k, a, op, v in pairs if op == "="}
        assert assign.get("GROUP") == "fieldnode" and assign.get("MODE") == "0660", pairs
        if ("ATTR", "idVendor") in match:
            usb_ids.add((match[("ATTR", "idVendor")], match[("ATTR", "idProduct")]))
    # The same ids accelerator discovery looks for, before and after libedgetpu loads the firmware.
    assert usb_ids == {("1a6e", "089a"), ("18d1", "9302")}
    assert any(("KERNEL", None, "==", "apex_*") in pairs for pairs in rules)
    # The group the rule names is one sysusers creates.
    assert re.search(r"^u fieldnode ", SYSUSERS.read_text(), re.MULTILINE)


@pytest.mark.parametrize("line, problem", [
    ('SUBSYSTEM=="usb" GROUP="fieldnode"', "missing comma"),
    ('SUBSYSTEM=="usb", GROUP=fieldnode', "not key"),
    ('SUBSYSTEM=="usb", ATTR{idVendor}=="1a6e", GROUP=="fieldnode"', "GROUP cannot be used with =="),
    ('SUBSYSTEM=="usb", ATTRS="1a6e"', "cannot be used with ="),
    ('SUBSYSTEM=="usb", ATTR=="1a6e"', "needs {attribute}"),
    ('SUBSYSTEM=="usb", MODE="rw"', "not an octal mode"),
    ('GROUP="fieldnode", MODE="0660"', "no match"),
])
def test_udev_parser_rejects_bad_rules(line, problem):
    with pytest.raises(ValueError, match=problem):
        parse_udev_rules(line)
