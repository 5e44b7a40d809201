"""What ``diag``, ``config check`` and ``provision`` tell a technician: a config with a typo, a user outside the
group ``fieldnode`` (a real other uid, in a forked child), credentials in URLs in the support bundle, paths
``fieldnode run`` refuses, a board without a config file, and a freshly provisioned board's verdict."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import tarfile
import threading

import pytest

from device import config
from device.diag import runner
from device.diag.checks import FAIL, OK, SKIP, WARN, Context, Who
from device.errors import ConfigError
from tools.diag import cli as diag

pytestmark = pytest.mark.timeout(120)
OTHER_UID, OTHER_GID = 4242, 4243  # a technician's uid, unknown to this machine
TOKEN = "ghp-Sup3rS3cretT0ken"
LIMITED = Who("tech", root=False, service=False, in_group=False)


def parse(argv):
    from device.cliargs import subcommand_parents

    p = argparse.ArgumentParser(prog="fieldnode diag", parents=subcommand_parents())
    diag.add_arguments(p)
    return p.parse_args(argv)


def write(tmp_path, text: str, name: str = "fieldnode.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def base(tmp_path, device: str = "pump-07") -> str:
    return (f'[device]\nid = "{device}"\nstate_dir = "{tmp_path / "state"}"\nruntime_dir = "{tmp_path / "run"}"\n\n'
            f'[link]\ntrust_dir = "{tmp_path / "trust"}"\n')


def serve_status(path: str, status: dict) -> threading.Thread:
    """A control socket that answers one ``status`` request (the line protocol of device/control.py)."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def answer():
        with srv:
            conn, _ = srv.accept()
            with conn:
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
                conn.sendall(json.dumps({"ok": True, "result": status}).encode() + b"\n")

    t = threading.Thread(target=answer, name="test-control", daemon=True)
    t.start()
    return t


def as_other_user(cwd, fn) -> dict:
    """Runs ``fn()`` (returning a JSON-able dict) in a forked child whose uid is another user's, outside every
    group, with ``cwd`` as its working directory (so relative paths reach into the test's private tmp dir).

    ``fn`` runs once in this process first (as root, its result unused): the other user may not read this
    interpreter's library, so whatever ``fn`` imports must be imported before the fork."""
    here = os.getcwd()
    os.chdir(cwd)
    try:
        fn()
    finally:
        os.chdir(here)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(r)
            os.chdir(cwd)
            os.setgroups([])
            os.setgid(OTHER_GID)
            os.setuid(OTHER_UID)
            out = json.dumps(fn()).encode()
            os.write(w, out)
            code = 0
        except BaseException as exc:  # noqa: BLE001 - said to the parent, which fails the test
            os.write(w, json.dumps({"child_error": f"{type(exc).__name__}: {exc}"}).encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        data = os.read(r, 65536)
        if not data:
            break
        chunks.append(data)
    os.close(r)
    os.waitpid(pid, 0)
    doc = json.loads(b"".join(chunks) or b"{}")
    assert "child_error" not in doc, doc
    return doc


# -- 1. a config with a typo ----------------------------------------------------------------------------------------


def test_a_config_typo_still_asks_the_running_agent_and_fails_once(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    path = write(tmp_path, base(tmp_path) + "\n[runtime]\nthreds = 1\n")  # the typo
    t = serve_status(str(tmp_path / "run" / "control.sock"), {"pid": 4711, "device": "pump-07", "faults": {}})
    code = diag.run(parse(["--config", path]), who=Who("root", root=True))
    t.join(10)
    lines = capsys.readouterr().out.splitlines()
    assert "pump-07" in lines[0] and path in lines[0] and "DOES NOT LOAD" in lines[0]
    assert "<defaults>" not in "\n".join(lines)
    fails = [ln for ln in lines if ln.startswith("FAIL ")]
    assert len(fails) == 1 and fails[0].startswith("FAIL config: ") and "runtime.threds" in fails[0]
    assert not [ln for ln in lines if ln.startswith("SKIP") and "config did not load" in ln]
    agent = next(ln for ln in lines if ln.startswith(("OK   agent:", "WARN agent:", "FAIL agent:", "SKIP agent:")))
    assert agent.startswith("OK   agent: the running agent") and "pid 4711" in agent
    assert code != 0


def test_a_config_that_is_not_even_toml_still_names_its_socket(tmp_path):
    path = write(tmp_path, base(tmp_path) + "\n[runtime\nthreads = 1\n")
    cfg = diag.fallback_config(path)
    assert (cfg.device.id, cfg.device.runtime_dir, cfg.source) == ("pump-07", str(tmp_path / "run"), path)
    bad = write(tmp_path, '[device]\nid = "no spaces allowed"\nruntime_dir = ""\n', "bad.toml")
    assert (diag.fallback_config(bad).device.id, diag.fallback_config(bad).device.runtime_dir) == ("", "/run/fieldnode")


# -- 2. a user outside the group fieldnode --------------------------------------------------------------------------


def test_a_limited_user_is_told_up_front_how_to_run_every_check(tmp_path, capsys):
    (tmp_path / "state").mkdir()
    diag.run(parse(["--config", write(tmp_path, base(tmp_path)), "--sim", "rpi4"]), who=LIMITED)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("fieldnode ")
    assert "tech is not in the group fieldnode" in lines[1] and "sudo fieldnode diag" in lines[1]
    assert sum("sudo fieldnode diag" in ln for ln in lines[:2]) == 1


def test_a_member_of_the_group_gets_no_such_line(tmp_path, capsys):
    (tmp_path / "state").mkdir()
    diag.run(parse(["--config", write(tmp_path, base(tmp_path)), "--sim", "rpi4"]),
             who=Who("tech", in_group=True))
    assert "not in the group" not in capsys.readouterr().out


def _limited_setup(tmp_path, *, broker: bool = False):
    """The service's files as a board has them, root-owned: socket 0600 (as the group would be refused), lock
    0644, spool 0600, the serial port 0600; paths relative to ``tmp_path`` (the child's working directory)."""
    os.chmod(tmp_path, 0o711)  # the other user may pass through, not list
    for d in ("state", "run", "state/spool"):
        (tmp_path / d).mkdir()
        os.chmod(tmp_path / d, 0o755)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "run" / "control.sock"))
    sock.listen(1)
    os.chmod(tmp_path / "run" / "control.sock", 0o600)
    for name in ("state/spool/spool.db", "tty"):
        (tmp_path / name).write_bytes(b"")
        os.chmod(tmp_path / name, 0o600)
    link = {"trust_dir": "trust", **({"broker": "mqtt://127.0.0.1:1"} if broker else {})}
    cfg = config.from_mapping({"device": {"id": "pump-07", "state_dir": "state", "runtime_dir": "run"},
                               "drivers": {"sensor_url": "tty"}, "link": link})
    return sock, cfg


