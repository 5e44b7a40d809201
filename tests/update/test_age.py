"""The age v1 reader and writer (device/update/age.py): keys, round trips through real files, interop both ways
with pyrage (the Rust implementation), and the spec's edge cases rebuilt here in the manner of the C2SP CCTV
age test vectors (each case built from scratch with real crypto, not copied).

The kit below (``x25519_stanza``, ``build``, ``stream``) writes headers and payloads piece by piece so a test
can break exactly one rule; the tamper and fuzz tests import it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import os

import pyrage
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from device.update import age, bech32
from device.update.errors import DecryptError, UpdateError

CHUNK = age.CHUNK_SIZE
# A fixed identity, so a failing case can be replayed by hand.
IDENTITY = bech32.encode("AGE-SECRET-KEY-", bytes(range(1, 33)))
RECIPIENT = age.recipient_of(IDENTITY)
FILE_KEY = b"YELLOW SUBMARINE"
# A point of order 8 on Curve25519 (the one CCTV uses): its shared secret with any key is all zeros.
LOW_ORDER = bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f11d7")


# ------------------------------------------------------------------------------------------------ the kit


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt, info).derive(ikm)


def x25519_stanza(identity: str = IDENTITY, file_key: bytes = FILE_KEY, share: bytes | None = None):
    """``(args, body)`` of an X25519 stanza wrapping ``file_key`` to ``identity``'s recipient."""
    recipient = age.parse_identity(identity).public_key().public_bytes(serialization.Encoding.Raw,
                                                                       serialization.PublicFormat.Raw)
    if share is None:
        eph = X25519PrivateKey.generate()
        share = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        secret = eph.exchange(age.parse_identity(identity).public_key())
    else:
        secret = bytes(32)  # a forged share: what the wrap key would be for an all-zero shared secret
    wrap = hkdf(secret, share + recipient, b"age-encryption.org/v1/X25519")
    return ["X25519", b64(share)], ChaCha20Poly1305(wrap).encrypt(bytes(12), file_key, None)


def stanza_text(args, body: bytes) -> str:
    enc = b64(body)
    lines = [enc[i:i + 64] for i in range(0, len(enc), 64)]
    if not lines or len(lines[-1]) == 64:
        lines.append("")
    return "-> " + " ".join(args) + "\n" + "".join(line + "\n" for line in lines)


def header_mac(head: bytes, file_key: bytes = FILE_KEY) -> str:
    return b64(hmac.new(hkdf(file_key, b"", b"header"), head, "sha256").digest())


def stream(chunks, file_key: bytes = FILE_KEY, nonce: bytes = b"\x07" * 16) -> bytes:
    """A payload: the nonce, then each ``(plaintext, last_flag)`` chunk sealed at its position."""
    aead = ChaCha20Poly1305(hkdf(file_key, nonce, b"payload"))
    out = [nonce]
    for i, (plain, last) in enumerate(chunks):
        out.append(aead.encrypt(i.to_bytes(11, "big") + bytes([last]), plain, None))
    return b"".join(out)


def chunked(plaintext: bytes):
    """The honest chunking of ``plaintext``, as ``(chunk, last)`` pairs for :func:`stream`."""
    parts = [plaintext[i:i + CHUNK] for i in range(0, len(plaintext), CHUNK)] or [b""]
    return [(p, i == len(parts) - 1) for i, p in enumerate(parts)]


def build(stanzas=None, *, text: str | None = None, payload: bytes = b"age", file_key: bytes = FILE_KEY,
          mac: str | None = None, body: bytes | None = None) -> bytes:
    """A whole age file. ``text`` replaces the stanza section (raw lines); ``mac`` a MAC; ``body`` the payload."""
    if text is None:
        text = "".join(stanza_text(a, b) for a, b in (stanzas or [x25519_stanza()]))
    head = ("age-encryption.org/v1\n" + text + "---").encode()
    mac = header_mac(head, file_key) if mac is None else mac
    return head + b" " + mac.encode() + b"\n" + (stream(chunked(payload), file_key) if body is None else body)


