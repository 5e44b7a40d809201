"""``fieldnode provision``: real files in temporary image roots, real keys, real TOML; errors through the real
command line entry (a subprocess), one line each and never a traceback."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import stat
import subprocess
import sys

import pyrage
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from device import config
from device.update import age
from tools import provision
from tests.cleanenv import clean_env

UID, GID = 4242, 4243  # the image's fieldnode user, unknown to this machine
CONF = "etc/fieldnode/fieldnode.toml"
# The console script once tools/cli.py registers provision; until then the same entry with it registered.
ENTRY = ("import sys; from tools import cli\n"
         "if 'provision' not in cli.COMMANDS: cli._lazy('tools.provision', 'provision', 'h')\n"
         "sys.exit(cli.main(sys.argv[1:]))")

COMMENTED = """\
# fieldnode on pole 17 (keep this comment)
[device]
# the id comes from provisioning
id = ""   # set by fieldnode provision
state_dir = "/var/lib/fieldnode"

[runtime]
threads = 1 # a small board

# link settings follow
[link]
broker = "mqtts://broker.example:8883"
ca_file = "/etc/fieldnode/ca.pem"
"""


def call(capsys, *argv: str) -> tuple:
    p = argparse.ArgumentParser(prog="fieldnode provision")
    p.add_argument("--config")
    provision.add_arguments(p)
    code = provision.run(p.parse_args(list(argv)))
    out, err = capsys.readouterr()
    return code, out, err


def cli(*argv: str) -> subprocess.CompletedProcess:
    env = clean_env()
    return subprocess.run([sys.executable, "-c", ENTRY, "provision", *argv], capture_output=True, text=True,
                          env=env, timeout=60, stdin=subprocess.DEVNULL)


def one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    what = f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    assert proc.returncode == code, what
    assert "Traceback" not in proc.stderr + proc.stdout and "[internal]" not in proc.stderr, what
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, what
    for needle in needles:
        assert needle in errors[0], what
    return errors[0]


@pytest.fixture
def image(tmp_path):
    """An image root whose /etc/passwd and /etc/group have the service user (as sysusers would make it)."""
    root = tmp_path / "img"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                     f"fieldnode:x:{UID}:{GID}:fieldnode sensor agent:/var/lib/fieldnode:"
                                     "/usr/sbin/nologin\n")
    (root / "etc/group").write_text(f"root:x:0:\ngpio:x:997:fieldnode\nfieldnode:x:{GID}:\n")
    return root


def files(root) -> dict:
    return {name: root / "etc/fieldnode" / name for name in ("update.age", "client.key", "client.csr")}


def snapshot(root) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- what it makes ------------------------------------------------------------------------------------------------


def test_provision_an_image(image, capsys):
    code, out, err = call(capsys, "--device-id", "pole-17", "--root", str(image), "--json")

    assert (code, err) == (0, "")
    doc = json.loads(out)
    f = files(image)
    for name in ("update.age", "client.key"):
        st = os.stat(f[name])
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, UID, GID), name
    st = os.stat(f["client.csr"])
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_uid == os.geteuid()  # public, not the agent's to change
    assert doc["files"] == {"config": "/" + CONF, "identity": "/etc/fieldnode/update.age",
                            "key": "/etc/fieldnode/client.key", "csr": "/etc/fieldnode/client.csr",
                            "certificate": "/etc/fieldnode/client.pem"}  # the board's paths, not this machine's
    assert (doc["device_id"], doc["owner"], doc["replaced"], doc["warnings"]) == ("pole-17", "fieldnode", False, [])
    assert doc["csr"].encode() == f["client.csr"].read_bytes()
    cfg = config.load(str(image / CONF))
    assert cfg.device.id == "pole-17" and config.device_id(cfg) == "pole-17"
    assert (cfg.link.key_file, cfg.link.cert_file, cfg.update.identity_file) == (
        "/etc/fieldnode/client.key", "/etc/fieldnode/client.pem", "/etc/fieldnode/update.age")
    assert sorted(os.listdir(image / "etc/fieldnode")) == ["client.csr", "client.key", "fieldnode.toml", "update.age"]


def test_the_text_output_names_every_public_part(image, capsys):
    code, out, _ = call(capsys, "--device-id", "pole-17", "--root", str(image))

    assert code == 0
    recipient = age.read_identity_file(str(files(image)["update.age"]))
    assert f"age recipient: {age.recipient_of(recipient[0])}" in out
    assert "TLS client key: /etc/fieldnode/client.key (0600, owner fieldnode)" in out
    assert "install the certificate at /etc/fieldnode/client.pem" in out
    assert "fieldnode repo grant REPO --device pole-17 --recipient age1" in out
    assert out.rstrip().endswith(files(image)["client.csr"].read_text().rstrip())
    assert "AGE-SECRET-KEY" not in out and "PRIVATE KEY" not in out  # never a secret on the terminal


def test_the_csr_verifies_and_carries_the_id(image, capsys):
    assert call(capsys, "--device-id", "pole-17", "--root", str(image))[0] == 0
    f = files(image)

    csr = x509.load_pem_x509_csr(f["client.csr"].read_bytes())
    key = serialization.load_pem_private_key(f["client.key"].read_bytes(), password=None)

    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pole-17"
    assert key.curve.name == "secp256r1"
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert csr.public_key().public_bytes(*raw) == key.public_key().public_bytes(*raw)


def test_the_recipient_opens_what_is_encrypted_to_it(image, capsys):
    code, out, _ = call(capsys, "--device-id", "pole-17", "--root", str(image), "--json")
    assert code == 0
    recipient = json.loads(out)["recipient"]
    payload = b"release key for pole-17\n" * 3

    sealed = pyrage.encrypt(payload, [pyrage.x25519.Recipient.from_str(recipient)])  # another implementation
    identities = age.read_identity_file(str(files(image)["update.age"]))

    assert age.decrypt_bytes(sealed, identities) == payload
    assert files(image)["update.age"].read_text().count(f"# public key: {recipient}\n") == 1


def test_on_the_board_the_keys_go_beside_the_config(tmp_path, capsys):
    """Without --root (a live board; here a config in a temporary directory): no service user on this machine."""
    conf = tmp_path / "fieldnode.toml"

    code, out, err = call(capsys, "--device-id", "bench-1", "--config", str(conf), "--json")

    assert code == 0
    doc = json.loads(out)
    assert doc["files"]["key"] == str(tmp_path / "client.key") and doc["owner"] is None
    assert err.count("\n") == 1 and "user fieldnode does not exist on this board" in err
    assert f"chown fieldnode:fieldnode {tmp_path / 'update.age'} {tmp_path / 'client.key'}" in err
    assert stat.S_IMODE(os.stat(tmp_path / "client.key").st_mode) == 0o600
    assert config.load(str(conf)).link.key_file == str(tmp_path / "client.key")


# -- the config edit ----------------------------------------------------------------------------------------------


def test_the_config_keeps_its_comments_and_values(image, capsys):
    conf = image / CONF
    conf.parent.mkdir(parents=True)
    conf.write_text(COMMENTED)
    conf.chmod(0o640)
    before = config.tomllib.loads(COMMENTED)

    assert call(capsys, "--device-id", "pole-17", "--root", str(image))[0] == 0

    text = conf.read_text()
    diff = list(difflib.ndiff(COMMENTED.splitlines(), text.splitlines()))
    removed = [line[2:] for line in diff if line.startswith("- ")]
    added = [line[2:] for line in diff if line.startswith("+ ")]
    assert removed == ['id = ""   # set by fieldnode provision']  # every other line and comment stays, in order
    assert added == ['id = "pole-17"   # set by fieldnode provision',  # the value changes, its comment stays
                     'key_file = "/etc/fieldnode/client.key"', 'cert_file = "/etc/fieldnode/client.pem"', "",
                     "[update]", 'identity_file = "/etc/fieldnode/update.age"']
    after = config.tomllib.loads(text)
    before["device"]["id"] = "pole-17"
    before["link"].update(key_file="/etc/fieldnode/client.key", cert_file="/etc/fieldnode/client.pem")
    before["update"] = {"identity_file": "/etc/fieldnode/update.age"}
    assert after == before
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640  # the file keeps its mode
    cfg = config.load(str(conf))
    assert (cfg.device.id, cfg.runtime.threads, cfg.link.broker) == ("pole-17", 1, "mqtts://broker.example:8883")


def test_the_default_config_changes_only_the_provisioned_lines(image, capsys):
    conf = image / CONF
    conf.parent.mkdir(parents=True)
    defaults = config.render_toml()
    conf.write_text(defaults)

    assert call(capsys, "--device-id", "pole-17", "--root", str(image))[0] == 0

    changed = [(a, b) for a, b in zip(defaults.splitlines(), conf.read_text().splitlines()) if a != b]
    assert len(defaults.splitlines()) == len(conf.read_text().splitlines())
    assert changed == [('id = ""', 'id = "pole-17"'), ('cert_file = ""', 'cert_file = "/etc/fieldnode/client.pem"'),
                       ('key_file = ""', 'key_file = "/etc/fieldnode/client.key"')]  # identity_file was set


def test_keys_shown_commented_out_are_set_in_their_place(image, capsys):
    """The config fieldnode install writes: every key commented out at its default under its doc."""
    conf = image / CONF
    conf.parent.mkdir(parents=True)
    text = ("# written by fieldnode install\n\n[device]\n# Device id; empty derives it from /etc/machine-id.\n"
            '#id = ""\n# Directory for the state.\n#state_dir = "/var/lib/fieldnode"\n\n[link]\n# Broker URL.\n'
            '#broker = ""\n# Client key.\n#key_file = ""\n\n[update]\n# The identity.\n'
            '#identity_file = "/etc/fieldnode/update.age"\n')
    conf.write_text(text)

    assert call(capsys, "--device-id", "pole-17", "--root", str(image))[0] == 0

    diff = [line for line in difflib.ndiff(text.splitlines(), conf.read_text().splitlines()) if line[0] in "+-"]
    assert diff == ['- #id = ""', '+ id = "pole-17"', '- #key_file = ""', '+ key_file = "/etc/fieldnode/client.key"',
                    '+ cert_file = "/etc/fieldnode/client.pem"',  # not shown: after the table's last statement
                    '- #identity_file = "/etc/fieldnode/update.age"', '+ identity_file = "/etc/fieldnode/update.age"']
    assert config.load(str(conf)).link.cert_file == "/etc/fieldnode/client.pem"


def test_paths_already_in_the_config_are_used(image, capsys):
    conf = image / CONF
    conf.parent.mkdir(parents=True)
    conf.write_text('[link]\nkey_file = "/etc/ssl/private/board.key"\ncert_file = "/etc/ssl/board.pem"\n'
                    '[update]\nidentity_file = "/var/lib/keys/updates.age"\n')

    code, out, _ = call(capsys, "--device-id", "pole-17", "--root", str(image), "--json")

    assert code == 0
    assert json.loads(out)["config_keys_set"] == ["device.id"]
    assert (image / "etc/ssl/private/board.key").is_file() and (image / "etc/ssl/private/board.csr").is_file()
    assert (image / "var/lib/keys/updates.age").is_file()


def test_a_plain_broker_gets_no_tls_keys_in_its_config(image, capsys):
    conf = image / CONF
    conf.parent.mkdir(parents=True)
    conf.write_text('[link]\nbroker = "mqtt://10.0.0.2"\n')

    code, _, err = call(capsys, "--device-id", "pole-17", "--root", str(image))

    assert code == 0
    assert "link.broker is a plain mqtt:// URL" in err
    cfg = config.load(str(conf))  # TLS files with mqtt:// would not load
    assert (cfg.device.id, cfg.link.key_file) == ("pole-17", "")
    assert files(image)["client.key"].is_file()


@pytest.mark.parametrize("text, problem", [
    ('device.id = "old"\n', "is not written as a [device] table"),
    ('device = { id = "old" }\n', "is not written as a [device] table"),
    ("[device]\nid = '''old'''\n", "device.id has a value this edit does not replace"),
])
def test_a_config_it_cannot_edit_safely_is_left_alone(image, text, problem):
    conf = image / CONF
    conf.parent.mkdir(parents=True)
    conf.write_text(text)
    before = snapshot(image)

    proc = cli("--device-id", "pole-17", "--root", str(image))

    one_line_error(proc, 1, "[config_not_editable]", problem, 'set device.id = "pole-17"')
    assert snapshot(image) == before  # no key was made either


def test_set_toml_keys_in_crlf_files_and_quoted_headers():
    text = '["device"]\r\nstate_dir = "/x"\r\n'

    new = provision.set_toml_keys(text, {"device.id": "a-1", "link.key_file": 'C:\\k "q"\x7f'})

    assert new.startswith('["device"]\r\nstate_dir = "/x"\r\nid = "a-1"\r\n')
    assert config.tomllib.loads(new) == {"device": {"state_dir": "/x", "id": "a-1"},
                                          "link": {"key_file": 'C:\\k "q"\x7f'}}


# -- refusals ---------------------------------------------------------------------------------------------------


def test_existing_keys_are_refused_and_force_replaces_them(image, capsys):
    code, out, _ = call(capsys, "--device-id", "pole-17", "--root", str(image), "--json")
    assert code == 0
    first = json.loads(out)
    (image / "etc/fieldnode/client.pem").write_text("the old certificate")
    before = snapshot(image)

    proc = cli("--device-id", "pole-17", "--root", str(image))

    one_line_error(proc, 1, "[keys_exist]", "/etc/fieldnode/update.age", "--force")
    assert snapshot(image) == before

    code, out, err = call(capsys, "--device-id", "pole-18", "--root", str(image), "--force")

    assert code == 0
    assert "new keys replace the old ones" in out and "device id: pole-18 (was pole-17)" in out
    assert "the certificate at /etc/fieldnode/client.pem is for the old key" in err
    assert first["recipient"] not in out
    f = files(image)
    for name in ("update.age", "client.key", "client.csr"):
        assert f[name].read_bytes() != before[f[name].relative_to(image)], name
    assert (os.stat(f["client.key"]).st_uid, stat.S_IMODE(os.stat(f["client.key"]).st_mode)) == (UID, 0o600)
    assert config.load(str(image / CONF)).device.id == "pole-18"


@pytest.mark.parametrize("device_id, problem", [
    ("pole/17", "got 'pole/17'"),
    ("", "expected a device id, got ''"),
    ("x" * 65, "expected 1-64 characters from A-Z, a-z, 0-9, '_' and '-'"),
    ("pole 17", "got 'pole 17'"),
    ("pöle", "got 'pöle'"),
    ("+", "got '+'"),
])
def test_bad_device_ids_exit_2_before_anything_is_written(image, device_id, problem):
    proc = cli("--device-id", device_id, "--root", str(image))

    line = one_line_error(proc, 2, "argument --device-id", problem)
    assert "expected ''" not in line
    assert not (image / "etc/fieldnode").exists()


def test_roots_it_cannot_use(tmp_path):
    missing = cli("--device-id", "pole-17", "--root", str(tmp_path / "nope"))
    one_line_error(missing, 1, "[provision_failed]", "not a directory")

    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "etc").write_text("a file where a directory should be")
    proc = cli("--device-id", "pole-17", "--root", str(blocked))
    one_line_error(proc, 2, "[config_invalid]", "blocked/etc/fieldnode/fieldnode.toml", "Not a directory")

    proc = cli("--device-id", "pole-17", "--root", "/proc/self")  # a file system that takes no files
    one_line_error(proc, 1, "[provision_failed]", "cannot write /proc/self/etc", "nothing was changed")


def test_a_failed_write_leaves_no_key_behind(image):
    conf = image / CONF
    conf.parent.mkdir(parents=True)
    conf.write_text('[link]\nkey_file = "/etc/fieldnode/keys/client.key"\n')
    (image / "etc/fieldnode/keys").write_text("not a directory")  # the identity is written, then the key fails
    before = snapshot(image)

    proc = cli("--device-id", "pole-17", "--root", str(image))

    one_line_error(proc, 1, "[provision_failed]", "nothing was changed")
    assert snapshot(image) == before  # the identity written first is gone again, the config untouched


def test_an_invalid_config_is_reported_not_rewritten(image):
    conf = image / CONF
    conf.parent.mkdir(parents=True)
    conf.write_text("[runtime]\nthreads = 0\n")

    proc = cli("--device-id", "pole-17", "--root", str(image))

    one_line_error(proc, 2, "[config_invalid]", "runtime.threads")
    assert conf.read_text() == "[runtime]\nthreads = 0\n" and not files(image)["update.age"].exists()


def test_a_symlink_out_of_the_image_is_refused(image, tmp_path):
    outside = tmp_path / "host-etc"
    outside.mkdir()
    (image / "etc/fieldnode").symlink_to(outside)  # an absolute link: on this machine it leaves the image

    proc = cli("--device-id", "pole-17", "--root", str(image))

    one_line_error(proc, 1, "[provision_failed]", "outside the image root")
    assert list(outside.iterdir()) == []


def test_with_root_the_config_must_be_the_boards_absolute_path(image):
    proc = cli("--device-id", "pole-17", "--root", str(image), "--config", "fieldnode.toml")

    one_line_error(proc, 1, "--config fieldnode.toml", "absolute")


def test_json_errors_are_one_object(image):
    assert cli("--device-id", "pole-17", "--root", str(image)).returncode == 0

    proc = cli("--device-id", "pole-17", "--root", str(image), "--json")

    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert json.loads(proc.stdout)["error"]["code"] == "keys_exist"


def test_the_identity_file_is_age_keygens_format():
    keys = provision.make_keys("x")

    lines = keys["identity"].decode().splitlines()

    assert len(lines) == 3 and lines[0].startswith("# created: ")
    assert lines[1] == f"# public key: {keys['recipient']}"
    assert age.recipient_of(lines[2]) == keys["recipient"]
