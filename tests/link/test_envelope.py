"""Signed command envelopes: signing, the trust directory and the verifier, with real keys and files.

One test per refusal path, each checking that the error names the problem; the time checks run on a SimClock.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from device.link import envelope as envmod
from device.link.envelope import (TrustStore, VerifiedCommand, Verifier, canonical_json, key_id, load_private_key,
                                  load_public_key, sign_envelope)
from device.link.errors import (BadSignature, EnvelopeError, EnvelopeExpired, EnvelopeMalformed, EnvelopeReplayed,
                                EnvelopeTooLong, KeyFileError, UnknownKey, WrongTarget)
from drivers.sim.clock import EPOCH, SimClock

DEVICE = "pump-07"

# The worked example of docs/signing.md: RFC 8032 test 1 secret key (public, never use it for real).
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
DOC_KEY_ID = "21fe31dfa154a261"
DOC_CANONICAL = ('{"args":{"note":"größer","variant":"lite"},"cmd":"variant","device":"pump-07",'
                 '"expires":1767225660,"key":"21fe31dfa154a261","nonce":"q1Fx3zN0b9kYd2Vt8mRw0A"}').encode("utf-8")
DOC_SIG = "LrWyRY4AgJYIzCu+dHNOKCBPFEpt7ba2PvLaAWR3CbL05Bzoos0NRpbcp8S3Gx0IMqRMvvdpiAT2r+oL4JePBw=="


def pub_pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def priv_pem(key, password: bytes | None = None) -> bytes:
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


@pytest.fixture
def clock():
    return SimClock()


@pytest.fixture
def ops_key():
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def trust_dir(tmp_path, ops_key):
    d = tmp_path / "trust"
    d.mkdir(mode=0o755)
    (d / "ops.pub").write_bytes(pub_pem(ops_key))
    return d


@pytest.fixture
def nonce_path(tmp_path):
    (tmp_path / "state").mkdir()
    return str(tmp_path / "state" / "nonces.json")


@pytest.fixture
def verifier(trust_dir, clock, nonce_path):
    return Verifier(TrustStore(str(trust_dir)), device_id=DEVICE, clock=clock, nonce_path=nonce_path)


@pytest.fixture
def sign(ops_key, clock):
    def make(key=None, **kw):
        kw.setdefault("device", DEVICE)
        kw.setdefault("cmd", "variant")
        kw.setdefault("args", {"variant": "lite"})
        return sign_envelope(key or ops_key, clock=clock, **kw)

    return make


def resign(key, env: dict) -> dict:
    """Signs ``env`` (its fields as they are now) with ``key``, the way a careful attacker would."""
    unsigned = {f: env[f] for f in envmod.SIGNED_FIELDS}
    return {**unsigned, "sig": base64.b64encode(key.sign(canonical_json(unsigned))).decode()}


# ----------------------------------------------------------------------------------------------- format


def test_canonical_json_is_sorted_compact_utf8():
    assert canonical_json({"b": 1, "a": {"z": [1.5, None, True], "y": "ö"}}) == \
        '{"a":{"y":"ö","z":[1.5,null,true]},"b":1}'.encode("utf-8")


@pytest.mark.parametrize("value, problem", [
    (float("nan"), "Out of range float"), (b"x", "bytes"), ("\ud800", "surrogate"),
])
def test_canonical_json_refuses_what_json_cannot_carry(value, problem):
    with pytest.raises(EnvelopeMalformed, match=problem):
        canonical_json({"x": value})


def test_worked_example_of_the_docs():
    key = ed25519.Ed25519PrivateKey.from_private_bytes(RFC8032_SEED)
    env = sign_envelope(key, device="pump-07", cmd="variant", args={"variant": "lite", "note": "größer"},
                        ttl_s=60, clock=SimClock(), nonce="q1Fx3zN0b9kYd2Vt8mRw0A")
    assert key_id(key) == key_id(key.public_key()) == DOC_KEY_ID
    assert canonical_json({f: env[f] for f in envmod.SIGNED_FIELDS}) == DOC_CANONICAL
    assert env["sig"] == DOC_SIG
    assert env["expires"] == int(EPOCH) + 60


def test_key_id_is_sha256_of_the_raw_public_key(ops_key):
    import hashlib

    raw = ops_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(ops_key.public_key()) == hashlib.sha256(raw).hexdigest()[:16]


@pytest.mark.parametrize("kw, problem", [
    ({"device": ""}, "'device'"), ({"cmd": None}, "'cmd'"), ({"args": ["x"]}, "'args'"),
    ({"args": {"x": float("inf")}}, "'args'"), ({"ttl_s": 0}, "'ttl_s'"), ({"ttl_s": float("nan")}, "'ttl_s'"),
    ({"nonce": "short"}, "'nonce'.*16..128"), ({"nonce": "has spaces in it!!"}, "'nonce'.*base64url"),
])
def test_sign_envelope_refuses_bad_input(sign, kw, problem):
    with pytest.raises(EnvelopeMalformed, match=problem):
        sign(**kw)


def test_sign_envelope_needs_an_ed25519_key():
    with pytest.raises(TypeError, match="Ed25519"):
        sign_envelope(ec.generate_private_key(ec.SECP256R1()), device=DEVICE, cmd="variant", args={})


# ------------------------------------------------------------------------------------------------- keys


def test_load_keys_round_trip(tmp_path, ops_key):
    (tmp_path / "a.key").write_bytes(priv_pem(ops_key))
    (tmp_path / "a.pub").write_bytes(pub_pem(ops_key))
    assert key_id(load_private_key(str(tmp_path / "a.key"))) == key_id(load_public_key(str(tmp_path / "a.pub")))


@pytest.mark.parametrize("content, loader, problem", [
    (b"hello", "public", "not a PEM key"),
    (b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 me@host", "public", "not a PEM key.*OpenSSH"),
    ("rsa-pub", "public", "an RSA key, expected Ed25519"),
    ("ec-pub", "public", r"an EC \(secp256r1\) key, expected Ed25519"),
    ("ed-priv", "public", "a private key .*expected an Ed25519 public key"),
    ("ed-pub", "private", "'PUBLIC KEY' block, expected an Ed25519 key in a 'PRIVATE KEY' block"),
    ("rsa-priv", "private", "an RSA key, expected Ed25519"),
    ("ed-enc", "private", "encrypted private key"),
    (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "public", "malformed 'PUBLIC KEY' PEM"),
    (b"x" * (65 * 1024), "public", "larger than"),
])
def test_load_key_errors_name_the_file_and_what_was_found(tmp_path, content, loader, problem):
    ed, rsa_key = ed25519.Ed25519PrivateKey.generate(), rsa.generate_private_key(65537, 2048)
    made = {"rsa-pub": pub_pem(rsa_key), "rsa-priv": priv_pem(rsa_key), "ed-priv": priv_pem(ed),
            "ed-pub": pub_pem(ed), "ed-enc": priv_pem(ed, b"secret"),
            "ec-pub": pub_pem(ec.generate_private_key(ec.SECP256R1()))}
    path = tmp_path / "k.pem"
    path.write_bytes(made.get(content, content) if isinstance(content, str) else content)
    load = load_public_key if loader == "public" else load_private_key
    with pytest.raises(KeyFileError, match=problem) as info:
        load(str(path))
    assert str(path) in str(info.value)


def test_missing_key_file_is_wrapped(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read it .No such file") as info:
        load_public_key(str(tmp_path / "nope.pub"))
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert str(tmp_path / "nope.pub") in str(info.value)


def test_malformed_pem_keeps_the_cryptography_cause(tmp_path):
    path = tmp_path / "bad.pub"
    path.write_bytes(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(KeyFileError) as info:
        load_public_key(str(path))
    assert isinstance(info.value.__cause__, ValueError)


# ------------------------------------------------------------------------------------------------ trust


def test_trust_dir_skips_bad_files_and_keeps_the_good_ones(trust_dir, ops_key, caplog):
    other = ed25519.Ed25519PrivateKey.generate()
    (trust_dir / "garbage.pub").write_bytes(b"\x00\x01 not a key")
    (trust_dir / "rsa.pub").write_bytes(pub_pem(rsa.generate_private_key(65537, 2048)))
    (trust_dir / "ops-copy.pub").write_bytes(pub_pem(ops_key))  # sorts before ops.pub
    (trust_dir / "leaked.pub").write_bytes(priv_pem(other))
    (trust_dir / "open.pub").write_bytes(pub_pem(other))
    os.chmod(trust_dir / "open.pub", 0o666)
    (trust_dir / "README").write_text("not a key, ignored")
    (trust_dir / ".ops.pub.swp").write_text("editor file, ignored")
    with caplog.at_level(logging.WARNING, logger="device.link.envelope"):
        trust = TrustStore(str(trust_dir))
        trust.reload()
    assert list(trust.keys) == [key_id(ops_key)] and trust.keys[key_id(ops_key)][0] == "ops-copy"
    problems = trust.problems
    assert len(problems) == 5, problems
    expect = {"garbage.pub": "not a PEM key", "rsa.pub": "an RSA key, expected Ed25519",
              "ops.pub": f"duplicate of key {key_id(ops_key)} from ops-copy.pub",
              "leaked.pub": "a private key", "open.pub": "writable by every user"}
    for name, reason in expect.items():
        assert any(name in p and reason in p for p in problems), (name, problems)
    # Logged once, not on every reload.
    assert sum("garbage.pub" in r.getMessage() for r in caplog.records) == 1


def test_trust_dir_missing_or_world_writable_trusts_nothing(tmp_path, ops_key):
    missing = TrustStore(str(tmp_path / "absent"))
    assert missing.keys == {}
    assert "absent" in missing.problems[0] and "No such file" in missing.problems[0]
    d = tmp_path / "open"
    d.mkdir()
    (d / "ops.pub").write_bytes(pub_pem(ops_key))
    os.chmod(d, 0o777)
    store = TrustStore(str(d))
    assert store.keys == {}
    assert "writable by every user" in store.problems[0]


def test_reload_picks_up_added_and_removed_keys(trust_dir, ops_key):
    trust = TrustStore(str(trust_dir))
    second = ed25519.Ed25519PrivateKey.generate()
    (trust_dir / "night-shift.pub").write_bytes(pub_pem(second))
    (trust_dir / "ops.pub").unlink()
    trust.reload()
    assert list(trust.keys) == [key_id(second)]
    assert trust.get(key_id(second))[0] == "night-shift"
    assert trust.get(key_id(ops_key)) is None


# ----------------------------------------------------------------------------------------------- verify


def test_good_envelope_verifies(verifier, sign, ops_key):
    env = sign(args={"variant": "lite", "threads": 2})
    env["request_id"] = "r-1"  # unsigned; the link may set or change it
    got = verifier.verify(json.loads(json.dumps(env)), "variant")
    assert got == VerifiedCommand(cmd="variant", args={"variant": "lite", "threads": 2}, key_id=key_id(ops_key),
                                  key_name="ops", nonce=env["nonce"], expires=float(env["expires"]))
    assert verifier.counters["accepted"] == 1


def _drop(field):
    return lambda e: {k: v for k, v in e.items() if k != field}


def _set(field, value):
    return lambda e: {**e, field: value}


MALFORMED = [
    ("not a dict", lambda e: [e], "expected a JSON object, got list"),
    *[(f"missing {f}", _drop(f), f"missing field.*{f}") for f in envmod.ENVELOPE_FIELDS],
    ("unknown field", _set("priority", 1), "unknown field.*'priority'"),
    ("cmd not a string", _set("cmd", 5), "'cmd': expected a non-empty string, got int 5"),
    ("device empty", _set("device", ""), "'device': expected a non-empty string"),
    ("key null", _set("key", None), "'key': expected a non-empty string, got NoneType"),
    ("nonce a number", _set("nonce", 1234567890123456789), "'nonce': expected a non-empty string"),
    ("sig a list", _set("sig", ["x"]), "'sig': expected a non-empty string"),
    ("args a list", _set("args", ["lite"]), "'args': expected a JSON object, got list"),
    ("args with NaN", _set("args", {"x": float("nan")}), "'args': not representable as canonical JSON"),
    ("cmd lone surrogate", _set("cmd", "variant\ud800"), "'cmd': not representable as canonical JSON"),
    ("expires a string", _set("expires", "1767225660"), "'expires': expected a finite number"),
    ("expires a bool", _set("expires", True), "'expires': expected a finite number.*bool"),
    ("expires NaN", _set("expires", float("nan")), "'expires': expected a finite number"),
    ("expires infinite", _set("expires", float("inf")), "'expires': expected a finite number"),
    ("expires huge", _set("expires", 10 ** 400), "'expires': expected a finite number"),
    ("nonce too short", _set("nonce", "a" * 15), "'nonce': expected 16..128 characters, got 15"),
    ("nonce too long", _set("nonce", "a" * 129), "'nonce': expected 16..128 characters, got 129"),
    ("nonce odd characters", _set("nonce", "nonce/with+slash!"), "'nonce': expected base64url or hex"),
    ("sig not base64", _set("sig", "not*base64*at*all"), "'sig': not valid base64"),
    ("sig too short", _set("sig", base64.b64encode(b"x" * 63).decode()), "'sig': expected 64 bytes.*got 63"),
    ("sig non-ascii", _set("sig", "ö" * 88), "'sig': not valid base64"),
]


@pytest.mark.parametrize("mutate, problem", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_envelopes_name_the_problem(verifier, sign, mutate, problem):
    with pytest.raises(EnvelopeMalformed, match=problem):
        verifier.verify(mutate(sign()), "variant")
    assert verifier.counters["refused_envelope_malformed"] == 1
    assert verifier.counters["accepted"] == 0


def test_wrong_device(verifier, sign):
    with pytest.raises(WrongTarget, match="for device 'pump-08', this is 'pump-07'"):
        verifier.verify(sign(device="pump-08"), "variant")


def test_wrong_command(verifier, sign):
    with pytest.raises(WrongTarget, match="for command 'variant' but arrived as 'restart'"):
        verifier.verify(sign(), "restart")


def test_unknown_key(verifier, sign, trust_dir):
    stranger = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(UnknownKey, match=f"key '{key_id(stranger)}' is not in the trust directory {trust_dir}"):
        verifier.verify(sign(key=stranger), "variant")


@pytest.mark.parametrize("tamper", [
    lambda e: {**e, "args": {"variant": "full"}},
    lambda e: {**e, "expires": e["expires"] + 60},
    lambda e: {**e, "nonce": e["nonce"][::-1]},
    lambda e: {**e, "cmd": "restart"},  # the same envelope, replayed as another command
], ids=["args", "expires", "nonce", "cmd"])
def test_tampered_envelope_is_a_bad_signature(verifier, sign, ops_key, tamper):
    env = tamper(sign())
    with pytest.raises(BadSignature, match=f"does not verify with key {key_id(ops_key)} .ops.") as info:
        verifier.verify(env, env["cmd"])
    assert isinstance(info.value.__cause__, InvalidSignature)


def test_signature_from_another_key_is_a_bad_signature(verifier, sign, ops_key):
    env = resign(ed25519.Ed25519PrivateKey.generate(), sign())  # still names the trusted key
    assert env["key"] == key_id(ops_key)
    with pytest.raises(BadSignature):
        verifier.verify(env, "variant")


def test_expired_within_and_beyond_the_skew(verifier, sign, clock):
    late = sign(ttl_s=60)
    stale = sign(ttl_s=60)
    clock.advance(60 + 29)
    assert verifier.verify(late, "variant").cmd == "variant"
    clock.advance(2)
    with pytest.raises(EnvelopeExpired, match="expired 31 s ago .clock skew allowed 30 s"):
        verifier.verify(stale, "variant")


def test_expiry_too_far_ahead(verifier, sign):
    assert verifier.verify(sign(ttl_s=600), "variant")
    with pytest.raises(EnvelopeTooLong, match="expires 632 s from now; at most 600 s"):
        verifier.verify(sign(ttl_s=632), "variant")


def test_checks_run_in_the_documented_order(verifier, sign, clock):
    stranger = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(EnvelopeMalformed):  # malformed beats wrong target
        verifier.verify({**sign(device="elsewhere"), "nonce": "x"}, "variant")
    with pytest.raises(WrongTarget):  # wrong target beats unknown key
        verifier.verify(sign(key=stranger, device="elsewhere"), "variant")
    expired = sign(ttl_s=1)
    clock.advance(100)
    with pytest.raises(BadSignature):  # the signature is checked before the time
        verifier.verify({**expired, "args": {"variant": "full"}}, "variant")


def test_replay_is_refused(verifier, sign):
    env = sign()
    verifier.verify(env, "variant")
    with pytest.raises(EnvelopeReplayed, match=f"nonce {env['nonce']} of key {env['key']} .ops. was already used"):
        verifier.verify(dict(env), "variant")


def test_same_nonce_under_another_key_is_not_a_replay(tmp_path, clock, sign, ops_key):
    second = ed25519.Ed25519PrivateKey.generate()
    d = tmp_path / "t"
    d.mkdir()
    (d / "a.pub").write_bytes(pub_pem(ops_key))
    (d / "b.pub").write_bytes(pub_pem(second))
    v = Verifier(TrustStore(str(d)), device_id=DEVICE, clock=clock)
    v.verify(sign(nonce="n" * 16), "variant")
    v.verify(sign(key=second, nonce="n" * 16), "variant")
    assert v.pending_nonces == 2


def test_replay_is_refused_after_a_restart(verifier, sign, trust_dir, clock, nonce_path):
    env = sign()
    verifier.verify(env, "variant")
    assert oct(os.stat(nonce_path).st_mode & 0o777) == "0o600"
    restarted = Verifier(TrustStore(str(trust_dir)), device_id=DEVICE, clock=clock, nonce_path=nonce_path)
    assert restarted.pending_nonces == 1
    with pytest.raises(EnvelopeReplayed):
        restarted.verify(env, "variant")
    assert restarted.problems == []


def test_nonces_are_pruned_after_expiry(verifier, sign, clock, nonce_path):
    for _ in range(5):
        verifier.verify(sign(ttl_s=60), "variant")
        clock.advance(1)
    assert verifier.pending_nonces == 5
    first = sign(ttl_s=60)
    clock.advance(60 + 30 + 1)
    verifier.verify(sign(ttl_s=60), "variant")
    assert verifier.pending_nonces == 1
    with open(nonce_path) as fh:
        assert len(json.load(fh)["nonces"]) == 1
    with pytest.raises(EnvelopeExpired):  # forgetting the nonce is safe: its envelope is refused as expired
        verifier.verify(first, "variant")
    assert [n for n in os.listdir(os.path.dirname(nonce_path))] == ["nonces.json"]  # no temp files left


def test_old_nonces_are_dropped_when_loading(verifier, sign, trust_dir, clock, nonce_path):
    verifier.verify(sign(ttl_s=60), "variant")
    clock.advance(200)
    assert Verifier(TrustStore(str(trust_dir)), device_id=DEVICE, clock=clock,
                    nonce_path=nonce_path).pending_nonces == 0


@pytest.mark.parametrize("content, reason", [
    (b"{not json", "corrupt .Expecting property name"),
    (b"", "corrupt .Expecting value"),
    (b'{"format": 2, "nonces": []}', "format 1"),
    (b'{"format": 1, "nonces": [["k", "n"]]}', r"nonces\[0\] is not \[key id, nonce, expires\]"),
    (b"\xff\xfe\x00garbage", "corrupt"),
])
def test_corrupt_nonce_file_is_moved_aside(trust_dir, clock, nonce_path, sign, content, reason):
    with open(nonce_path, "wb") as fh:
        fh.write(content)
    v = Verifier(TrustStore(str(trust_dir)), device_id=DEVICE, clock=clock, nonce_path=nonce_path)
    aside = f"{nonce_path}.corrupt-20260101T000000Z"  # the UTC stamp of the clock (EPOCH)
    assert v.pending_nonces == 0
    assert len(v.problems) == 1 and nonce_path in v.problems[0] and f"moved it to {aside}" in v.problems[0]
    assert re.search(reason, v.problems[0]), v.problems
    with open(aside, "rb") as fh:
        assert fh.read() == content
    v.verify(sign(), "variant")  # and it keeps working, writing a fresh file
    with open(nonce_path) as fh:
        assert len(json.load(fh)["nonces"]) == 1


def test_nonce_file_write_failure_is_reported_but_accepts(verifier, sign, mocker, nonce_path):
    failing = mocker.patch.object(envmod.os, "replace", side_effect=OSError(28, "No space left on device"))
    env = sign()
    assert verifier.verify(env, "variant").nonce == env["nonce"]
    assert failing.called
    assert len(verifier.problems) == 1 and "No space left on device" in verifier.problems[0]
    assert nonce_path in verifier.problems[0]
    with pytest.raises(EnvelopeReplayed):  # still refused from memory
        verifier.verify(env, "variant")
    assert not [n for n in os.listdir(os.path.dirname(nonce_path)) if n.endswith(".tmp")]
    mocker.stopall()
    verifier.verify(sign(), "variant")
    assert verifier.problems == []


def test_counters_count_every_refusal_by_code(verifier, sign, clock):
    assert verifier.counters == {"accepted": 0, **{f"refused_{c}": 0 for c in envmod.REFUSAL_CODES}}
    env = sign()
    verifier.verify(env, "variant")
    attempts = [(env, "variant"), ({}, "variant"), (sign(), "restart"), (sign(ttl_s=5000), "variant"),
                (sign(key=ed25519.Ed25519PrivateKey.generate()), "variant"), ({**sign(), "args": {}}, "variant")]
    for e, cmd in attempts:
        with pytest.raises(EnvelopeError):
            verifier.verify(e, cmd)
    old = sign(ttl_s=1)
    clock.advance(100)
    with pytest.raises(EnvelopeExpired):
        verifier.verify(old, "variant")
    assert verifier.counters == {
        "accepted": 1, "refused_envelope_malformed": 1, "refused_wrong_target": 1, "refused_unknown_key": 1,
        "refused_bad_signature": 1, "refused_expired": 1, "refused_expiry_too_far": 1, "refused_replayed": 1,
    }


def test_verifier_refuses_bad_settings(trust_dir):
    with pytest.raises(ValueError, match="device_id"):
        Verifier(TrustStore(str(trust_dir)), device_id="")
    with pytest.raises(ValueError, match="max_ttl_s"):
        Verifier(TrustStore(str(trust_dir)), device_id=DEVICE, max_ttl_s=0)