def open_(data: bytes, identities=(IDENTITY,), **kw):
    out = io.BytesIO()
    try:
        n = age.decrypt(io.BytesIO(data), out, list(identities), **kw)
    except UpdateError as exc:
        exc.partial = out.getvalue()
        raise
    assert n == len(out.getvalue())
    return out.getvalue()


def non_canonical(text: str) -> str:
    """The same bytes spelled with the unused low bits of the last character set."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    return text[:-1] + alphabet[alphabet.index(text[-1]) ^ 1]


# ------------------------------------------------------------------------------------------------ keys


def test_generated_keys_are_bech32_and_match():
    identity, recipient = age.generate_identity()
    assert identity.startswith("AGE-SECRET-KEY-1") and identity.isupper() and len(identity) == 74
    assert recipient.startswith("age1") and recipient.islower() and len(recipient) == 62
    assert age.recipient_of(identity) == recipient
    assert age.generate_identity()[0] != identity


def test_the_spec_example_keys_parse():
    # The example keys of the age spec (c2sp.org/age, "The X25519 recipient type").
    age.parse_identity("AGE-SECRET-KEY-1GFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPYYSJZGFPQ4EGAEX")
    key = age.parse_recipient("age1zvkyg2lqzraa2lnjvqej32nkuu0ues2s82hzrye869xeexvn73equnujwj")
    assert len(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)) == 32


def test_keys_agree_with_pyrage():
    theirs = pyrage.x25519.Identity.generate()
    assert age.recipient_of(str(theirs)) == str(theirs.to_public())
    ours, recipient = age.generate_identity()
    assert str(pyrage.x25519.Identity.from_str(ours).to_public()) == recipient


@pytest.mark.parametrize("text, problem", [
    ("", "not a valid age recipient"),
    ("age1", "not a valid age recipient"),
    (RECIPIENT[:-1] + ("q" if RECIPIENT[-1] != "q" else "p"), "bad checksum"),
    (RECIPIENT.upper(), "type 'AGE' is not supported"),
    (RECIPIENT[:10] + RECIPIENT[10:].upper(), "mixed upper and lower case"),
    (RECIPIENT.replace("1", "b", 1), "not a valid age recipient"),
    (bech32.encode("age", bytes(31)), "31 bytes of key, expected 32"),
    (bech32.encode("age1pq", bytes(32)), "type 'age1pq' is not supported"),
    (IDENTITY, "type 'AGE-SECRET-KEY-' is not supported"),
    (RECIPIENT[:20] + "b" + RECIPIENT[21:], "not in the Bech32 alphabet"),
    (None, "expected an 'age1...' string, got NoneType"),
])
def test_bad_recipients_are_named(text, problem):
    with pytest.raises(DecryptError) as info:
        age.parse_recipient(text)
    assert problem in str(info.value) and info.value.code == "decrypt_failed"


@pytest.mark.parametrize("text, problem", [
    (IDENTITY.lower(), "type 'age-secret-key-' is not supported"),
    (RECIPIENT, "type 'age' is not supported"),
    (bech32.encode("AGE-SECRET-KEY-PQ-", bytes(32)), "type 'AGE-SECRET-KEY-PQ-' is not supported"),
    (bech32.encode("AGE-SECRET-KEY-", bytes(33)), "33 bytes of key, expected 32"),
    (IDENTITY[:-2] + "QQ", "bad checksum"),
    (b"AGE-SECRET-KEY-1", "got bytes"),
])
def test_bad_identities_are_named_without_the_secret(text, problem):
    with pytest.raises(DecryptError) as info:
        age.parse_identity(text)
    assert problem in str(info.value)
    assert IDENTITY[20:40] not in str(info.value)  # never the key material


def test_bech32_refuses_non_zero_padding():
    # 32 bytes are 256 bits, carried in 52 five-bit groups (260 bits): the 4 spare bits must be zero.
    hrp, data = bech32.decode(RECIPIENT)
    groups = bech32._convert_bits(data, 8, 5, True)
    groups[-1] |= 1
    poly = bech32._polymod(bech32._hrp_expand(hrp) + groups + [0] * 6) ^ 1
    text = hrp + "1" + "".join(bech32.CHARSET[g] for g in groups + [(poly >> 5 * (5 - i)) & 31 for i in range(6)])
    with pytest.raises(ValueError, match="padding"):
        bech32.decode(text)
    with pytest.raises(DecryptError, match="padding"):
        age.parse_recipient(text)


def test_identity_file_in_age_keygen_format(tmp_path):
    path = tmp_path / "board.age"
    other, _ = age.generate_identity()
    path.write_text(f"# created: 2026-11-29T10:00:00Z\n# public key: {RECIPIENT}\n{IDENTITY}\n\n"
                    f"  {other}\r\n")
    path.chmod(0o600)
    assert age.read_identity_file(str(path)) == [IDENTITY, other]


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_identity_file_readable_by_others_is_refused_as_operator_keys_are(tmp_path, mode):
    path = tmp_path / "board.age"
    path.write_text(IDENTITY + "\n")
    path.chmod(mode)
    with pytest.raises(DecryptError) as info:
        age.read_identity_file(str(path))
    assert f"identity file {path}: mode {mode:04o} lets others read it" in str(info.value)
    assert IDENTITY not in str(info.value)


@pytest.mark.parametrize("content, problem", [
    (b"# only a comment\n\n", "no identity in it"),
    (b"# public key: x\nAGE-SECRET-KEY-1NOTAKEY\n", "line 2: identity 'AGE-SECRET-K...': not a valid age identity"),
    (b"\xff\xfe" + IDENTITY.encode(), "not UTF-8 text"),
    (b"#" * (64 * 1024 + 1), "larger than 65536 bytes"),
    (RECIPIENT.encode() + b"\n", "line 1: identity"),
])
def test_bad_identity_files_are_named(tmp_path, content, problem):
    path = tmp_path / "board.age"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(DecryptError) as info:
        age.read_identity_file(str(path))
    assert str(path) in str(info.value) and problem in str(info.value)


def test_missing_identity_file(tmp_path):
    with pytest.raises(DecryptError, match=r"identity file .*nope\.age: cannot read it \(No such file"):
        age.read_identity_file(str(tmp_path / "nope.age"))


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * 1024 * 1024 + 7])
def test_round_trip_through_files(tmp_path, size):
    plain = os.urandom(size)
    (tmp_path / "plain").write_bytes(plain)
    seen = []
    with open(tmp_path / "plain", "rb") as src, open(tmp_path / "x.age", "wb") as dst:
        assert age.encrypt(src, dst, [RECIPIENT], chunk_hook=seen.append) == size
    assert b"".join(seen) == plain and all(len(c) == CHUNK for c in seen[:-1])
    ciphertext = (tmp_path / "x.age").read_bytes()
    chunks = max(1, -(-size // CHUNK))
    assert ciphertext.startswith(b"age-encryption.org/v1\n-> X25519 ")
    assert len(ciphertext) == ciphertext.index(b"\n---") + 49 + 16 + size + 16 * chunks
    digest = hashlib.sha256()
    with open(tmp_path / "x.age", "rb") as src, open(tmp_path / "out", "wb") as dst:
        assert age.decrypt(src, dst, [IDENTITY], on_chunk=digest.update) == size
    assert (tmp_path / "out").read_bytes() == plain
    assert digest.digest() == hashlib.sha256(plain).digest()


def test_bytes_helpers_and_key_objects():
    key = X25519PrivateKey.generate()
    sealed = age.encrypt_bytes(b"hello", [key.public_key()])
    assert age.decrypt_bytes(sealed, [key]) == b"hello"
    assert age.decrypt_bytes(age.encrypt_bytes(b"x", RECIPIENT), IDENTITY) == b"x"  # a bare string is one key


def test_every_file_gets_a_fresh_key_and_nonce():
    a, b = age.encrypt_bytes(b"same", [RECIPIENT]), age.encrypt_bytes(b"same", [RECIPIENT])
    assert a != b and a.split(b"\n")[1] != b.split(b"\n")[1]


def test_short_reads_from_a_pipe_like_source():
    class Trickle(io.RawIOBase):
        def __init__(self, data):
            self.data, self.pos = data, 0

        def readable(self):
            return True

        def read(self, n=-1):
            part = self.data[self.pos:self.pos + min(n, 1000)]
            self.pos += len(part)
            return part

    plain = os.urandom(3 * CHUNK + 5)
    sealed = io.BytesIO()
    assert age.encrypt(Trickle(plain), sealed, [RECIPIENT]) == len(plain)
    out = io.BytesIO()
    assert age.decrypt(Trickle(sealed.getvalue()), out, [IDENTITY]) == len(plain)
    assert out.getvalue() == plain


def test_encrypt_refuses_bad_recipients_before_writing():
    dst = io.BytesIO()
    for recipients, problem in (([], "no recipient given"), (["age1nope"], "not a valid age recipient"),
                                ([bech32.encode("age", LOW_ORDER)], "low-order point")):
        with pytest.raises(DecryptError, match=problem):
            age.encrypt(io.BytesIO(b"x"), dst, recipients)
    assert dst.getvalue() == b""


def test_decrypt_needs_an_identity():
    with pytest.raises(DecryptError, match="no identity given"):
        age.decrypt_bytes(age.encrypt_bytes(b"x", [RECIPIENT]), [])


# ------------------------------------------------------------------------------------------------ interop


@pytest.mark.parametrize("size", [0, 100, CHUNK, 2 * CHUNK + 3])
def test_pyrage_decrypts_ours(tmp_path, size):
    plain = os.urandom(size)
    theirs = pyrage.x25519.Identity.generate()
    others = [age.generate_identity()[1] for _ in range(2)]
    (tmp_path / "plain").write_bytes(plain)
    with open(tmp_path / "plain", "rb") as src, open(tmp_path / "x.age", "wb") as dst:
        age.encrypt(src, dst, [others[0], str(theirs.to_public()), others[1]])
    pyrage.decrypt_file(str(tmp_path / "x.age"), str(tmp_path / "out"), [theirs])
    assert (tmp_path / "out").read_bytes() == plain


@pytest.mark.parametrize("size", [0, 100, CHUNK, 2 * CHUNK + 3])
def test_we_decrypt_pyrage(tmp_path, size):
    plain = os.urandom(size)
    ours = [age.generate_identity() for _ in range(3)]
    (tmp_path / "plain").write_bytes(plain)
    recipients = [pyrage.x25519.Recipient.from_str(r) for _, r in ours]
    pyrage.encrypt_file(str(tmp_path / "plain"), str(tmp_path / "x.age"), recipients)
    with open(tmp_path / "x.age", "rb") as src, open(tmp_path / "out", "wb") as dst:
        assert age.decrypt(src, dst, [age.generate_identity()[0], ours[2][0]]) == size
    assert (tmp_path / "out").read_bytes() == plain


def test_pyrage_wrong_identity_and_our_no_match():
    sealed = pyrage.encrypt(b"x", [pyrage.x25519.Recipient.from_str(RECIPIENT)])
    with pytest.raises(age.NoMatchingIdentity, match="none is the 1 identity"):
        age.decrypt_bytes(sealed, [age.generate_identity()[0]])
    with pytest.raises(pyrage.DecryptError):
        pyrage.decrypt(age.encrypt_bytes(b"x", [RECIPIENT]), [pyrage.x25519.Identity.generate()])


def test_passphrase_and_armored_files_are_refused_by_name():
    scrypt = pyrage.passphrase.encrypt(b"x", "hunter2")
    with pytest.raises(age.NoMatchingIdentity, match=r"passphrase-encrypted age file \(scrypt\)"):
        age.decrypt_bytes(scrypt, [IDENTITY])
    armored = io.BytesIO()
    pyrage.encrypt_io(io.BytesIO(b"x"), armored, [pyrage.x25519.Recipient.from_str(RECIPIENT)], armored=True)
    with pytest.raises(DecryptError, match="ASCII-armored age file: not supported"):
        age.decrypt_bytes(armored.getvalue(), [IDENTITY])


# ------------------------------------------------------------------------------------------------ spec cases


def test_kit_builds_what_age_reads():
    assert pyrage.decrypt(build(payload=b"kit"), [pyrage.x25519.Identity.from_str(IDENTITY)]) == b"kit"


GOOD = {
    "x25519": lambda: build(),
    "grease stanzas before and after": lambda: build([(["grease"], b""), x25519_stanza(),
                                                      (["grease", "x"], os.urandom(70))]),
    "every printable argument character": lambda: build(
        [(["!\"#$%&'", "()*+,-./", "01234567", "89:;<=>?", "@ABCDEFG", "HIJKLMNO"], b""),
         (["PQRSTUVW", "XYZ[\\]^_", "`abcdefg", "hijklmno", "pqrstuvw", "xyz{|}~"], b""), x25519_stanza()]),
    "body ending with an empty line": lambda: build([x25519_stanza(), (["stanza"], b"A" * 96)]),
    "several recipients, ours last": lambda: build([x25519_stanza(age.generate_identity()[0]),
                                                     x25519_stanza(age.generate_identity()[0]), x25519_stanza()]),
    "another type first (mlkem768x25519)": lambda: build([(["mlkem768x25519", b64(os.urandom(1120))],
                                                           os.urandom(32)), x25519_stanza()]),
    "empty payload": lambda: build(payload=b""),
    "final chunk full": lambda: build(payload=b"\x01" * CHUNK),
    "final chunk full, second": lambda: build(payload=b"\x02" * 2 * CHUNK),
    "three chunks": lambda: build(payload=b"\x03" * (2 * CHUNK + 10)),
}


@pytest.mark.parametrize("case", sorted(GOOD))
def test_spec_success_cases(case):
    data = GOOD[case]()
    plain = open_(data)
    # The same bytes open with pyrage: the cases are valid age, not an agreement with ourselves.
    assert pyrage.decrypt(data, [pyrage.x25519.Identity.from_str(IDENTITY)]) == plain


def _replace_line(data: bytes, index: int, new: bytes) -> bytes:
    lines = data.split(b"\n")
    lines[index] = new
    return b"\n".join(lines)


HEADER_FAILURES = {
    "empty file": (lambda: b"", "empty file"),
    "not age": (lambda: b"PK\x03\x04garbage", "not an age file"),
    "truncated version line": (lambda: b"age-encryption.or", "truncated age header"),
    "version with CRLF": (lambda: build().replace(b"v1\n", b"v1\r\n", 1), "unsupported age version 'v1\\r'"),
    "unsupported version": (lambda: build().replace(b"/v1\n", b"/v1234\n", 1), "unsupported age version 'v1234'"),
    "MAC line with two spaces": (lambda: build().replace(b"--- ", b"---  "), "malformed MAC line"),
    "MAC line without space": (lambda: build().replace(b"--- ", b"---"), "malformed MAC line"),
    "MAC missing": (lambda: build(mac=""), "malformed MAC line"),
    "MAC truncated": (lambda: build(mac=header_mac(b"x")[:-2]), "malformed MAC line"),
    "MAC trailing space": (lambda: build(mac=header_mac(b"x") + " "), "malformed MAC line"),
    "MAC not canonical": (lambda: build(mac=non_canonical(header_mac(b"x"))), "header MAC: not canonical"),
    "MAC padded": (lambda: build(mac=header_mac(b"x")[:-1] + "="), "header MAC: not unpadded base64"),
    "no stanza": (lambda: build(text=""), "the header has no recipient stanza"),
    "stanza bad start": (lambda: build(text=stanza_text(*x25519_stanza()) + "-< grease\n\n"),
                         "expected a recipient stanza"),
    "stanza without arguments": (lambda: build(text="->\n\n" + stanza_text(*x25519_stanza())),
                                 "expected a recipient stanza"),
    "stanza empty argument": (lambda: build(text="-> grease  x\n\n" + stanza_text(*x25519_stanza())),
                              "malformed stanza arguments"),
    "stanza invalid character": (lambda: build(text="-> gr\x7fase\n\n" + stanza_text(*x25519_stanza())),
                                 "malformed stanza arguments"),
    "stanza body padded": (lambda: build(text="-> grease\nAA==\n" + stanza_text(*x25519_stanza())),
                           "stanza body: not unpadded base64"),
    "stanza body not canonical": (lambda: build(text="-> grease\nAB\n" + stanza_text(*x25519_stanza())),
                                  "stanza body: not canonical base64"),
    "stanza body line too long": (lambda: build(text="-> grease\n" + "A" * 68 + "\n\n" + stanza_text(*x25519_stanza())),
                                  "longer than 64 columns"),
    "stanza missing body": (lambda: build(text="-> grease\n" + stanza_text(*x25519_stanza())),
                            "stanza ended without a final line"),
    "stanza missing final line": (lambda: build(text="-> grease\n" + "A" * 64 + "\n" + stanza_text(*x25519_stanza())),
                                  "stanza ended without a final line"),
    "two short body lines": (lambda: build(text="-> grease\nAAAA\nAAAA\n" + stanza_text(*x25519_stanza())),
                             "expected a recipient stanza"),
    "spurious CR in body": (lambda: build(text="-> grease\nAAAA\r\n" + stanza_text(*x25519_stanza())),
                            "stanza body: not unpadded base64"),
    "X25519 extra argument": (lambda: build([(x25519_stanza()[0] + ["x"], x25519_stanza()[1])]),
                              "X25519 stanza: 2 arguments, expected 1"),
    "X25519 short share": (lambda: build([(["X25519", b64(bytes(31))], bytes(32))]), "share of 31 bytes"),
    "X25519 long share": (lambda: build([(["X25519", b64(bytes(33))], bytes(32))]), "share of 33 bytes"),
    "X25519 share not canonical": (lambda: build([(["X25519", non_canonical(x25519_stanza()[0][1])],
                                                   x25519_stanza()[1])]), "ephemeral share: not canonical"),
    "X25519 long file key": (lambda: build([x25519_stanza(file_key=b"A LONGER YELLOW SUBMARINE")]),
                             "wrapped file key of 41 bytes, expected 32"),
    "X25519 identity point": (lambda: build([x25519_stanza(share=bytes(32))]), "low-order point"),
    "X25519 low-order point": (lambda: build([x25519_stanza(share=LOW_ORDER)]), "low-order point"),
    "scrypt beside X25519": (lambda: build([(["scrypt", b64(bytes(16)), "10"], bytes(32)), x25519_stanza()]),
                             "mixes a passphrase (scrypt) stanza with other stanzas"),
    "too many stanzas": (lambda: build([(["g"], b"")] * (age.MAX_STANZAS + 1)), "more than 1000 recipient stanzas"),
    "header too long": (lambda: build([(["g"], os.urandom(48 * 1400))]), "age header longer than 65536 bytes"),
    "header never ends": (lambda: build()[:30], "truncated age header"),
    "payload nonce missing": (lambda: build(body=b""), "the payload nonce has 0 of 16 bytes"),
    "payload nonce short": (lambda: build(body=b"\x07" * 12), "the payload nonce has 12 of 16 bytes"),
}


@pytest.mark.parametrize("case", sorted(HEADER_FAILURES))
def test_spec_header_failures(case):
    make, problem = HEADER_FAILURES[case]
    with pytest.raises(DecryptError) as info:
        open_(make())
    assert problem in str(info.value)
    assert not isinstance(info.value, age.NoMatchingIdentity)
    assert info.value.partial == b""


NO_MATCH = {
    "lowercase type": lambda: build([(["x25519", x25519_stanza()[0][1]], x25519_stanza()[1])]),
    "bad tag": lambda: build([(x25519_stanza()[0], bytes(32))]),
    "another recipient": lambda: build([x25519_stanza(age.generate_identity()[0])]),
    "only other types": lambda: build([(["Scrypt", "x", "1"], bytes(32)), (["mlkem768x25519", "AA"], b"")]),
}


@pytest.mark.parametrize("case", sorted(NO_MATCH))
def test_spec_no_match(case):
    with pytest.raises(age.NoMatchingIdentity, match="no identity matches") as info:
        open_(NO_MATCH[case]())
    assert info.value.code == "decrypt_failed" and info.value.partial == b""


def test_spec_hmac_failure():
    data = build(mac=header_mac(b"age-encryption.org/v1\n-> other\n\n---"))
    with pytest.raises(DecryptError, match="age header MAC mismatch"):
        open_(data)


def test_a_different_file_key_in_one_stanza_fails_the_mac():
    # Two stanzas for us, the first wrapping another key: we take the first key we can open, and the MAC,
    # computed with the real key, refuses it (no way to splice a stanza into someone's header).
    data = build([x25519_stanza(file_key=os.urandom(16)), x25519_stanza()])
    with pytest.raises(DecryptError, match="MAC mismatch"):
        open_(data)


A, B = b"\xaa" * CHUNK, b"\xbb" * 100
PAYLOAD_FAILURES = {
    # name: (payload bytes, problem, plaintext that may have been written)
    "bad tag": (lambda: stream([(B, 1)])[:-1] + b"\x00", "chunk 0 (plaintext offset 0): authentication failed", b""),
    "bad tag, second chunk": (lambda: _flip(stream([(A, 0), (B, 1)]), -1), "chunk 1 (plaintext offset 65536)", A),
    "final chunk empty after others": (lambda: stream([(A, 0), (b"", 1)]), "empty final chunk after others", A),
    "missing tag": (lambda: stream([(B, 1)])[:-16], "chunk 0 (plaintext offset 0): authentication failed", b""),
    "no chunks": (lambda: stream([]), "the payload has no chunk after its nonce", b""),
    "no final chunk": (lambda: stream([(B, 0)]), "ends after chunk 0 without a final chunk", b""),
    "no final chunk, full": (lambda: stream([(A, 0)]), "ends after chunk 0 without a final chunk", b""),
    "no final chunk, two full": (lambda: stream([(A, 0), (A, 0)]), "ends after chunk 1 without a final chunk", A),
    "short chunk": (lambda: stream([(B, 1)])[:16 + 12], "12 bytes, shorter than a tag", b""),
    "short second chunk": (lambda: stream([(A, 0), (B, 1)])[:16 + CHUNK + 16 + 12], "chunk 1", A),
    "trailing garbage, short": (lambda: stream([(B, 1)]) + b"\x00", "authentication failed", b""),
    "trailing garbage, after a full final chunk": (lambda: stream([(A, 1)]) + b"\x00" * 10,
                                                   "is the final chunk but data follows it", b""),
    "two final chunks": (lambda: stream([(A, 1), (B, 1)]), "chunk 0 (plaintext offset 0) is the final chunk", b""),
    "two final chunks, second": (lambda: stream([(A, 0), (A, 1), (B, 1)]), "chunk 1 (plaintext offset 65536) is the "
                                                                          "final chunk", A),
    "chunks swapped": (lambda: _swap(stream([(A, 0), (b"\xcc" * CHUNK, 0), (B, 1)])), "chunk 0", b""),
}


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 1
    return bytes(out)


def _swap(payload: bytes) -> bytes:
    enc = CHUNK + 16
    nonce, c0, c1, rest = payload[:16], payload[16:16 + enc], payload[16 + enc:16 + 2 * enc], payload[16 + 2 * enc:]
    return nonce + c1 + c0 + rest


@pytest.mark.parametrize("case", sorted(PAYLOAD_FAILURES))
def test_spec_payload_failures_write_only_authentic_chunks(case):
    make, problem, written = PAYLOAD_FAILURES[case]
    with pytest.raises(DecryptError) as info:
        open_(build(body=make()))
    assert problem in str(info.value)
    assert info.value.partial == written