def test_a_refused_control_socket_is_never_a_hung_agent(tmp_path):
    from device.agent.statelock import StateLock
    from device.diag import link

    sock, cfg = _limited_setup(tmp_path)
    with sock, StateLock(str(tmp_path / "state")):  # an agent holds the state directory
        def child():
            ctx = Context(cfg, sim=None, deadline=__import__("time").monotonic() + 10, sample_s=0.2)
            c = link.check_agent(ctx)
            return {"who": dataclasses.asdict(ctx.who), "check": c.to_dict()}

        doc = as_other_user(str(tmp_path), child)
    assert doc["who"]["root"] is False and doc["who"]["in_group"] is False  # the real decision, not injected
    c = doc["check"]
    assert c["status"] == SKIP and "refuses" in c["detail"] and "sudo fieldnode diag" in c["detail"], c
    assert "hung" not in json.dumps(c) and "restart" not in json.dumps(c)


def test_the_sensor_and_the_spool_are_the_persons_permission_not_the_services(tmp_path):
    from device.diag import board, link

    sock, cfg = _limited_setup(tmp_path, broker=True)
    with sock:
        def child():
            import time

            ctx = Context(cfg, sim=None, deadline=time.monotonic() + 10, sample_s=0.2)
            return {"sensor": board.check_sensor(ctx).to_dict(), "spool": link.check_spool(ctx).to_dict()}

        doc = as_other_user(str(tmp_path), child)
    for name in ("sensor", "spool"):
        c = doc[name]
        assert c["status"] == SKIP, c
        assert "not of the service" in c["detail"] or "not a fault of the service" in c["detail"], c
        assert "sudo fieldnode diag" in c["detail"] and "dialout group" not in c["remedy"], c


# -- 3. credentials in URLs in the support bundle -------------------------------------------------------------------


