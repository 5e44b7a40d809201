"""``fieldnode keys``: run() on parsed arguments, with real files; outputs, modes and exit codes."""

from __future__ import annotations

import argparse
import json
import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from device.link.envelope import TrustStore, Verifier, key_id, load_private_key, load_public_key
from tools import keys


def call(*argv: str) -> int:
    p = argparse.ArgumentParser(prog="fieldnode keys")
    keys.add_arguments(p)
    return keys.run(p.parse_args(list(argv)))


@pytest.fixture
def pair(tmp_path, capsys):
    """A generated key pair: (key path, pub path, printed key id)."""
    assert call("generate", "ops", "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    return str(tmp_path / "ops.key"), str(tmp_path / "ops.pub"), out.split("key id: ")[1].split()[0]


def test_generate_writes_both_files_with_modes(tmp_path, capsys):
    assert call("generate", "ops", "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    key_file, pub_file = tmp_path / "ops.key", tmp_path / "ops.pub"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pub_file).st_mode) == 0o644
    assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub_file.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    kid = key_id(load_public_key(str(pub_file)))
    assert key_id(load_private_key(str(key_file))) == kid
    assert f"key id: {kid}" in out
    assert f"sudo install -m 0644 {pub_file} /etc/fieldnode/trust/" in out
    assert sorted(os.listdir(tmp_path)) == ["ops.key", "ops.pub"]  # no temp files left


def test_generate_creates_a_private_output_directory(tmp_path):
    out = tmp_path / "new" / "keys"
    assert call("generate", "ops", "--out", str(out)) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o700
    assert sorted(os.listdir(out)) == ["ops.key", "ops.pub"]


@pytest.mark.parametrize("existing", ["ops.key", "ops.pub"])
def test_generate_never_overwrites(tmp_path, capsys, existing):
    (tmp_path / existing).write_bytes(b"precious")
    assert call("generate", "ops", "--out", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"refusing to overwrite {tmp_path / existing}" in err
    assert (tmp_path / existing).read_bytes() == b"precious"
    assert os.listdir(tmp_path) == [existing]


@pytest.mark.parametrize("name", ["../evil", "a/b", "white space", "_x", ".hidden", "ops.pub", "x" * 65, ""])
def test_generate_refuses_bad_names(tmp_path, capsys, name):
    assert call("generate", name, "--out", str(tmp_path)) == 2
    assert f"key name {name!r}" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_generate_output_dir_that_cannot_be_created(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert call("generate", "ops", "--out", str(tmp_path / "file" / "sub")) == 2
    assert f"output directory {tmp_path / 'file' / 'sub'}: cannot create it" in capsys.readouterr().err


def test_generate_write_failure_exits_1_and_leaves_nothing(tmp_path, capsys, mocker):
    real_link = os.link

    def link(src, dst):
        if dst.endswith(".pub"):
            raise OSError(28, "No space left on device", dst)
        return real_link(src, dst)

    mocker.patch.object(keys.os, "link", side_effect=link)
    assert call("generate", "ops", "--out", str(tmp_path)) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_id_of_public_and_private_key(pair, capsys):
    key_file, pub_file, kid = pair
    for path in (key_file, pub_file):
        assert call("id", path) == 0
        assert capsys.readouterr().out.strip() == kid


@pytest.mark.parametrize("content, problem", [
    (b"garbage", "not a PEM key"),
    ("rsa", "an RSA key, expected Ed25519"),
])
def test_id_of_a_bad_file(tmp_path, capsys, content, problem):
    path = tmp_path / "k.pub"
    if content == "rsa":
        content = rsa.generate_private_key(65537, 2048).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path.write_bytes(content)
    assert call("id", str(path)) == 2
    err = capsys.readouterr().err
    assert str(path) in err and problem in err


def test_id_of_a_missing_file(tmp_path, capsys):
    assert call("id", str(tmp_path / "nope.pub")) == 2
    assert f"key file {tmp_path / 'nope.pub'}: cannot read it" in capsys.readouterr().err


def test_sign_prints_an_envelope_the_board_accepts(pair, tmp_path, capsys):
    key_file, pub_file, kid = pair
    assert call("sign", "--key", key_file, "--device", "pump-07", "--cmd", "variant",
                "--args", '{"variant": "lite"}', "--ttl", "120") == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one line, for scripting
    env = json.loads(out)
    assert env["key"] == kid and env["args"] == {"variant": "lite"}
    trust = tmp_path / "trust"
    trust.mkdir()
    os.link(pub_file, trust / "ops.pub")
    got = Verifier(TrustStore(str(trust)), device_id="pump-07").verify(env, "variant")  # the real clock
    assert (got.cmd, got.args, got.key_name) == ("variant", {"variant": "lite"}, "ops")


def test_sign_default_args_are_empty(pair, capsys):
    assert call("sign", "--key", pair[0], "--device", "pump-07", "--cmd", "restart") == 0
    assert json.loads(capsys.readouterr().out)["args"] == {}


@pytest.mark.parametrize("argv, problem", [
    (["--args", "{variant: lite}"], "--args: not valid JSON"),
    (["--args", '["lite"]'], "--args: expected a JSON object"),
    (["--args", '{"x": NaN}'], "'args': not representable as canonical JSON"),
    (["--device", ""], "'device': expected a non-empty string"),
])
def test_sign_bad_input_exits_2(pair, capsys, argv, problem):
    base = {"--device": "pump-07", "--cmd": "variant"}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    flat = [x for kv in base.items() for x in kv]
    assert call("sign", "--key", pair[0], *flat) == 2
    captured = capsys.readouterr()
    assert problem in captured.err and captured.out == ""


def test_sign_with_a_public_key_file(pair, capsys):
    assert call("sign", "--key", pair[1], "--device", "pump-07", "--cmd", "variant") == 2
    err = capsys.readouterr().err
    assert pair[1] in err and "expected an Ed25519 key in a 'PRIVATE KEY' block" in err


@pytest.mark.parametrize("ttl", ["0", "-5", "soon", "inf", "nan"])
def test_sign_bad_ttl_is_a_usage_error(pair, capsys, ttl):
    with pytest.raises(SystemExit) as info:
        call("sign", "--key", pair[0], "--device", "d", "--cmd", "c", "--ttl", ttl)
    assert info.value.code == 2
    assert "--ttl" in capsys.readouterr().err


def test_sign_warns_about_a_ttl_boards_refuse(pair, capsys):
    assert call("sign", "--key", pair[0], "--device", "pump-07", "--cmd", "variant", "--ttl", "3600") == 0
    captured = capsys.readouterr()
    assert "above the boards' default limit of 600 s" in captured.err
    assert json.loads(captured.out)["cmd"] == "variant"


def test_an_action_is_required(capsys):
    with pytest.raises(SystemExit) as info:
        call()
    assert info.value.code == 2
    assert "ACTION" in capsys.readouterr().err


def test_generated_key_is_ed25519(pair):
    assert isinstance(load_private_key(pair[0]), ed25519.Ed25519PrivateKey)


# --- generate --kind recipient: a board's age identity ---------------------------------------------------


def test_generate_recipient_writes_an_age_identity_file(tmp_path, capsys):
    import pyrage

    from device.update import age

    assert call("generate", "pump-07", "--kind", "recipient", "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    path = tmp_path / "pump-07.age"
    assert sorted(os.listdir(tmp_path)) == ["pump-07.age"]  # no .key/.pub, no temp files
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# created: ") and lines[1].startswith("# public key: age1")
    recipient = lines[1].split(": ")[1]
    assert f"recipient: {recipient}\n" in out
    assert f"identity: {path} (mode 0600" in out
    (identity,) = age.read_identity_file(str(path))
    assert lines[2] == identity and age.recipient_of(identity) == recipient
    # The standard tools agree: the printed recipient is the file's identity's.
    assert str(pyrage.x25519.Identity.from_str(identity).to_public()) == recipient
    sealed = age.encrypt_bytes(b"release key", [recipient])
    assert pyrage.decrypt(sealed, [pyrage.x25519.Identity.from_str(identity)]) == b"release key"


def test_generate_recipient_makes_a_new_key_each_time(tmp_path, capsys):
    assert call("generate", "a", "--kind", "recipient", "--out", str(tmp_path)) == 0
    assert call("generate", "b", "--kind", "recipient", "--out", str(tmp_path)) == 0
    out = capsys.readouterr().out
    recipients = [line.split(": ")[1] for line in out.splitlines() if line.startswith("recipient: ")]
    assert len(recipients) == 2 and recipients[0] != recipients[1]


def test_generate_recipient_never_overwrites(tmp_path, capsys):
    (tmp_path / "pump-07.age").write_bytes(b"precious")
    assert call("generate", "pump-07", "--kind", "recipient", "--out", str(tmp_path)) == 2
    assert f"refusing to overwrite {tmp_path / 'pump-07.age'}" in capsys.readouterr().err
    assert (tmp_path / "pump-07.age").read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["pump-07.age"]


@pytest.mark.parametrize("name", ["../evil", "x.age", "x.key", ".hidden", ""])
def test_generate_recipient_refuses_bad_names(tmp_path, capsys, name):
    assert call("generate", name, "--kind", "recipient", "--out", str(tmp_path)) == 2
    assert f"key name {name!r}" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_generate_recipient_write_failure_exits_1_and_leaves_nothing(tmp_path, capsys, mocker):
    mocker.patch.object(keys.os, "link", side_effect=OSError(28, "No space left on device", "x"))
    assert call("generate", "pump-07", "--kind", "recipient", "--out", str(tmp_path)) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_generate_default_kind_is_still_a_signing_pair(tmp_path, capsys):
    assert call("generate", "ops", "--kind", "signing", "--out", str(tmp_path)) == 0
    assert sorted(os.listdir(tmp_path)) == ["ops.key", "ops.pub"]
    assert "key id: " in capsys.readouterr().out


def test_generate_unknown_kind_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        call("generate", "ops", "--kind", "gpg", "--out", str(tmp_path))
    assert info.value.code == 2
    assert "--kind" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
