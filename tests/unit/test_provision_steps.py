"""``fieldnode provision``: the next steps name what the config still lacks, ``--renew`` makes a certificate request
from the existing key without re-keying, and ``--config`` keeps every file beside the config unless the config
names another place."""

from __future__ import annotations

import json
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from device import config
from device.errors import UsageError
from tests.unit.test_provision import call, cli  # noqa: F401 - one copy of the two ways to run provision
from tools import provision

pytestmark = pytest.mark.timeout(120)
SPKI = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo


def conf(tmp_path, text: str = "") -> str:
    path = tmp_path / "fieldnode.toml"
    path.write_text(text)
    return str(path)


# -- what the config still lacks --------------------------------------------------------------------------------------


def test_next_steps_name_the_sensor_and_the_broker_the_config_lacks(tmp_path, capsys):
    code, out, _err = call(capsys, "--device-id", "pole-17", "--config", conf(tmp_path))
    assert code == 0
    steps = out[out.index("next:"):].splitlines()
    assert steps[1].startswith("  1. set drivers.sensor_url in ") and "/dev/ttyAMA0" in steps[1]
    assert steps[2].startswith("  2. set link.broker in ") and steps[3].startswith("  3. set link.ca_file in ")
    assert "sign the request" in steps[4]


def test_next_steps_name_the_ca_a_tls_broker_still_lacks(tmp_path, capsys):
    path = conf(tmp_path, f'[drivers]\nsensor_url = "/dev/ttyAMA0"\n\n[link]\nbroker = "mqtts://broker.example:8883"\n'
                          f'ca_file = "{tmp_path / "fleet-ca.pem"}"\n')
    code, out, _err = call(capsys, "--device-id", "pole-17", "--config", path, "--json")
    assert code == 0 and json.loads(out)["config_lacks"] == ["link.ca_file"]


def test_a_complete_config_lacks_nothing(tmp_path, capsys):
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    path = conf(tmp_path, f'[drivers]\nvirtual_board = "rpi4"\n\n[link]\nbroker = "mqtts://b.example:8883"\n'
                          f'ca_file = "{ca}"\n')
    code, out, _err = call(capsys, "--device-id", "pole-17", "--config", path, "--json")
    assert code == 0 and json.loads(out)["config_lacks"] == []


# -- --renew ----------------------------------------------------------------------------------------------------------


def test_renew_keeps_the_key_and_the_update_identity(tmp_path, capsys):
    path = conf(tmp_path)
    assert call(capsys, "--device-id", "pole-17", "--config", path)[0] == 0
    kept = {n: (tmp_path / n).read_bytes() for n in ("update.age", "client.key", "client.csr", "fieldnode.toml")}

    code, out, err = call(capsys, "--renew", "--config", path, "--json")  # the id is the config's
    doc = json.loads(out)
    assert (code, err, doc["renewed"], doc["csr_reused"], doc["device_id"]) == (0, "", True, True, "pole-17")
    assert {n: (tmp_path / n).read_bytes() for n in kept} == kept  # nothing changed: the request still fits

    (tmp_path / "client.csr").unlink()
    code, out, _err = call(capsys, "--renew", "--config", path)
    assert code == 0 and "a new request" in out and "kept: the TLS key" in out
    csr = x509.load_pem_x509_csr((tmp_path / "client.csr").read_bytes())
    key = serialization.load_pem_private_key(kept["client.key"], password=None)
    assert csr.public_key().public_bytes(*SPKI) == key.public_key().public_bytes(*SPKI)
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pole-17"
    for n in ("update.age", "client.key", "fieldnode.toml"):
        assert (tmp_path / n).read_bytes() == kept[n], n


def test_renew_replaces_a_request_for_another_key(tmp_path, capsys):
    path = conf(tmp_path)
    assert call(capsys, "--device-id", "pole-17", "--config", path)[0] == 0
    (tmp_path / "client.csr").write_bytes(provision.make_keys("pole-17")["csr"])  # another key's request
    code, out, _err = call(capsys, "--renew", "--config", path, "--json")
    assert code == 0 and json.loads(out)["csr_reused"] is False
    csr = x509.load_pem_x509_csr((tmp_path / "client.csr").read_bytes())
    key = serialization.load_pem_private_key((tmp_path / "client.key").read_bytes(), password=None)
    assert csr.public_key().public_bytes(*SPKI) == key.public_key().public_bytes(*SPKI)


def test_renew_without_a_key_or_for_another_id_is_refused(tmp_path, capsys):
    path = conf(tmp_path, '[device]\nid = "pole-17"\n')
    proc = cli("--renew", "--config", path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no TLS key at" in proc.stderr and "provision the board first" in proc.stderr
    with pytest.raises(UsageError, match="keeps the board's id pole-17"):
        call(capsys, "--renew", "--device-id", "pole-18", "--config", path)
    with pytest.raises(UsageError, match="--device-id ID is required"):
        call(capsys, "--config", path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fieldnode.toml"]


def test_renew_and_force_do_not_go_together(tmp_path):
    proc = cli("--renew", "--force", "--device-id", "pole-17", "--config", conf(tmp_path))
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr


# -- --config keeps every file beside the config ----------------------------------------------------------------------


def test_a_config_of_defaults_keeps_every_file_beside_it(tmp_path, capsys):
    """``fieldnode config defaults`` writes every path key at its default, absolute (/etc/fieldnode/update.age);
    provision must not follow one of them out of the config's directory while it puts the others beside it.
    (In an image root: were it to follow one, it must not be this machine's /etc.)"""
    root = tmp_path / "img"
    board_conf = "/opt/boards/a/fieldnode.toml"
    host_conf = root / board_conf.lstrip("/")
    host_conf.parent.mkdir(parents=True)
    host_conf.write_text(config.render_toml())
    code, out, _err = call(capsys, "--device-id", "pole-17", "--root", str(root), "--config", board_conf, "--json")
    assert code == 0
    files = json.loads(out)["files"]
    assert all(os.path.dirname(p) == "/opt/boards/a" for p in files.values()), files
    assert config.load(str(host_conf)).update.identity_file == "/opt/boards/a/update.age"
    assert sorted(p.name for p in host_conf.parent.iterdir()) == ["client.csr", "client.key", "fieldnode.toml",
                                                                  "update.age"]
    assert not (root / "etc").exists()  # nothing went to the image's /etc


def test_a_path_the_config_names_on_purpose_is_kept(tmp_path, capsys):
    elsewhere = tmp_path / "keys" / "board.age"
    path = conf(tmp_path, f'[update]\nidentity_file = "{elsewhere}"\n')
    code, out, _err = call(capsys, "--device-id", "pole-17", "--config", path, "--json")
    assert code == 0 and json.loads(out)["files"]["identity"] == str(elsewhere) and elsewhere.exists()
