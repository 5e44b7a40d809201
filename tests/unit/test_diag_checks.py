"""The diag checks one by one, each against the real thing: files with real modes, certificates made with
``cryptography``, a real mosquitto with TLS, real serial ports and sockets, a real spool file, a real control
socket and state lock."""

from __future__ import annotations

import datetime
import os
import pathlib
import socket
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device import config
from device.configfiles import service_user
from device.diag.checks import FAIL, OK, SKIP, WARN, Context

pytestmark = pytest.mark.timeout(60)

SERVICE = service_user()  # the agent's user as the suite names it (tests/conftest.py)


def make_cfg(tmp_path: pathlib.Path, **sections) -> config.Config:
    """A config whose state and runtime directories are the test's own (never the board's defaults)."""
    data = {"device": {"state_dir": str(tmp_path / "state"), "runtime_dir": str(tmp_path / "run"), "id": "dev-a"},
            "link": {"trust_dir": str(tmp_path / "trust")}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config.from_mapping(data, source=str(tmp_path / "fieldnode.toml"))


def ctx_for(cfg, *, sim=None, seconds: float = 10.0, sample_s: float = 0.5) -> Context:
    return Context(cfg, sim=sim, deadline=time.monotonic() + seconds, sample_s=sample_s)


def write_cert(directory: pathlib.Path, cn: str, *, days_left: float, stem: str = "client") -> tuple[str, str]:
    """A self-signed certificate that expires ``days_left`` days from now (negative: already expired)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    after = now + datetime.timedelta(days=days_left)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(min(now, after) - datetime.timedelta(days=365)).not_valid_after(after)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return str(cert_path), str(key_path)


# ------------------------------------------------------------------------------------------------- config


def test_config_check_gives_the_message_fieldnode_run_gives(tmp_path, capsys):
    from tools import cli
    from device.diag.config import check_config

    path = tmp_path / "fieldnode.toml"
    path.write_text(f'[device]\nstate_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n')
    cfg = config.load(str(path))  # loads: only fieldnode run refuses it (no sensor)
    c = check_config(ctx_for(cfg))
    assert c.status == FAIL and "drivers.sensor_url" in c.detail and "drivers.sensor_url" in c.remedy
    assert cli.main(["--config", str(path), "run"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"fieldnode run: error [config_invalid]: {c.detail}"


def test_config_check_refuses_what_the_power_policy_refuses(tmp_path):
    from device.diag.config import check_config

    cfg = make_cfg(tmp_path, drivers={"sensor_url": "loop://"})
    c = check_config(ctx_for(cfg))
    assert c.status == OK and "valid" in c.detail


# --------------------------------------------------------------------------------------------------- keys


def test_world_readable_key_fails_with_a_chmod_remedy(tmp_path):
    from device.diag.config import check_keys

    cert, key = write_cert(tmp_path, "dev-a", days_left=365)
    ca, _ = write_cert(tmp_path, "ca", days_left=365, stem="ca")
    cfg = make_cfg(tmp_path, link={"broker": "mqtts://127.0.0.1:8883", "ca_file": ca, "cert_file": cert,
                                   "key_file": key})
    assert check_keys(ctx_for(cfg)).status == OK
    os.chmod(key, 0o644)
    c = check_keys(ctx_for(cfg))
    assert c.status == FAIL and "0644" in c.detail and c.remedy == f"chown {SERVICE}:{SERVICE} {key} && chmod 600 {key}"
    os.chmod(key, 0o660)
    c = check_keys(ctx_for(cfg))
    assert c.status == WARN and "0660" in c.detail and "chmod 600" in c.remedy
    os.chmod(key, 0o640)  # the fieldnode group is the technicians': a key it can read is theirs too
    c = check_keys(ctx_for(cfg))
    assert c.status == WARN and "0640" in c.detail and "technicians" in c.detail and "chmod 600" in c.remedy


def test_a_key_the_agents_user_does_not_own_fails(tmp_path):
    import pwd

    from device.diag.checks import file_mode_problem

    key = tmp_path / "client.key"
    key.write_text("secret")
    os.chmod(key, 0o600)
    other = pwd.getpwnam("nobody")  # stands for the service user: the file is ours, not its
    assert os.stat(key).st_uid != other.pw_uid
    c = file_mode_problem(str(key), "TLS client key", "link.key_file", agent_user="nobody")
    assert c.status == FAIL and "not the agent's user nobody" in c.detail and c.remedy.startswith("chown nobody:nobody ")
    os.chown(key, other.pw_uid, -1)
    assert file_mode_problem(str(key), "TLS client key", "link.key_file", agent_user="nobody") is None


def test_missing_password_file_fails_and_no_key_files_is_a_skip(tmp_path):
    from device.diag.config import check_keys

    assert check_keys(ctx_for(make_cfg(tmp_path))).status == SKIP
    missing = tmp_path / "nope" / "password"
    cfg = make_cfg(tmp_path, link={"broker": "mqtt://127.0.0.1:1883", "password_file": str(missing),
                                   "username": "u"})
    c = check_keys(ctx_for(cfg))
    assert c.status == FAIL and str(missing) in c.detail and "link.password_file" in c.remedy


# ------------------------------------------------------------------------------------------- certificate


@pytest.mark.parametrize("days, status, words", [(400, OK, "valid until"), (10, WARN, "in 10 days"),
                                                 (-3, FAIL, "expired")])
def test_certificate_expiry(tmp_path, days, status, words):
    from device.diag.config import check_certificate

    cert, key = write_cert(tmp_path, "dev-a", days_left=days + 0.5)
    ca, _ = write_cert(tmp_path, "ca", days_left=3650, stem="ca")
    cfg = make_cfg(tmp_path, link={"broker": "mqtts://127.0.0.1:8883", "ca_file": ca, "cert_file": cert,
                                   "key_file": key})
    c = check_certificate(ctx_for(cfg))
    assert c.status == status and words in c.detail, c
    assert bool(c.remedy) == (status != OK)


def test_certificate_for_another_device_warns(tmp_path):
    from device.diag.config import check_certificate

    cert, key = write_cert(tmp_path, "dev-b", days_left=400)
    ca, _ = write_cert(tmp_path, "ca", days_left=3650, stem="ca")
    cfg = make_cfg(tmp_path, link={"broker": "mqtts://127.0.0.1:8883", "ca_file": ca, "cert_file": cert,
                                   "key_file": key})
    c = check_certificate(ctx_for(cfg))
    assert c.status == WARN and "'dev-b'" in c.detail and "dev-a" in c.remedy


# ------------------------------------------------------------------------------------------------- broker


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    from tests.link.broker import Broker
    from tests.link.certs import make_pki

    pki = make_pki(tmp_path_factory.mktemp("pki"), clients=("dev-a",))
    broker = Broker(tmp_path_factory.mktemp("broker"), "tls", pki=pki).start()
    try:
        yield broker
    finally:
        broker.stop()


def test_broker_tls_handshake_and_connect(tmp_path, tls_broker):
    from device.diag.link import check_broker

    cert, key = tls_broker.pki.client("dev-a")
    cfg = make_cfg(tmp_path, link={"broker": tls_broker.url, "ca_file": str(tls_broker.pki.ca),
                                   "cert_file": str(cert), "key_file": str(key)})
    c = check_broker(ctx_for(cfg))
    assert c.status == OK and "TLS handshake" in c.detail and "client certificate" in c.detail, c


def test_broker_with_a_foreign_ca_fails_on_the_handshake(tmp_path, tls_broker):
    from device.diag.link import check_broker

    cert, key = tls_broker.pki.client("dev-a")
    cfg = make_cfg(tmp_path, link={"broker": tls_broker.url, "ca_file": str(tls_broker.pki.untrusted.cert_path),
                                   "cert_file": str(cert), "key_file": str(key)})
    c = check_broker(ctx_for(cfg))
    assert c.status == FAIL and "certificate verify failed" in c.detail.lower(), c
    assert "link.ca_file" in c.remedy


def test_broker_port_with_nothing_listening_fails(tmp_path):
    from tests.link.broker import free_port
    from device.diag.link import check_broker

    port = free_port()
    c = check_broker(ctx_for(make_cfg(tmp_path, link={"broker": f"mqtt://127.0.0.1:{port}"})))
    assert c.status == FAIL and "refused" in c.detail.lower()
    assert c.remedy.startswith(f"nothing listens on 127.0.0.1:{port}")


def test_no_broker_is_a_skip(tmp_path):
    from device.diag.link import check_broker, check_spool

    cfg = make_cfg(tmp_path)
    assert check_broker(ctx_for(cfg)).status == SKIP
    assert check_spool(ctx_for(cfg)).status == SKIP


# ------------------------------------------------------------------------------------------------- sensor


def test_sensor_port_that_does_not_exist_fails(tmp_path):
    from device.diag.board import check_sensor

    port = tmp_path / "ttyUSB9"
    c = check_sensor(ctx_for(make_cfg(tmp_path, drivers={"sensor_url": str(port)})))
    assert c.status == FAIL and str(port) in c.detail
    assert "drivers.sensor_url" in c.remedy and "cable" in c.remedy


def test_sensor_port_without_frames_fails(tmp_path):
    from device.diag.board import check_sensor

    c = check_sensor(ctx_for(make_cfg(tmp_path, drivers={"sensor_url": "loop://"}), sample_s=0.3))
    assert c.status == FAIL and "no frame arrived" in c.detail and "baud" in c.remedy


def test_sensor_with_corrupted_frames_warns(tmp_path):
    """A real pty from the simulated MCU with bit flips injected: the driver counts the CRC errors."""
    from drivers.sim.mcu import Fault, FaultKind, SimulatedMcu
    from device.diag.board import judge_sample, sample_sensor

    mcu = SimulatedMcu(seed=3, faults=[Fault(200, FaultKind.CORRUPT, 5)])
    try:
        mcu.start()
        h, seconds = sample_sensor(mcu.port, 921600, 1.0, 0.6)
    finally:
        mcu.close()
    assert h.crc_errors >= 2
    c = judge_sample(h, seconds, mcu.port)
    assert c.status == WARN and "CRC" in c.detail and "wiring" in c.remedy


# --------------------------------------------------------------------------------------------- no hardware


def test_absent_hardware_is_skipped_not_simulated(tmp_path):
    from device.diag.board import (check_accelerators, check_battery, check_cpufreq, check_thermal,
                                         check_throttle)

    root = tmp_path / "emptyroot"
    root.mkdir()
    ctx = ctx_for(make_cfg(tmp_path, drivers={"sysfs_root": str(root)}))
    for check in (check_thermal, check_battery, check_throttle, check_cpufreq):
        c = check(ctx)
        assert c.status == SKIP and "SIMULATED" not in c.detail, c
    assert "SIMULATED" not in check_accelerators(ctx).detail


def test_simulated_board_says_so(tmp_path):
    from device.diag.board import check_cpufreq, check_thermal, check_throttle

    ctx = ctx_for(make_cfg(tmp_path), sim="rpi4")
    try:
        for check in (check_thermal, check_throttle, check_cpufreq):
            c = check(ctx)
            assert c.status == OK and c.detail.startswith("SIMULATED board rpi4"), c
    finally:
        ctx.close()


def test_firmware_under_voltage_fails(tmp_path):
    from drivers.sim.board import FIRMWARE_THROTTLE
    from device.diag.board import check_throttle

    root = tmp_path / "root"
    node = root / FIRMWARE_THROTTLE
    node.parent.mkdir(parents=True)
    node.write_text("50005\n")  # under-voltage and throttled now, both also since boot
    c = check_throttle(ctx_for(make_cfg(tmp_path, drivers={"sysfs_root": str(root)})))
    assert c.status == FAIL and "under-voltage now" in c.detail and "power supply" in c.remedy


# ------------------------------------------------------------------------------------------ files of state


def test_trust_directory_writable_by_everyone_fails(tmp_path):
    from device.diag.config import check_trust

    trust = tmp_path / "trust"
    trust.mkdir()
    cfg = make_cfg(tmp_path, link={"broker": "mqtt://127.0.0.1:1883"})
    c = check_trust(ctx_for(cfg))
    assert c.status == WARN and "no operator keys" in c.detail
    os.chmod(trust, 0o777)
    c = check_trust(ctx_for(cfg))
    assert c.status == FAIL and "writable by every user" in c.detail and "chmod o-w" in c.remedy


def test_spool_read_offline_reports_backlog_and_drops(tmp_path):
    from device.link.spool.spool import Spool
    from device.link.spool.db import Kind
    from device.diag.link import check_spool

    class Past:  # the puts happened long ago: expired at the next commit
        def monotonic(self):
            return time.monotonic()

        def time(self):
            return time.time() - 1000.0

        def sleep(self, s):
            time.sleep(s)

    path = str(tmp_path / "state" / "spool" / "spool.db")
    with Spool(path, clock=Past()) as old:
        for i in range(3):
            old.put(Kind.RESULT, "t/results", b"x" * 10)
        old.flush()
    cfg = make_cfg(tmp_path, link={"broker": "mqtt://127.0.0.1:1883"})
    c = check_spool(ctx_for(cfg))
    assert c.status == OK and "3 message(s) waiting" in c.detail and "read from the file" in c.detail, c
    with Spool(path, max_age_s=10.0) as new:  # opening at the real time: the old rows expire on commit
        new.put(Kind.EVENT, "t/events", b"{}")
        new.flush()
    c = check_spool(ctx_for(cfg))
    assert c.status == WARN and "3 message(s) dropped (result 3)" in c.detail and "spool_max" in c.remedy, c


def test_damaged_update_slot_fails(tmp_path):
    import shutil

    from device.runtime.manifest import bundled_model_dir
    from device.update.store.store import ModelStore
    from device.diag.config import check_update_store

    state = tmp_path / "state"
    store = ModelStore.for_state_dir(str(state))
    staging = store.begin("vibration", 7)
    shutil.copytree(bundled_model_dir(), staging.dir, dirs_exist_ok=True)
    info = store.activate(staging)
    cfg = make_cfg(tmp_path)
    c = check_update_store(ctx_for(cfg))
    assert c.status == OK and "vibration v7" in c.detail
    with open(os.path.join(info.dir, "vibration_lite.tflite"), "ab") as f:
        f.write(b"\0")
    c = check_update_store(ctx_for(cfg))
    assert c.status == FAIL and "vibration_lite.tflite" in c.detail and "rollback" in c.remedy


# -------------------------------------------------------------------------------------------------- agent


def status_registry(status):
    """The control socket's commands in these tests: ``status`` answering ``status()``."""
    from device.link.commands import Registry

    reg = Registry()
    reg.register("status", lambda args, ctx: status(), local=True)
    return reg


def test_agent_answering_on_its_socket(tmp_path):
    from device.agent.controlserver import ControlServer
    from device.control import socket_path
    from device.diag.link import check_agent

    cfg = make_cfg(tmp_path)
    status = {"device": "dev-a", "runtime": {"variant": "full"}, "governor": {"level": "balanced"},
              "sensor": {"state": "ok"}, "faults": {}}
    with ControlServer(socket_path(cfg), status_registry(lambda: status)):
        c = check_agent(ctx_for(cfg))
        assert c.status == OK and "variant full" in c.detail and "level balanced" in c.detail, c
        status["faults"] = {"sensor": {"problem": "no frame for 12 s"}}
        c = check_agent(ctx_for(cfg))
        assert c.status == WARN and "no frame for 12 s" in c.detail


def test_agent_holding_the_state_dir_but_silent_fails(tmp_path):
    from device.agent.statelock import StateLock
    from device.diag.link import check_agent

    cfg = make_cfg(tmp_path)
    assert check_agent(ctx_for(cfg)).status == WARN  # nobody runs
    assert check_agent(ctx_for(cfg, sim="rpi4")).status == SKIP  # a simulated diagnosis needs none
    with StateLock(cfg.device.state_dir):
        c = check_agent(ctx_for(cfg))
    assert c.status == FAIL and f"pid {os.getpid()}" in c.detail and "restart" in c.remedy


def test_socket_that_hangs_is_bounded(tmp_path):
    """Something listens on the control socket and never answers: the check ends within its budget."""
    from device.control import socket_path
    from device.diag.link import check_agent

    cfg = make_cfg(tmp_path)
    path = socket_path(cfg)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen(1)
        c = check_agent(ctx_for(cfg, seconds=0.5))
    assert c.status == WARN and "no agent runs" in c.detail


def test_clock_before_the_build_fails(tmp_path):
    """A board without an RTC boots in 1970 (the clock seam stands for it)."""
    from device.diag.config import build_floor, check_clock

    class Unset:
        def time(self):
            return 86400.0 * 3

    c = check_clock(Context(make_cfg(tmp_path), sim=None, deadline=time.monotonic() + 5, sample_s=0.1,
                            clock=Unset()))
    assert c.status == FAIL and "1970-01-04" in c.detail and "before this fieldnode was built" in c.detail
    assert "NTP" in c.remedy
    assert check_clock(ctx_for(make_cfg(tmp_path))).status in (OK, WARN, SKIP)
    assert build_floor() <= time.time()


def test_battery_nearly_empty_warns(tmp_path):
    from drivers.sim.board import VirtualBoard
    from device.diag.board import check_battery

    board = VirtualBoard(str(tmp_path / "board"), "rpi4", battery_mah=5000.0, soc_pct=4.0, mains=False)
    c = check_battery(ctx_for(make_cfg(tmp_path, drivers={"sysfs_root": board.root})))
    assert c.status == WARN and "nearly empty" in c.detail and "4 %" in c.detail and "mains" in c.remedy
    board.plug(True)
    c = check_battery(ctx_for(make_cfg(tmp_path, drivers={"sysfs_root": board.root})))
    assert c.status == OK, c


def test_latency_against_the_recorded_baseline(tmp_path):
    import json

    from device.runtime.manifest import bundled_model_dir
    from device.diag.model import BASELINE_FILE, _latency

    cfg = make_cfg(tmp_path)
    os.makedirs(cfg.device.state_dir)
    first = _latency(ctx_for(cfg), bundled_model_dir())
    assert first.status == OK and "recorded as this board's baseline" in first.detail
    path = os.path.join(cfg.device.state_dir, BASELINE_FILE)

    def scale_baseline(factor):  # no timing is compared with another: the recorded baseline is moved far off
        with open(path) as f:
            data = json.load(f)
        for entry in data.values():
            entry["p50_ms"] *= factor
        with open(path, "w") as f:
            json.dump(data, f)

    scale_baseline(100.0)  # as if the board had once been a hundred times slower
    again = _latency(ctx_for(cfg), bundled_model_dir())
    assert again.status == OK and "(baseline " in again.detail
    scale_baseline(1 / 10000.0)  # as if it had once been a hundred times faster
    slow = _latency(ctx_for(cfg), bundled_model_dir())
    assert slow.status == WARN and "x the baseline" in slow.detail and "throttle" in slow.remedy, slow


@pytest.mark.parametrize("fallback, status", [(False, FAIL), (True, WARN)])
def test_explicit_edgetpu_that_does_not_load(tmp_path, fallback, status):
    """No libedgetpu on this machine: the real loader, in its child process, says so."""
    from device.diag.model import check_delegates

    cfg = make_cfg(tmp_path, runtime={"delegate": "edgetpu", "delegate_fallback": fallback})
    c = check_delegates(ctx_for(cfg))
    assert c.status == status and "libedgetpu.so.1" in c.detail and "libedgetpu" in c.remedy, c


def test_sensor_held_by_the_agent_is_read_from_its_status(tmp_path):
    from device.agent.controlserver import ControlServer
    from device.control import socket_path
    from device.diag.board import check_sensor

    cfg = make_cfg(tmp_path, drivers={"sensor_url": "/dev/ttyAMA0"})
    health = {"state": "disconnected", "frames": 0, "crc_errors": 0, "seq_gaps": 0, "reconnects": 0,
              "last_error": "cannot open /dev/ttyAMA0: [Errno 13] Permission denied"}
    with ControlServer(socket_path(cfg), status_registry(lambda: {"sensor": health})):
        c = check_sensor(ctx_for(cfg))
        assert c.status == FAIL and "held by the agent" in c.detail and "dialout" in c.remedy, c
        health.update(state="ok", frames=5000, last_error=None)
        assert check_sensor(ctx_for(cfg)).status == OK


def test_a_real_running_agent_answers(tmp_path):
    """fieldnode run --sim as a process of its own: diag finds it by its state lock and its control socket."""
    import subprocess
    import sys

    from device.diag.link import check_agent

    path = tmp_path / "fieldnode.toml"
    path.write_text(f'[device]\nid = "dev-a"\nstate_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n')
    cfg = config.load(str(path))
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "--config", str(path), "run", "--sim", "--seconds",
                             "40"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        c = check_agent(ctx_for(cfg))
        while c.status != OK and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            c = check_agent(ctx_for(cfg))
        assert c.status == OK, (c, proc.poll())
        assert f"pid {proc.pid}" in c.detail and "device dev-a" in c.detail and "SIMULATED" in c.detail
    finally:
        proc.terminate()
        proc.wait(20)