def bundle(path) -> dict:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def test_the_bundle_redacts_the_userinfo_of_every_url(tmp_path, capsys):
    root = tmp_path / "1.root.json"
    root.write_text("{}")
    path = write(tmp_path, base(tmp_path) + f'\n[update]\nroot_file = "{root}"\n'
                 f'repository = "https://fleet:{TOKEN}@updates.example/fleet/"\n')
    out = tmp_path / "b.tar.gz"
    diag.run(parse(["--config", path, "--report", str(out), "--json"]), who=Who("root", root=True))
    capsys.readouterr()
    members = bundle(out)
    assert {n.split("/", 1)[1] for n in members} >= {"config.json", "config.toml"}
    assert all(n.startswith("fieldnode-diag-pump-07-") for n in members)
    text = "\n".join(members.values())
    assert TOKEN not in text and "fleet:" not in text
    assert "https://<redacted>@updates.example/fleet/" in members[next(n for n in members if n.endswith("config.toml"))]
    # The loader refuses credentials in update.repository, so config.json is what diag fell back on; the raw
    # file's text (config.toml), the config check's message (diag.txt) and every other member are redacted.


def test_a_config_that_does_not_load_is_redacted_as_raw_text_and_names_the_bundle(tmp_path, capsys, monkeypatch):
    path = write(tmp_path, base(tmp_path, "pole-17").replace(
        "[link]\n", f'[link]\nbroker = "mqtts://pole:{TOKEN}@broker.example:8883"\nbrokr = 1\n'))
    with pytest.raises(ConfigError):
        config.load(path)
    monkeypatch.chdir(tmp_path)
    diag.run(parse(["--config", path, "--report"]), who=Who("root", root=True))
    printed = capsys.readouterr().out
    [name] = [p.name for p in tmp_path.glob("fieldnode-diag-*.tar.gz")]
    assert name.startswith("fieldnode-diag-pole-17-") and name in printed
    members = bundle(tmp_path / name)
    assert all(n.startswith("fieldnode-diag-pole-17-") for n in members)
    text = "\n".join(members.values())
    assert TOKEN not in text and "mqtts://<redacted>@broker.example:8883" in text


def test_redact_urls_keeps_what_is_not_userinfo():
    from tools.diag.report import redact_urls

    assert redact_urls('a = "mqtts://broker:8883/x@y"') == 'a = "mqtts://broker:8883/x@y"'
    assert redact_urls("got 'https://u:p@h/'; mail me@example.org") == "got 'https://<redacted>@h/'; mail me@example.org"
    assert redact_urls("file:///media/usb/repo") == "file:///media/usb/repo"


# -- 4. what run refuses, config check and diag refuse -------------------------------------------------------------


def refused_by_all_three(tmp_path, capsys, path: str, key: str, *words: str) -> None:
    from tools import cli

    cfg = config.load(path)
    with pytest.raises(ConfigError) as exc:
        config.check_agent(cfg)  # what fieldnode run calls before it opens anything
    assert exc.value.key_path == key and all(w in str(exc.value) for w in words), exc.value
    code = cli.main(["--config", path, "config", "check"])
    err = capsys.readouterr().err
    assert code != 0 and key in err and all(w in err for w in words), err
    diag.run(parse(["--config", path, "--sim", "rpi4", "--json"]), who=Who("root", root=True))
    c = next(c for c in json.loads(capsys.readouterr().out)["checks"] if c["name"] == "config")
    assert c["status"] == FAIL and key in c["detail"] and all(w in c["detail"] for w in words), c


def test_a_state_dir_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "notadir").write_text("x")
    text = base(tmp_path).replace(str(tmp_path / "state"), str(tmp_path / "notadir" / "state"))
    path = write(tmp_path, text + '\n[drivers]\nsensor_url = "/dev/ttyAMA0"\n')
    refused_by_all_three(tmp_path, capsys, path, "device.state_dir", "is a file, not a directory")


def test_a_missing_update_root_is_refused(tmp_path, capsys):
    path = write(tmp_path, base(tmp_path) + f'\n[drivers]\nsensor_url = "/dev/ttyAMA0"\n\n[update]\n'
                 f'root_file = "{tmp_path / "1.root.json"}"\nrepository = "https://updates.example/fleet/"\n')
    refused_by_all_three(tmp_path, capsys, path, "update.root_file", "does not exist", "1.root.json")


def test_a_state_dir_the_service_user_cannot_write_is_refused_with_the_chown(tmp_path):
    from device.configfiles import Identity

    state = tmp_path / "state"
    state.mkdir(mode=0o755)  # root's, as a copy made by hand would be
    cfg = config.from_mapping({"device": {"state_dir": str(state)}, "drivers": {"sensor_url": "/dev/ttyAMA0"}})
    service = Identity("fieldnode", OTHER_UID, (OTHER_GID,))
    with pytest.raises(ConfigError) as exc:
        config.check_agent(cfg, service)
    assert exc.value.key_path == "device.state_dir" and f"chown fieldnode: {state}" in str(exc.value)
    os.chown(state, OTHER_UID, OTHER_GID)
    config.check_agent(cfg, service)  # the service's own: fine
    os.chown(state, 0, OTHER_GID)
    os.chmod(state, 0o775)
    config.check_agent(cfg, service)  # writable by its group: fine


def test_a_state_dir_that_does_not_exist_yet_is_fine(tmp_path):
    from device.configfiles import Identity

    cfg = config.from_mapping({"device": {"state_dir": str(tmp_path / "a" / "b")},
                               "drivers": {"sensor_url": "/dev/ttyAMA0"}})
    assert config.agent_problems(cfg, Identity("fieldnode", OTHER_UID, (OTHER_GID,))) == []


def test_the_state_dir_is_checked_as_the_process_that_runs(tmp_path):
    """``fieldnode run`` as the service user (here: another uid, in a forked child) on a root-owned directory."""
    os.chmod(tmp_path, 0o711)
    (tmp_path / "state").mkdir(mode=0o755)
    cfg = config.from_mapping({"device": {"state_dir": "state"}, "drivers": {"sensor_url": "/dev/ttyAMA0"}})
    doc = as_other_user(str(tmp_path), lambda: {"problems": config.agent_problems(cfg)})
    [[key, message]] = doc["problems"]
    assert key == "device.state_dir" and "not writable" in message and "chown" in message


# -- 5. no config file ------------------------------------------------------------------------------------------------


@pytest.fixture
def no_config_file(tmp_path, monkeypatch):
    missing = tmp_path / "etc" / "fieldnode.toml"
    monkeypatch.setattr(config, "DEFAULT_PATH", str(missing))
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    return str(missing)


def test_without_a_config_file_the_first_line_says_so(no_config_file, capsys):
    from tools import cli

    assert cli.main(["config", "show"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines()[0] == f"no config file at {no_config_file}: the defaults are used"
    assert json.loads(out)["source"] == config.DEFAULTS_SOURCE  # stdout stays JSON
    cfg = dataclasses.replace(config.from_mapping({"device": {"id": "pump-07"}}), source=config.DEFAULTS_SOURCE)
    head = diag.header(cfg, None, None)
    assert f"no config file at {no_config_file}: the defaults are used" in head and "<defaults>" not in head


# -- 6. a freshly provisioned board passes ----------------------------------------------------------------------------


def test_a_freshly_provisioned_virtual_board_passes(tmp_path, capsys, monkeypatch):
    import functools

    from device.diag import config as diag_config
    from tools import provision

    monkeypatch.setattr(diag, "run_checks", functools.partial(runner.run_checks, budget_s=120.0))
    monkeypatch.setattr(diag_config, "clock_synced", lambda timeout: (True, "the test's clock"))  # the host's NTP
    path = write(tmp_path, base(tmp_path) + '\n[drivers]\nvirtual_board = "rpi4"\n')
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    provision.add_arguments(p)
    assert provision.run(p.parse_args(["--device-id", "pump-07", "--config", path])) == 0
    capsys.readouterr()
    code = diag.run(parse(["--config", path, "--sim", "rpi4", "--json"]), who=Who("root", root=True))
    out = json.loads(capsys.readouterr().out)
    by = {c["name"]: c for c in out["checks"]}
    host = {"service", "disk"}  # this machine's systemd and disk, not the board's
    bad = {n: c for n, c in by.items() if c["status"] in (WARN, FAIL) and n not in host
           and not (n == "sensor" and " 0 CRC errors, 0 gaps" in c["detail"])}  # a loaded machine's slow pty
    assert bad == {}
    assert by["trust"]["status"] == SKIP and by["certificate"]["status"] == SKIP
    if all(c["status"] in (OK, SKIP) for c in out["checks"]):
        assert code == 0
